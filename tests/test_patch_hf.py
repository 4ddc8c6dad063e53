"""ff.patch on Hugging Face transformers models built from tiny random configs (nothing
downloaded): BERT, GPT-2 (Conv1D), T5 (T5LayerNorm, relative position bias, gated-gelu), ViT,
LLaMA (GQA, RMSNorm, SwiGLU), Mistral (sliding window). Outputs and parameter gradients equal to
the unpatched model, the fusedformer attention function actually called with the masks, state_dict
unchanged, unpatch exact."""

import copy
import importlib
import inspect

import fusedformer as ff
import pytest
import torch
from _testing import triton_ops
from fusedformer.patch import PatchVerificationError
from packaging.version import Version

tf = pytest.importorskip("transformers")
_hf = importlib.import_module("fusedformer.patch.hf")
# transformers 4.x: BERT and T5 have their own attention (no AttentionInterface), ViT has no ViTMLP, and
# on torch >= 2.6 a batch without padding still gets a materialised causal mask (4.x's create_causal_mask
# ANDs a packed-sequence check from position_ids into it there; below 2.6 it skips that check and, as
# transformers 5, gives None for the pure causal pattern)
TF5 = Version(tf.__version__).major >= 5
TF4_MATERIALISES_CAUSAL = not TF5 and Version(torch.__version__).release >= (2, 6)

V, L = 97, 9


def tiny(family):
    torch.manual_seed(0)
    if family == "bert":
        return tf.BertForMaskedLM(tf.BertConfig(
            vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    if family == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(
            vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, bos_token_id=0, eos_token_id=0))
    if family in ("t5", "t5-gated"):
        return tf.T5ForConditionalGeneration(tf.T5Config(
            vocab_size=V, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, dropout_rate=0.0,
            relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
            feed_forward_proj="gated-gelu" if family == "t5-gated" else "relu"))
    if family == "vit":
        return tf.ViTForImageClassification(tf.ViTConfig(
            image_size=16, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=48, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3))
    if family == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(
            vocab_size=V, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=0, pad_token_id=0))
    if family == "mistral":
        return tf.MistralForCausalLM(tf.MistralConfig(
            vocab_size=V, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=1, max_position_embeddings=32, sliding_window=3, bos_token_id=0, eos_token_id=0,
            pad_token_id=0))
    raise ValueError(family)


def batch(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    if model.main_input_name == "pixel_values":
        return {"pixel_values": torch.randn(2, 3, 16, 16, generator=g)}
    ids = torch.randint(2, V, (2, L), generator=g)
    mask = torch.ones(2, L, dtype=torch.long)
    mask[1, -3:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    if model.config.is_encoder_decoder:
        inputs["decoder_input_ids"] = torch.randint(2, V, (2, L - 2), generator=g)
    params = inspect.signature(model.forward).parameters
    if getattr(model.config, "use_cache", False) and ("use_cache" in params or any(
            p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())):  # 4.x Bert configs have it, forward not
        inputs["use_cache"] = False
    return inputs


def main_output(out):
    return out.logits


# per family: module type names the rules must replace (what the report lists)
EXPECTED = {
    "bert": {"LayerNorm": "fusedformer.nn.LayerNorm", "BertIntermediate": "ff.linear_act('gelu')"},
    "gpt2": {"LayerNorm": "fusedformer.nn.LayerNorm", "GPT2MLP": "ff.feed_forward('gelu_tanh')"},
    "t5": {"T5LayerNorm": "ff.rms_norm", "T5DenseActDense": "ff.feed_forward('relu')"},
    "t5-gated": {"T5LayerNorm": "ff.rms_norm", "T5DenseGatedActDense": "ff.feed_forward('geglu_tanh')"},
    "vit": ({"LayerNorm": "fusedformer.nn.LayerNorm", "ViTMLP": "ff.feed_forward('gelu')"} if TF5 else
            {"LayerNorm": "fusedformer.nn.LayerNorm", "ViTIntermediate": "ff.linear_act('gelu')"}),
    "llama": {"LlamaRMSNorm": "ff.rms_norm", "LlamaMLP": "ff.feed_forward('swiglu')"},
    "mistral": {"MistralRMSNorm": "ff.rms_norm", "MistralMLP": "ff.feed_forward('swiglu')"},
}


@pytest.fixture
def attention_spy(monkeypatch):
    """Counts calls of ff.scaled_dot_product_attention from the fusedformer attention function and
    records the masks and flags it got."""
    calls = []
    real = _hf.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, backend=None):
        calls.append({"mask": attn_mask, "is_causal": is_causal, "gqa": enable_gqa, "backend": backend,
                      "heads": (q.shape[1], k.shape[1])})
        return real(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                    enable_gqa=enable_gqa, backend=backend)

    monkeypatch.setattr(_hf, "scaled_dot_product_attention", spy)
    return calls


@pytest.mark.parametrize("family", list(EXPECTED))
def test_family_reference_float32(family, attention_spy):
    model = tiny(family)
    ref = copy.deepcopy(model)
    impl = model.config._attn_implementation
    snap = [(m, type(m), set(m.__dict__)) for m in model.modules()]
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())

    _, report = ff.patch(model, backend="reference", return_report=True)
    assert report.verified is not None and report.verified["max_abs_diff"] <= report.verified["tolerance"]
    switched = TF5 or family not in ("bert", "t5", "t5-gated")
    if switched:
        assert report.attention and "fusedformer" in report.attention
        assert model.config._attn_implementation == "fusedformer"
    else:  # 4.x BERT and T5 attention modules compute attention themselves: reported, left as they were
        assert report.attention == (f"left as {impl!r}: {type(model).__name__} does not dispatch through "
                                    "transformers.AttentionInterface (custom attention), so its attention "
                                    "was left as it is")
        assert model.config._attn_implementation == impl
    kinds = {orig: new for _, orig, new in report.replaced}
    for orig, new in EXPECTED[family].items():
        assert kinds.get(orig) == new, (orig, report)
    assert not report.left, str(report)
    assert bool(attention_spy) == switched, "the fusedformer attention function was (not) called"
    assert all(c["backend"] == "reference" for c in attention_spy)
    assert all(type(p) is torch.nn.Parameter for p in model.parameters())
    assert all(params[n] is p for n, p in model.named_parameters())
    sd2 = model.state_dict()
    assert list(sd2) == list(sd) and all(torch.equal(sd2[k], sd[k]) for k in sd)

    # training-mode forward and backward against the untouched copy
    attention_spy.clear()
    inputs = batch(model)
    model.train(), ref.train()
    y, y_ref = main_output(model(**inputs)), main_output(ref(**inputs))
    torch.testing.assert_close(y, y_ref, atol=2e-5, rtol=1e-4)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert (p.grad is None) == (q.grad is None), n
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, atol=2e-5, rtol=1e-3, msg=n)
    if family != "vit" and switched:  # the padded row must reach the kernel as a mask, never be dropped
        assert any(c["mask"] is not None for c in attention_spy)
    if family in ("llama", "mistral"):
        assert all(c["gqa"] and c["heads"][0] > c["heads"][1] for c in attention_spy)
    if family == "t5" and switched:  # relative position bias: a float mask
        assert any(c["mask"] is not None and c["mask"].is_floating_point() for c in attention_spy)

    ff.unpatch(model)
    assert model.config._attn_implementation == impl
    for m, cls, keys in snap:
        assert type(m) is cls and set(m.__dict__) == keys
    model.eval(), ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(main_output(model(**inputs)), main_output(ref(**inputs)), atol=0, rtol=0)


def test_causal_without_padding_uses_is_causal_and_sliding_window_mask(attention_spy):
    """No padding: the mask function gives None for a pure causal pattern and the kernel gets
    is_causal=True (4.x on torch >= 2.6: the exact causal pattern as a bool mask); a sliding
    window shorter than the sequence arrives as a bool mask."""
    for family, want_causal in (("llama", True), ("mistral", False)):
        model = tiny(family)
        ref = copy.deepcopy(model)
        ff.patch(model, backend="reference")
        attention_spy.clear()
        ids = torch.randint(2, V, (1, L), generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            torch.testing.assert_close(model(ids, use_cache=False).logits, ref(ids, use_cache=False).logits,
                                       atol=2e-5, rtol=1e-4)
        assert attention_spy
        if want_causal and not TF4_MATERIALISES_CAUSAL:
            assert all(c["is_causal"] and c["mask"] is None for c in attention_spy)
        elif want_causal:
            causal = torch.ones(L, L, dtype=torch.bool).tril()
            assert all(not c["is_causal"] and c["mask"].dtype == torch.bool
                       and torch.equal(c["mask"].reshape(-1, L, L)[0], causal) for c in attention_spy)
        else:
            assert all(c["mask"] is not None and c["mask"].dtype == torch.bool for c in attention_spy)
            assert not attention_spy[0]["mask"][0, 0, L - 1, 0]  # outside the window of 3
        ff.unpatch(model)


def test_generate_with_kv_cache_matches():
    model = tiny("llama")
    ref = copy.deepcopy(model)
    ids = torch.randint(2, V, (1, 5), generator=torch.Generator().manual_seed(4))
    with ff.patched(model, backend="reference"):
        out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(out, ref.generate(ids, max_new_tokens=4, do_sample=False))


def test_training_step_with_optimizer_created_before_patch():
    model, ref = tiny("llama"), tiny("llama")
    # SGD: an update linear in the gradient, compared as an update (AdamW's first step is about
    # lr * sign(g): blind to a wrong gradient's size, and gradients of 1e-8 that differ in their
    # last bits move a weight by 1e-5 more or less)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ff.patch(model, backend="reference")
    inputs = batch(model, seed=6)
    for m, o in ((model, opt), (ref, opt_ref)):
        m.train()
        o.zero_grad()
        m(**inputs, labels=inputs["input_ids"]).loss.backward()
        o.step()
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert not torch.equal(p.detach(), before[n]), f"{n} was not updated"
        torch.testing.assert_close(p.detach() - before[n], q.detach() - before[n], atol=1e-7, rtol=1e-3, msg=n)
    ff.unpatch(model)


def test_verify_failure_restores_attention_implementation(monkeypatch):
    model = tiny("gpt2")
    snap = [(m, type(m), set(m.__dict__)) for m in model.modules()]
    real = _hf.scaled_dot_product_attention
    monkeypatch.setattr(_hf, "scaled_dot_product_attention", lambda *a, **k: real(*a, **k) * 1.01)
    with pytest.raises(PatchVerificationError, match="left unpatched"):
        ff.patch(model, backend="reference")
    assert model.config._attn_implementation == "sdpa"
    for m, cls, keys in snap:
        assert type(m) is cls and set(m.__dict__) == keys
    assert ff.patch_report(model) is None


def test_ops_subset_keeps_attention_and_norms():
    model = tiny("llama")
    _, report = ff.patch(model, ops=("mlp",), backend="reference", return_report=True)
    assert model.config._attn_implementation == "sdpa" and report.attention is None
    assert {orig for _, orig, _ in report.replaced} == {"LlamaMLP"}
    ff.unpatch(model)


@pytest.mark.skipif(not triton_ops()[0], reason=f"triton backend cannot run any patch op on cpu ({triton_ops()[1]})")
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_family_interpreted_triton(family):
    """Every op group the triton backend supports at test time, interpreted on CPU: outputs and
    parameter gradients equal to the unpatched model."""
    ops, _ = triton_ops()
    model = tiny(family)
    ref = copy.deepcopy(model)
    _, report = ff.patch(model, ops=ops, backend="triton", return_report=True)
    assert report.replaced or report.attention
    ids = torch.randint(2, V, (1, 5), generator=torch.Generator().manual_seed(5))
    y, y_ref = model(ids, use_cache=False).logits, ref(ids, use_cache=False).logits
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-3)
    y.sum().backward()
    y_ref.sum().backward()
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-3, msg=n)


def test_patched_model_compiles_fullgraph():
    """The bench's 'patched + compile' provider: the instance forwards, Conv1D transposes and the
    attention function trace into one graph (no graph break), forward and backward."""
    model = tiny("gpt2")
    ref = copy.deepcopy(model)
    ff.patch(model, backend="reference")
    ids = torch.randint(2, V, (2, 6), generator=torch.Generator().manual_seed(7))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    y = compiled(ids, use_cache=False).logits
    torch.testing.assert_close(y, ref(ids, use_cache=False).logits, atol=2e-5, rtol=1e-4)
    y.sum().backward()
    assert model.transformer.h[0].mlp.c_fc.weight.grad is not None


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_family_cuda_bfloat16(family):
    """On a GPU with the fastest available backend, in bfloat16: verification passes and the
    outputs stay close to HF's sdpa model."""
    model = tiny(family).cuda().to(torch.bfloat16)
    ref = copy.deepcopy(model)
    _, report = ff.patch(model, return_report=True)
    assert report.verified["max_abs_diff"] <= report.verified["tolerance"]
    inputs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in batch(model).items()}
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits.float(), ref(**inputs).logits.float(), atol=3e-2,
                                   rtol=3e-2)

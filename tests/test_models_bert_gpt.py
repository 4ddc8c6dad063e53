"""fusedformer.models' BERT and GPT against Hugging Face transformers: weights imported with from_hf
give the same outputs and gradients (float64 and float32, reference backend; low precision within
2x of Hugging Face's own error), GPT's KV cache and generation match, the models train, compile
(fullgraph) and run under DDP and on the triton backend. Hugging Face models are built from small
random configs; nothing is downloaded."""

import os

import fusedformer as ff
import pytest
import torch
import torch.nn.functional as F
from _models_testing import DTYPES, close, grad_check, hf_eval, random_ids, run_in_processes
from _testing import skip_unless_triton
from fusedformer.models import GPT, Bert, BertConfig, GPTConfig
from fusedformer.vocabulary import parity_bound

transformers = pytest.importorskip("transformers")


# --------------------------------------------------------------------------------------------
# BERT
# --------------------------------------------------------------------------------------------


def _hf_bert(cls=None, dtype=torch.float64):
    config = transformers.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=40, max_position_embeddings=24, type_vocab_size=2)
    return hf_eval((cls or transformers.BertForMaskedLM)(config), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bert_matches_hf_masked_lm(dtype):
    hf = _hf_bert(dtype=dtype)
    ours = Bert.from_hf(hf).eval()
    ids, types = random_ids(2, 11, 97), random_ids(2, 11, 2, seed=2)
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, 7:] = 0
    out = hf(input_ids=ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
    hidden = ours(ids, attention_mask=mask, token_type_ids=types)
    close(hidden, out.hidden_states[-1], dtype)
    logits = ours.mlm_head(hidden)
    close(logits, out.logits, dtype)
    grad_check(logits, out.logits, [
        (ours.word_embeddings.weight, hf.bert.embeddings.word_embeddings.weight, lambda t: t),
        (ours.layers[0].attn.q_proj.weight, hf.bert.encoder.layer[0].attention.self.query.weight, lambda t: t),
        (ours.layers[1].ln_2.bias, hf.bert.encoder.layer[1].output.LayerNorm.bias, lambda t: t),
        (ours.mlm_head.bias, hf.cls.predictions.bias, lambda t: t)], dtype)


def test_bert_model_with_pooler_and_default_token_types():
    hf = _hf_bert(transformers.BertModel)
    ours = Bert.from_hf(hf).eval()
    ids = random_ids(3, 9, 97)
    out = hf(input_ids=ids)
    hidden = ours(ids)
    close(hidden, out.last_hidden_state, torch.float64)
    close(ours.pool(hidden), out.pooler_output, torch.float64)


def test_bert_bad_input_names_the_argument():
    ours = Bert(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=32, max_position_embeddings=16))
    with pytest.raises(ValueError, match="input_ids"):
        ours(torch.tensor([[1, 50]]))
    with pytest.raises(TypeError, match="input_ids"):
        ours(torch.tensor([[1.0, 2.0]]))
    with pytest.raises(ValueError, match="attention_mask"):
        ours(torch.tensor([[1, 2]]), attention_mask=torch.ones(1, 3))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        ours(torch.ones(1, 17, dtype=torch.long))


def test_bert_from_hf_translates_the_activation_and_names_an_unsupported_one():
    def hf_bert(act):
        config = transformers.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                         intermediate_size=40, max_position_embeddings=24, hidden_act=act)
        return hf_eval(transformers.BertModel(config, add_pooling_layer=False), torch.float64)

    hf = hf_bert("gelu_pytorch_tanh")  # Hugging Face's name of the tanh GELU
    ours = Bert.from_hf(hf).eval()
    assert ours.config.hidden_act == "gelu_tanh"
    ids = random_ids(2, 7, 97)
    close(ours(ids), hf(input_ids=ids).last_hidden_state, torch.float64)
    with pytest.raises(ValueError, match="hidden_act 'quick_gelu'"):
        Bert.from_hf(hf_bert("quick_gelu"))


# --------------------------------------------------------------------------------------------
# GPT
# --------------------------------------------------------------------------------------------


def _hf_gpt(dtype=torch.float64, **kwargs):
    config = transformers.GPT2Config(vocab_size=101, n_positions=40, n_embd=32, n_layer=2, n_head=4,
                                     bos_token_id=0, eos_token_id=0, pad_token_id=0, **kwargs)
    return hf_eval(transformers.GPT2LMHeadModel(config), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gpt_matches_hf_logits_and_grads(dtype):
    hf = _hf_gpt(dtype)
    ours = GPT.from_hf(hf).eval()
    ids = random_ids(2, 13, 101)
    mask = torch.ones(2, 13, dtype=torch.long)
    mask[1, 9:] = 0  # right padding
    ref = hf(input_ids=ids, attention_mask=mask).logits
    logits = ours(ids, attention_mask=mask)
    close(logits, ref, dtype)
    E = 32
    grad_check(logits, ref, [
        (ours.wte.weight, hf.transformer.wte.weight, lambda t: t),
        (ours.wpe.weight, hf.transformer.wpe.weight, lambda t: t),
        (ours.h[0].attn.k_proj.weight, hf.transformer.h[0].attn.c_attn.weight, lambda t: t[:, E:2 * E].t()),
        (ours.h[1].mlp.w2.weight, hf.transformer.h[1].mlp.c_proj.weight, lambda t: t.t()),
        (ours.h[1].ln_2.weight, hf.transformer.h[1].ln_2.weight, lambda t: t)], dtype)


def test_gpt_kv_cache_matches_full_forward_and_hf_cache():
    hf = _hf_gpt()
    ours = GPT.from_hf(hf).eval()
    ids = random_ids(2, 12, 101)
    full = ours(ids)
    logits, cache = ours(ids[:, :7], use_cache=True)
    assert len(cache) == 2 and cache[0][0].shape == (2, 4, 7, 8)
    pieces = [logits]
    for t in range(7, 12):
        logits, cache = ours(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
        pieces.append(logits)
    close(torch.cat(pieces, dim=1), full, torch.float64)
    close(full, hf(input_ids=ids).logits, torch.float64)


def test_gpt_greedy_generate_equals_hf():
    # a wide init makes the argmax decisive (the default 0.02 gives near-uniform logits that repeat
    # one token); float64 leaves no near-ties to rounding
    hf = _hf_gpt(initializer_range=0.3)
    ours = GPT.from_hf(hf)
    ids = random_ids(3, 6, 100) + 1
    mask = torch.ones_like(ids)
    mask[1, :2], ids[1, :2] = 0, 0  # left padding: positions count real tokens only, as HF
    mask[2, :5], ids[2, :5] = 0, 0
    expect = hf.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    got = ours.generate(ids, max_new_tokens=10, attention_mask=mask)
    assert got.shape == (3, 16) and len(set(got[0, 6:].tolist())) > 2
    assert torch.equal(got, expect)
    unpadded = ids[:1]
    assert torch.equal(ours.generate(unpadded, 10), hf.generate(unpadded, attention_mask=torch.ones_like(unpadded),
                                                                max_new_tokens=10, do_sample=False))


def test_gpt_sampling_reproducible_and_top_k_one_is_greedy():
    ours = GPT(GPTConfig(vocab_size=61, n_layer=2, n_head=4, n_embd=32, n_positions=32))
    ids = random_ids(3, 4, 61)
    a = ours.generate(ids, 6, do_sample=True, temperature=0.7, top_k=5, generator=torch.Generator().manual_seed(3))
    b = ours.generate(ids, 6, do_sample=True, temperature=0.7, top_k=5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and torch.equal(a[:, :4], ids)
    assert torch.equal(ours.generate(ids, 6, do_sample=True, top_k=1), ours.generate(ids, 6))
    with pytest.raises(ValueError, match="temperature"):
        ours.generate(ids, 2, do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="n_positions"):
        ours.generate(ids, 40)


def test_gpt_and_bert_train_a_few_steps():
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=64, n_layer=2, n_head=4, n_embd=32, n_positions=32))
    bert = Bert(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=32))
    ids = random_ids(4, 16, 64)
    for model, loss_fn in ((gpt, lambda: F.cross_entropy(gpt(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())),
                           (bert, lambda: F.cross_entropy(bert.mlm_logits(ids).flatten(0, 1), ids.flatten()))):
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses = []
        for _ in range(8):
            opt.zero_grad()
            loss = loss_fn()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[-1] < losses[0] - 0.1, losses


def test_gpt_under_compile_fullgraph():
    torch._dynamo.reset()
    gpt = GPT(GPTConfig(vocab_size=50, n_layer=1, n_head=2, n_embd=16, n_positions=16)).eval()
    ids = random_ids(2, 7, 50)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, 5:] = 0
    compiled = torch.compile(gpt, fullgraph=True, backend="aot_eager")
    close(compiled(ids, attention_mask=mask), gpt(ids, attention_mask=mask), torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("family", ["gpt", "bert"])
def test_low_precision_within_2x_of_hf_error(family, dtype):
    """Against the float64 Hugging Face model as oracle, our low-precision error stays within
    2x of Hugging Face's own error in that dtype plus the parity floor (fusedformer.parity's rule)."""
    hf64 = _hf_gpt() if family == "gpt" else _hf_bert()
    ids = random_ids(2, 10, 97)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 7:] = 0

    def logits(m):
        return (m(input_ids=ids, attention_mask=mask).logits if isinstance(m, transformers.PreTrainedModel)
                else m(ids, attention_mask=mask) if family == "gpt" else m.mlm_logits(ids, attention_mask=mask))

    oracle = logits(hf64)
    ours = (GPT if family == "gpt" else Bert).from_hf(hf64).to(dtype)
    err = (logits(ours).double() - oracle).abs().max().item()
    torch_err = (logits(hf64.to(dtype)).double() - oracle).abs().max().item()
    assert err <= parity_bound(torch_err, dtype, oracle.abs().max().item()), (err, torch_err)


# --------------------------------------------------------------------------------------------
# DDP and the triton backend
# --------------------------------------------------------------------------------------------


def _tiny_gpt():
    torch.manual_seed(7)
    return GPT(GPTConfig(vocab_size=40, n_layer=2, n_head=2, n_embd=16, n_positions=16, dropout=0.0))


def _gpt_loss(model, ids):
    return F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())


def _ddp_worker(rank, world, out_dir):
    model = torch.nn.parallel.DistributedDataParallel(_tiny_gpt())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ids = random_ids(4, 9, 40)
    for _ in range(2):
        opt.zero_grad()
        _gpt_loss(model, ids[rank * 2:(rank + 1) * 2]).backward()
        opt.step()
    if rank == 0:
        torch.save(model.module.state_dict(), os.path.join(out_dir, "ddp.pt"))


def test_ddp_two_processes_match_single_process(tmp_path):
    run_in_processes(_ddp_worker, 2, str(tmp_path))
    model = _tiny_gpt()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ids = random_ids(4, 9, 40)
    for _ in range(2):
        opt.zero_grad()
        _gpt_loss(model, ids).backward()  # the mean over both halves = DDP's averaged gradient
        opt.step()
    ddp_state = torch.load(tmp_path / "ddp.pt")
    for name, value in model.state_dict().items():
        torch.testing.assert_close(ddp_state[name], value, atol=1e-6, rtol=1e-5)


@skip_unless_triton("attention", "layer_norm", "linear_act")
def test_gpt_on_triton_backend_matches_reference():
    gpt = GPT(GPTConfig(vocab_size=32, n_layer=1, n_head=2, n_embd=32, n_positions=16)).eval()
    ids = random_ids(1, 5, 32)
    ref = gpt(ids)
    with ff.use_backend("triton"):
        out = gpt(ids)
    close(out, ref, torch.float32)

"""fusedformer.models against Hugging Face transformers: weights imported with from_hf give the
same outputs and gradients (float64 and float32, reference backend), GPT's KV cache and greedy
generation match, the models train, compile (fullgraph) and run under DDP. Hugging Face models
are built from small random configs; nothing is downloaded."""

import os
import types

import fusedformer as ff
import pytest
import torch
import torch.nn.functional as F
from fusedformer import backends
from fusedformer.models import GPT, T5, Bert, BertConfig, GPTConfig, ViT
from fusedformer.vocabulary import parity_bound
from packaging.version import Version

transformers = pytest.importorskip("transformers")

TOL = {torch.float64: 1e-9, torch.float32: 1e-4}
DTYPES = [torch.float64, torch.float32]


def _close(a, b, dtype):
    torch.testing.assert_close(a, b, atol=TOL[dtype], rtol=TOL[dtype])


def _hf(model, dtype):
    torch.manual_seed(0)
    return model.to(dtype).eval()


def _grad_check(ours_out, hf_out, pairs, dtype):
    """Backprop the same random cotangent through both; compare the listed parameter gradients."""
    g = torch.randn_like(ours_out)
    (ours_out * g).sum().backward()
    (hf_out * g).sum().backward()
    for ours, theirs, transform in pairs:
        assert ours.grad is not None and theirs.grad is not None
        _close(ours.grad, transform(theirs.grad), dtype)


def _ids(B, L, vocab, seed=1):
    return torch.randint(0, vocab, (B, L), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------
# BERT
# --------------------------------------------------------------------------------------------


def _hf_bert(cls=None, dtype=torch.float64):
    config = transformers.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=40, max_position_embeddings=24, type_vocab_size=2)
    return _hf((cls or transformers.BertForMaskedLM)(config), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bert_matches_hf_masked_lm(dtype):
    hf = _hf_bert(dtype=dtype)
    ours = Bert.from_hf(hf).eval()
    ids, types = _ids(2, 11, 97), _ids(2, 11, 2, seed=2)
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, 7:] = 0
    out = hf(input_ids=ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
    hidden = ours(ids, attention_mask=mask, token_type_ids=types)
    _close(hidden, out.hidden_states[-1], dtype)
    logits = ours.mlm_head(hidden)
    _close(logits, out.logits, dtype)
    _grad_check(logits, out.logits, [
        (ours.word_embeddings.weight, hf.bert.embeddings.word_embeddings.weight, lambda t: t),
        (ours.layers[0].attn.q_proj.weight, hf.bert.encoder.layer[0].attention.self.query.weight, lambda t: t),
        (ours.layers[1].ln_2.bias, hf.bert.encoder.layer[1].output.LayerNorm.bias, lambda t: t),
        (ours.mlm_head.bias, hf.cls.predictions.bias, lambda t: t)], dtype)


def test_bert_model_with_pooler_and_default_token_types():
    hf = _hf_bert(transformers.BertModel)
    ours = Bert.from_hf(hf).eval()
    ids = _ids(3, 9, 97)
    out = hf(input_ids=ids)
    hidden = ours(ids)
    _close(hidden, out.last_hidden_state, torch.float64)
    _close(ours.pool(hidden), out.pooler_output, torch.float64)


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


# --------------------------------------------------------------------------------------------
# GPT
# --------------------------------------------------------------------------------------------


def _hf_gpt(dtype=torch.float64, **kwargs):
    config = transformers.GPT2Config(vocab_size=101, n_positions=40, n_embd=32, n_layer=2, n_head=4,
                                     bos_token_id=0, eos_token_id=0, pad_token_id=0, **kwargs)
    return _hf(transformers.GPT2LMHeadModel(config), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gpt_matches_hf_logits_and_grads(dtype):
    hf = _hf_gpt(dtype)
    ours = GPT.from_hf(hf).eval()
    ids = _ids(2, 13, 101)
    mask = torch.ones(2, 13, dtype=torch.long)
    mask[1, 9:] = 0  # right padding
    ref = hf(input_ids=ids, attention_mask=mask).logits
    logits = ours(ids, attention_mask=mask)
    _close(logits, ref, dtype)
    E = 32
    _grad_check(logits, ref, [
        (ours.wte.weight, hf.transformer.wte.weight, lambda t: t),
        (ours.wpe.weight, hf.transformer.wpe.weight, lambda t: t),
        (ours.h[0].attn.k_proj.weight, hf.transformer.h[0].attn.c_attn.weight, lambda t: t[:, E:2 * E].t()),
        (ours.h[1].mlp.w2.weight, hf.transformer.h[1].mlp.c_proj.weight, lambda t: t.t()),
        (ours.h[1].ln_2.weight, hf.transformer.h[1].ln_2.weight, lambda t: t)], dtype)


def test_gpt_kv_cache_matches_full_forward_and_hf_cache():
    hf = _hf_gpt()
    ours = GPT.from_hf(hf).eval()
    ids = _ids(2, 12, 101)
    full = ours(ids)
    logits, cache = ours(ids[:, :7], use_cache=True)
    assert len(cache) == 2 and cache[0][0].shape == (2, 4, 7, 8)
    pieces = [logits]
    for t in range(7, 12):
        logits, cache = ours(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
        pieces.append(logits)
    _close(torch.cat(pieces, dim=1), full, torch.float64)
    _close(full, hf(input_ids=ids).logits, torch.float64)


def test_gpt_greedy_generate_equals_hf():
    # a wide init makes the argmax decisive (the default 0.02 gives near-uniform logits that repeat
    # one token); float64 leaves no near-ties to rounding
    hf = _hf_gpt(initializer_range=0.3)
    ours = GPT.from_hf(hf)
    ids = _ids(3, 6, 100) + 1
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
    ids = _ids(3, 4, 61)
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
    ids = _ids(4, 16, 64)
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
    ids = _ids(2, 7, 50)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, 5:] = 0
    compiled = torch.compile(gpt, fullgraph=True, backend="aot_eager")
    _close(compiled(ids, attention_mask=mask), gpt(ids, attention_mask=mask), torch.float32)


# --------------------------------------------------------------------------------------------
# T5 and ViT
# --------------------------------------------------------------------------------------------


def _rms_norm_in_input_dtype(self, h):
    return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


class _KeepFloat64(torch.overrides.TorchFunctionMode):
    """``t.float()`` on a float64 tensor returns it unchanged."""

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        if func is torch.Tensor.float and args[0].dtype == torch.float64:
            return args[0]
        return func(*args, **(kwargs or {}))


def _attention_in_input_dtype(forward):
    def run(*args, **kwargs):
        with _KeepFloat64():
            return forward(*args, **kwargs)
    return run


def _t5_norms_in_input_dtype(hf):
    """Hugging Face's T5LayerNorm takes the variance in float32 even for float64 input (a 1e-7
    error), and transformers 4.x T5Attention its softmax (``scores.float()``); for the float64
    comparison the oracle computes both in float64, same formulas."""
    for module in hf.modules():
        if type(module).__name__ == "T5LayerNorm":
            module.forward = types.MethodType(_rms_norm_in_input_dtype, module)
        if type(module).__name__ == "T5Attention":
            module.forward = _attention_in_input_dtype(module.forward)


# tie_word_embeddings=False is how T5 v1.1 configs say "do not scale the decoder output"
@pytest.mark.parametrize("ff_proj,dtype,extra", [("gated-gelu", torch.float64, {"tie_word_embeddings": False}),
                                                 ("relu", torch.float64, {}), ("gated-gelu", torch.float32, {})])
def test_t5_matches_hf(ff_proj, dtype, extra):
    config = transformers.T5Config(vocab_size=83, d_model=32, d_kv=8, d_ff=40, num_layers=2, num_decoder_layers=3,
                                   num_heads=4, **extra, relative_attention_num_buckets=8,
                                   relative_attention_max_distance=20, feed_forward_proj=ff_proj,
                                   decoder_start_token_id=0, pad_token_id=0)
    hf = _hf(transformers.T5ForConditionalGeneration(config), dtype)
    if dtype == torch.float64:
        _t5_norms_in_input_dtype(hf)
    ours = T5.from_hf(hf).eval()
    assert ours.config.scale_decoder_outputs == extra.get("tie_word_embeddings", True)
    ids, dec = _ids(2, 14, 83), _ids(2, 9, 83, seed=5)
    mask = torch.ones(2, 14, dtype=torch.long)
    mask[0, 10:] = 0
    dec_mask = torch.ones(2, 9, dtype=torch.long)
    dec_mask[1, 6:] = 0
    ref = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask).logits
    logits = ours(ids, dec, attention_mask=mask, decoder_attention_mask=dec_mask)
    _close(logits, ref, dtype)
    _grad_check(logits, ref, [
        (ours.shared.weight, hf.shared.weight, lambda t: t),
        (ours.encoder.relative_bias.relative_attention_bias.weight,
         hf.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight, lambda t: t),
        (ours.decoder.relative_bias.relative_attention_bias.weight,
         hf.decoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight, lambda t: t),
        (ours.decoder.blocks[2].cross_attn.v_proj.weight, hf.decoder.block[2].layer[1].EncDecAttention.v.weight,
         lambda t: t)], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_vit_matches_hf_classifier_and_hidden(dtype):
    config = transformers.ViTConfig(image_size=12, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=4, intermediate_size=40, num_labels=5)
    hf = _hf(transformers.ViTForImageClassification(config), dtype)
    ours = ViT.from_hf(hf).eval()
    pixels = torch.randn(2, 3, 12, 12, dtype=dtype)
    out = hf(pixel_values=pixels, output_hidden_states=True)
    hidden = ours(pixels)
    assert hidden.shape == (2, 10, 32)
    _close(hidden, hf.vit.layernorm(out.hidden_states[-1]), dtype)
    logits = ours.classify(pixels)
    _close(logits, out.logits, dtype)
    _grad_check(logits, out.logits, [
        (ours.patch_embed.weight, hf.vit.embeddings.patch_embeddings.projection.weight, lambda t: t),
        (ours.cls_token, hf.vit.embeddings.cls_token, lambda t: t),
        (ours.ln_f.weight, hf.vit.layernorm.weight, lambda t: t)], dtype)
    vit_model = _hf(transformers.ViTModel(config, add_pooling_layer=False), dtype)
    _close(ViT.from_hf(vit_model).eval()(pixels), vit_model(pixel_values=pixels).last_hidden_state, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("family", ["gpt", "bert"])
def test_low_precision_within_2x_of_hf_error(family, dtype):
    """Against the float64 Hugging Face model as oracle, our low-precision error stays within
    2x of Hugging Face's own error in that dtype plus the parity floor (fusedformer.parity's rule)."""
    hf64 = _hf_gpt() if family == "gpt" else _hf_bert()
    ids = _ids(2, 10, 97)
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


def _ddp_worker(rank, world, port, out_dir):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    model = torch.nn.parallel.DistributedDataParallel(_tiny_gpt())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ids = _ids(4, 9, 40)
    for _ in range(2):
        opt.zero_grad()
        _gpt_loss(model, ids[rank * 2:(rank + 1) * 2]).backward()
        opt.step()
    if rank == 0:
        torch.save(model.module.state_dict(), os.path.join(out_dir, "ddp.pt"))
    # Tear down in order, then leave without interpreter teardown: a DDP reducer still holding the
    # gloo group when Python finalizes destroys its threads unjoined, and the worker aborts
    # ("terminate called without an active exception") now and then.
    torch.distributed.barrier()
    del model, opt
    torch.distributed.destroy_process_group()
    os._exit(0)


def test_ddp_two_processes_match_single_process(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    model = _tiny_gpt()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ids = _ids(4, 9, 40)
    for _ in range(2):
        opt.zero_grad()
        _gpt_loss(model, ids).backward()  # the mean over both halves = DDP's averaged gradient
        opt.step()
    ddp_state = torch.load(tmp_path / "ddp.pt")
    for name, value in model.state_dict().items():
        torch.testing.assert_close(ddp_state[name], value, atol=1e-6, rtol=1e-5)


def _triton_reason(*families):
    for family in families:
        reason = backends.unsupported_reason("triton", family, "cpu")
        if reason is not None:
            return f"triton {family}: {reason}"
    return None


@pytest.mark.skipif(_triton_reason("attention", "layer_norm", "linear_act") is not None,
                    reason=str(_triton_reason("attention", "layer_norm", "linear_act")))
def test_gpt_on_triton_backend_matches_reference():
    gpt = GPT(GPTConfig(vocab_size=32, n_layer=1, n_head=2, n_embd=32, n_positions=16)).eval()
    ids = _ids(1, 5, 32)
    ref = gpt(ids)
    with ff.use_backend("triton"):
        out = gpt(ids)
    _close(out, ref, torch.float32)


# --------------------------------------------------------------------------------------------
# T5 generation and ViT position-embedding interpolation
# --------------------------------------------------------------------------------------------


def _hf_t5(ff_proj, bias_scale=1.0, **kwargs):
    # initializer_factor 4 makes the argmax decisive and varied (the default 1 gives near-uniform
    # logits that repeat one token); float64 with float64 norms leaves no near-ties to rounding
    config = transformers.T5Config(vocab_size=53, d_model=32, d_kv=8, d_ff=40, num_layers=2, num_decoder_layers=2,
                                   num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=12,
                                   feed_forward_proj=ff_proj, decoder_start_token_id=0, pad_token_id=0,
                                   initializer_factor=4.0, **kwargs)
    torch.manual_seed(0)
    hf = transformers.T5ForConditionalGeneration(config).double().eval()
    _t5_norms_in_input_dtype(hf)
    with torch.no_grad():  # a bias strong enough that a wrong cached query position changes the argmax
        for stack in (hf.encoder, hf.decoder):
            stack.block[0].layer[0].SelfAttention.relative_attention_bias.weight.mul_(bias_scale)
    return hf


@pytest.mark.parametrize("ff_proj", ["relu", "gated-gelu"])
def test_t5_greedy_generate_equals_hf(ff_proj):
    hf = _hf_t5(ff_proj, bias_scale=20.0, eos_token_id=None)
    ours = T5.from_hf(hf)
    ids = _ids(3, 7, 53, seed=2) + 1
    mask = torch.ones_like(ids)
    mask[1, 5:], ids[1, 5:] = 0, 0  # right padding, masked in the encoder and in cross-attention
    mask[2, 2:], ids[2, 2:] = 0, 0
    new = 14  # past relative_attention_max_distance: the far, log-spaced buckets are used too
    # transformers 4.x generate() infers a mask from pad_token_id when given none; ours attends to
    # every token then, so HF gets the explicit all-ones mask that means the same
    no_mask = None if Version(transformers.__version__).major >= 5 else torch.ones_like(ids)
    for m in (mask, None):
        expect = hf.generate(ids, attention_mask=m if m is not None else no_mask, max_new_tokens=new,
                             do_sample=False, num_beams=1)
        got = ours.generate(ids, new, attention_mask=m)
        assert got.shape == (3, 1 + new) and len(set(got[:, 1:].flatten().tolist())) > 5
        assert torch.equal(got, expect)
    # an eos that sequence 0 emits mid-way: it is followed by padding (pad_token_id 0), as in HF
    eos = int(got[0, 4])
    expect = hf.generate(ids, attention_mask=no_mask, max_new_tokens=new, do_sample=False, num_beams=1,
                         eos_token_id=eos)
    got = ours.generate(ids, new, eos_token_id=eos)
    assert (got[0, 5:] == 0).all() and torch.equal(got, expect)


def test_t5_cached_decode_step_equals_full_decoder_forward():
    hf = _hf_t5("gated-gelu", bias_scale=20.0)
    ours = T5.from_hf(hf)
    ids, dec = _ids(2, 9, 53), _ids(2, 15, 53, seed=4)
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    memory = ours.encode(ids, mask)
    full = ours.decode(dec, memory, mask)
    pieces, cache = [], None
    for a, b in ((0, 5), (5, 6), (6, 7), (7, 15)):  # a prefix, single steps, then a chunk
        logits, cache = ours.decode(dec[:, a:b], memory, mask, past_key_values=cache, use_cache=True)
        pieces.append(logits)
        assert cache[0][0][0].shape[2] == b and cache[0][1][0].shape[2] == 9  # self K/V grow, cross K/V stay
    _close(torch.cat(pieces, dim=1), full, torch.float64)
    _close(full, hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits, torch.float64)


def test_t5_sampling_reproducible_and_bad_input():
    ours = T5.from_hf(_hf_t5("relu"))
    ids = _ids(2, 5, 53)
    a = ours.generate(ids, 6, do_sample=True, temperature=0.7, top_k=5, generator=torch.Generator().manual_seed(3))
    b = ours.generate(ids, 6, do_sample=True, temperature=0.7, top_k=5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == (2, 7) and (a[:, 0] == 0).all()
    assert torch.equal(ours.generate(ids, 6, do_sample=True, top_k=1), ours.generate(ids, 6))
    assert torch.equal(ours.generate(ids, 3, decoder_start_token_id=7)[:, 0], torch.tensor([7, 7]))
    for kwargs, name in (({"do_sample": True, "temperature": 0.0}, "temperature"), ({"top_k": 0}, "top_k"),
                         ({"eos_token_id": 53}, "eos_token_id"), ({"decoder_start_token_id": -1},
                                                                  "decoder_start_token_id")):
        with pytest.raises(ValueError, match=name):
            ours.generate(ids, 2, **kwargs)
    with pytest.raises(ValueError, match="max_new_tokens"):
        ours.generate(ids, -1)
    with pytest.raises(ValueError, match="attention_mask"):
        ours.generate(ids, 2, attention_mask=torch.ones(2, 4, dtype=torch.long))


@pytest.mark.parametrize("dtype", DTYPES)
def test_vit_interpolate_pos_encoding_matches_hf(dtype):
    config = transformers.ViTConfig(image_size=12, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=4, intermediate_size=40, num_labels=5)
    hf = _hf(transformers.ViTForImageClassification(config), dtype)
    ours = ViT.from_hf(hf).eval()
    for h, w in ((20, 16), (8, 8), (12, 12)):  # a larger, non-square grid; a smaller one; unchanged
        pixels = torch.randn(2, 3, h, w, dtype=dtype)
        out = hf(pixel_values=pixels, interpolate_pos_encoding=True, output_hidden_states=True)
        hidden = ours(pixels, interpolate_pos_encoding=True)
        assert hidden.shape == (2, 1 + (h // 4) * (w // 4), 32)
        _close(hidden, hf.vit.layernorm(out.hidden_states[-1]), dtype)
        logits = ours.classify(pixels, interpolate_pos_encoding=True)
        _close(logits, out.logits, dtype)
    _grad_check(logits, out.logits, [(ours.position_embeddings, hf.vit.embeddings.position_embeddings, lambda t: t)],
                dtype)
    pixels = torch.randn(1, 3, 20, 16, dtype=dtype)
    vit_model = _hf(transformers.ViTModel(config, add_pooling_layer=False), dtype)
    _close(ViT.from_hf(vit_model).eval()(pixels, interpolate_pos_encoding=True),
           vit_model(pixel_values=pixels, interpolate_pos_encoding=True).last_hidden_state, dtype)
    with pytest.raises(ValueError, match="interpolate_pos_encoding"):
        ours(pixels)
    with pytest.raises(ValueError, match="multiples of patch_size"):
        ours(torch.randn(1, 3, 14, 16, dtype=dtype), interpolate_pos_encoding=True)

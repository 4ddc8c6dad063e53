"""fusedformer.models' T5 and ViT against Hugging Face transformers: weights imported with from_hf give
the same outputs and gradients (float64 and float32, reference backend), T5's greedy generation
and cached decoding match, ViT interpolates position embeddings as Hugging Face does. Hugging Face
models are built from small random configs; nothing is downloaded."""

import types

import pytest
import torch
from _models_testing import DTYPES, close, grad_check, hf_eval, random_ids
from fusedformer.models import T5, ViT
from packaging.version import Version

transformers = pytest.importorskip("transformers")


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
    hf = hf_eval(transformers.T5ForConditionalGeneration(config), dtype)
    if dtype == torch.float64:
        _t5_norms_in_input_dtype(hf)
    ours = T5.from_hf(hf).eval()
    assert ours.config.scale_decoder_outputs == extra.get("tie_word_embeddings", True)
    ids, dec = random_ids(2, 14, 83), random_ids(2, 9, 83, seed=5)
    mask = torch.ones(2, 14, dtype=torch.long)
    mask[0, 10:] = 0
    dec_mask = torch.ones(2, 9, dtype=torch.long)
    dec_mask[1, 6:] = 0
    ref = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask).logits
    logits = ours(ids, dec, attention_mask=mask, decoder_attention_mask=dec_mask)
    close(logits, ref, dtype)
    grad_check(logits, ref, [
        (ours.shared.weight, hf.shared.weight, lambda t: t),
        (ours.encoder.relative_bias.relative_attention_bias.weight,
         hf.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight, lambda t: t),
        (ours.decoder.relative_bias.relative_attention_bias.weight,
         hf.decoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight, lambda t: t),
        (ours.decoder.blocks[2].cross_attn.v_proj.weight, hf.decoder.block[2].layer[1].EncDecAttention.v.weight,
         lambda t: t)], dtype)


def _vit_pair(dtype):
    """A small random Hugging Face ViT classifier and ours imported from it."""
    config = transformers.ViTConfig(image_size=12, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=4, intermediate_size=40, num_labels=5)
    hf = hf_eval(transformers.ViTForImageClassification(config), dtype)
    return hf, ViT.from_hf(hf).eval()


@pytest.mark.parametrize("dtype", DTYPES)
def test_vit_matches_hf_classifier_and_hidden(dtype):
    hf, ours = _vit_pair(dtype)
    pixels = torch.randn(2, 3, 12, 12, dtype=dtype)
    out = hf(pixel_values=pixels, output_hidden_states=True)
    hidden = ours(pixels)
    assert hidden.shape == (2, 10, 32)
    close(hidden, hf.vit.layernorm(out.hidden_states[-1]), dtype)
    logits = ours.classify(pixels)
    close(logits, out.logits, dtype)
    grad_check(logits, out.logits, [
        (ours.patch_embed.weight, hf.vit.embeddings.patch_embeddings.projection.weight, lambda t: t),
        (ours.cls_token, hf.vit.embeddings.cls_token, lambda t: t),
        (ours.ln_f.weight, hf.vit.layernorm.weight, lambda t: t)], dtype)
    vit_model = hf_eval(transformers.ViTModel(hf.config, add_pooling_layer=False), dtype)
    close(ViT.from_hf(vit_model).eval()(pixels), vit_model(pixel_values=pixels).last_hidden_state, dtype)


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
    ids = random_ids(3, 7, 53, seed=2) + 1
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
    ids, dec = random_ids(2, 9, 53), random_ids(2, 15, 53, seed=4)
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    memory = ours.encode(ids, mask)
    full = ours.decode(dec, memory, mask)
    pieces, cache = [], None
    for a, b in ((0, 5), (5, 6), (6, 7), (7, 15)):  # a prefix, single steps, then a chunk
        logits, cache = ours.decode(dec[:, a:b], memory, mask, past_key_values=cache, use_cache=True)
        pieces.append(logits)
        assert cache[0][0][0].shape[2] == b and cache[0][1][0].shape[2] == 9  # self K/V grow, cross K/V stay
    close(torch.cat(pieces, dim=1), full, torch.float64)
    close(full, hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits, torch.float64)


def test_t5_sampling_reproducible_and_bad_input():
    ours = T5.from_hf(_hf_t5("relu"))
    ids = random_ids(2, 5, 53)
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
    hf, ours = _vit_pair(dtype)
    for h, w in ((20, 16), (8, 8), (12, 12)):  # a larger, non-square grid; a smaller one; unchanged
        pixels = torch.randn(2, 3, h, w, dtype=dtype)
        out = hf(pixel_values=pixels, interpolate_pos_encoding=True, output_hidden_states=True)
        hidden = ours(pixels, interpolate_pos_encoding=True)
        assert hidden.shape == (2, 1 + (h // 4) * (w // 4), 32)
        close(hidden, hf.vit.layernorm(out.hidden_states[-1]), dtype)
        logits = ours.classify(pixels, interpolate_pos_encoding=True)
        close(logits, out.logits, dtype)
    grad_check(logits, out.logits, [(ours.position_embeddings, hf.vit.embeddings.position_embeddings, lambda t: t)],
                dtype)
    pixels = torch.randn(1, 3, 20, 16, dtype=dtype)
    vit_model = hf_eval(transformers.ViTModel(hf.config, add_pooling_layer=False), dtype)
    close(ViT.from_hf(vit_model).eval()(pixels, interpolate_pos_encoding=True),
           vit_model(pixel_values=pixels, interpolate_pos_encoding=True).last_hidden_state, dtype)
    with pytest.raises(ValueError, match="interpolate_pos_encoding"):
        ours(pixels)
    with pytest.raises(ValueError, match="multiples of patch_size"):
        ours(torch.randn(1, 3, 14, 16, dtype=dtype), interpolate_pos_encoding=True)

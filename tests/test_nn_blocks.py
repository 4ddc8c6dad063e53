"""fusedformer.nn's building blocks (Attention with GQA, KV cache, rotary and ALiBi; positional
encodings; relative position bias; FeedForward; Residual) against the formulas their docstrings
state, bad arguments, and torch.compile(fullgraph=True)."""

import math

import fusedformer as ff
import pytest
import torch
import torch.nn.functional as F
from _nn_testing import close
from fusedformer.reference import attention_forward

# --------------------------------------------------------------------------------------------
# building blocks against their formulas
# --------------------------------------------------------------------------------------------


def _naive_attention(q, k, v, bias=None, causal=False, scale=None):
    """softmax(q k^T * scale + bias) v with kv heads repeated for GQA, written out."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = q @ k.transpose(-1, -2) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if bias is not None:
        s = s + bias
    if causal:
        L, S = s.shape[-2:]
        s = s.masked_fill(torch.ones(L, S, dtype=torch.bool).tril(S - L).logical_not(), float("-inf"))
    return s.softmax(-1) @ v


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
def test_attention_block_gqa_matches_formula(num_kv_heads):
    attn = ff.nn.Attention(24, 4, num_kv_heads, dtype=torch.float64, causal=True)
    x = torch.randn(2, 7, 24, dtype=torch.float64)
    out = attn(x)
    q = (x @ attn.q_proj.weight.T + attn.q_proj.bias).view(2, 7, 4, 6).transpose(1, 2)
    k = (x @ attn.k_proj.weight.T + attn.k_proj.bias).view(2, 7, num_kv_heads, 6).transpose(1, 2)
    v = (x @ attn.v_proj.weight.T + attn.v_proj.bias).view(2, 7, num_kv_heads, 6).transpose(1, 2)
    o = _naive_attention(q, k, v, causal=True).transpose(1, 2).reshape(2, 7, 24)
    close(out, o @ attn.o_proj.weight.T + attn.o_proj.bias)


@pytest.mark.parametrize("kind", ["plain", "rotary", "alibi"])
def test_attention_block_kv_cache_equals_full_pass(kind):
    rotary = ff.nn.RotaryEmbedding(6) if kind == "rotary" else None
    attn = ff.nn.Attention(24, 4, 2, dtype=torch.float64, causal=True, rotary=rotary, alibi=kind == "alibi")
    x = torch.randn(2, 9, 24, dtype=torch.float64)
    full = attn(x)
    out, cache = attn(x[:, :5], use_cache=True)
    pieces = [out]
    for t in range(5, 9):
        out, cache = attn(x[:, t:t + 1], past_key_value=cache, use_cache=True)
        pieces.append(out)
    close(torch.cat(pieces, dim=1), full)


def test_cross_attention_block_and_its_cache():
    attn = ff.nn.Attention(16, 4, kv_dim=10, cross=True, dtype=torch.float64)
    x, mem = torch.randn(2, 5, 16, dtype=torch.float64), torch.randn(2, 8, 10, dtype=torch.float64)
    keep = torch.ones(2, 1, 1, 8, dtype=torch.bool)
    keep[1, ..., 6:] = False
    out, cache = attn(x, memory=mem, attn_mask=keep, use_cache=True)
    q = (x @ attn.q_proj.weight.T + attn.q_proj.bias).view(2, 5, 4, 4).transpose(1, 2)
    k = (mem @ attn.k_proj.weight.T + attn.k_proj.bias).view(2, 8, 4, 4).transpose(1, 2)
    v = (mem @ attn.v_proj.weight.T + attn.v_proj.bias).view(2, 8, 4, 4).transpose(1, 2)
    bias = torch.zeros(2, 1, 1, 8, dtype=torch.float64).masked_fill(~keep, float("-inf"))
    o = _naive_attention(q, k, v, bias).transpose(1, 2).reshape(2, 5, 16)
    close(out, o @ attn.o_proj.weight.T + attn.o_proj.bias)
    close(attn(x, attn_mask=keep, past_key_value=cache), out)
    with pytest.raises(ValueError, match="memory"):
        attn(x)


def test_sinusoidal_table_formula():
    table = ff.nn.sinusoidal_table(11, 8, dtype=torch.float64)
    p, i = 7, 3
    assert math.isclose(table[p, 2 * i], math.sin(p / 10000 ** (2 * i / 8)), abs_tol=1e-12)
    assert math.isclose(table[p, 2 * i + 1], math.cos(p / 10000 ** (2 * i / 8)), abs_tol=1e-12)
    enc = ff.nn.SinusoidalPositionalEncoding(8, max_positions=16, dtype=torch.float64)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    close(enc(x, offset=3), x + table[3:8])
    assert not enc.state_dict()
    with pytest.raises(ValueError, match="max_positions"):
        enc(x, offset=12)


def test_learned_positional_embedding():
    emb = ff.nn.LearnedPositionalEmbedding(10, 4, dtype=torch.float64)
    x = torch.randn(3, 6, 4, dtype=torch.float64)
    close(emb(x, offset=2), x + emb.weight[2:8])
    close(emb(position_ids=torch.tensor([[0, 9]])), emb.weight[[0, 9]][None])


def test_rotary_scores_depend_on_relative_position_only():
    rope = ff.nn.RotaryEmbedding(8)
    q, k = torch.randn(1, 1, 1, 8, dtype=torch.float64), torch.randn(1, 1, 1, 8, dtype=torch.float64)
    scores = []
    for offset in (0, 5, 17):
        qa, _ = rope(q, k, offset=offset + 3)
        _, kb = rope(q, k, offset=offset)
        scores.append((qa * kb).sum().item())
    assert max(scores) - min(scores) < 1e-10
    qr, _ = rope(q, k, offset=0)
    close(qr, q)  # position 0 is the identity
    q10 = torch.randn(1, 1, 3, 10, dtype=torch.float64)
    close(rope(q10, q10)[0][..., 8:], q10[..., 8:])  # partial rotary keeps the tail


def test_alibi_slopes():
    close(ff.nn.alibi_slopes(8, dtype=torch.float64), torch.tensor([2.0 ** (-h) for h in range(1, 9)],
                                                                    dtype=torch.float64))
    s6 = ff.nn.alibi_slopes(6, dtype=torch.float64)
    expect = [2.0 ** (-2 * h) for h in range(1, 5)] + [2.0 ** (-1), 2.0 ** (-3)]
    close(s6, torch.tensor(expect, dtype=torch.float64))
    bias = ff.nn.alibi_bias(s6, 3, 5, offset=2)
    assert bias[1, 2, 0].item() == -s6[1].item() * 4
    with pytest.raises(ValueError, match="num_heads"):
        ff.nn.alibi_slopes(0)


def test_relative_position_buckets():
    rel = torch.arange(-200, 201)
    b = ff.nn.relative_position_bucket(rel, bidirectional=True, num_buckets=32, max_distance=128)
    assert b.min() == 0 and b.max() == 31
    # exact buckets for small distances, one side per half
    assert b[200].item() == 0 and b[201].item() == 17 and b[199].item() == 1 and b[207].item() == 16 + 7
    assert b[0].item() == 15 and b[-1].item() == 31  # far distances saturate
    u = ff.nn.relative_position_bucket(rel, bidirectional=False, num_buckets=32, max_distance=128)
    assert torch.all(u[201:] == 0) and u[199].item() == 1 and u[0].item() == 31
    assert torch.all(b.diff()[200:] >= 0) and torch.all(u.diff()[:200] <= 0)
    bias = ff.nn.RelativePositionBias(3, dtype=torch.float64)
    out = bias(4, 6)
    assert out.shape == (1, 3, 4, 6)
    close(out[0, :, 2, 5], bias.relative_attention_bias.weight[17 + 2])  # j - i = 3


@pytest.mark.parametrize("activation", ["gelu", "relu", "swiglu", "geglu", "geglu_tanh"])
def test_feed_forward_block_formula(activation):
    ffn = ff.nn.FeedForward(12, 20, activation, dtype=torch.float64)
    x = torch.randn(3, 4, 12, dtype=torch.float64)
    h = x @ ffn.w1.weight.T + ffn.w1.bias
    acts = {"gelu": F.gelu, "relu": F.relu, "swiglu": F.silu, "geglu": F.gelu,
            "geglu_tanh": lambda t: F.gelu(t, approximate="tanh")}
    if activation in ("gelu", "relu"):
        h = acts[activation](h)
    else:
        gate, up = h.chunk(2, -1)
        h = acts[activation](gate) * up
    close(ffn(x), h @ ffn.w2.weight.T + ffn.w2.bias)
    with pytest.raises(ValueError, match="activation"):
        ff.nn.FeedForward(4, 8, "tanh")


@pytest.mark.parametrize("norm,norm_first", [("layer", True), ("layer", False), ("rms", True)])
def test_residual_pre_and_post_norm(norm, norm_first):
    sub = torch.nn.Linear(8, 8, dtype=torch.float64)
    block = ff.nn.Residual(sub, 8, norm=norm, norm_first=norm_first, dtype=torch.float64)
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    ref_norm = (torch.nn.LayerNorm(8, dtype=torch.float64) if norm == "layer"
                else torch.nn.RMSNorm(8, eps=1e-5, dtype=torch.float64))
    ref_norm.load_state_dict(block.norm.state_dict())
    expect = x + sub(ref_norm(x)) if norm_first else ref_norm(x + sub(x))
    close(block(x), expect)


# --------------------------------------------------------------------------------------------
# torch.compile, bad arguments, the oracle
# --------------------------------------------------------------------------------------------


def test_attention_block_under_compile_fullgraph():
    torch._dynamo.reset()
    attn = ff.nn.Attention(16, 4, 2, causal=True, rotary=ff.nn.RotaryEmbedding(4))
    x = torch.randn(2, 6, 16)
    compiled = torch.compile(attn, fullgraph=True, backend="aot_eager")
    close(compiled(x), attn(x), torch.float32)


def test_building_blocks_reject_bad_arguments():
    with pytest.raises(ValueError, match="num_heads"):
        ff.nn.Attention(10, 4)
    with pytest.raises(ValueError, match="num_kv_heads"):
        ff.nn.Attention(16, 4, 3)
    with pytest.raises(ValueError, match="memory"):
        ff.nn.Attention(16, 4, cross=True)(torch.randn(1, 3, 16), memory=torch.randn(3, 16))
    with pytest.raises(ValueError, match="norm"):
        ff.nn.Residual(torch.nn.Identity(), 8, norm="batch")
    with pytest.raises(ValueError, match="even"):
        ff.nn.RotaryEmbedding(5)
    with pytest.raises(ValueError, match="rotary dim"):
        rope = ff.nn.RotaryEmbedding(8)
        rope(torch.randn(1, 2, 6), torch.randn(1, 2, 6))
    with pytest.raises(TypeError, match="activation"):
        ff.nn.TransformerEncoderLayer(8, 2, activation=3)


def test_reference_attention_agrees_with_naive_formula():
    """The oracle the modules run on CPU, checked against the formula the docstrings state."""
    q, k, v = (torch.randn(1, 2, 4, 3, dtype=torch.float64) for _ in range(3))
    out, _ = attention_forward(q, k, v, None, True, 3 ** -0.5)
    close(out, _naive_attention(q, k, v, causal=True))

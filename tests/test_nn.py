"""fusedformer.nn against torch.nn: checkpoints load both ways (strict), same outputs and
gradients (float64, reference backend), masks in torch's convention, the building blocks against
their formulas, torch.compile(fullgraph=True), and the triton backend where one exists."""

import math

import fusedformer as ff
import pytest
import torch
import torch.nn.functional as F
from fusedformer import backends
from fusedformer.reference import attention_forward

# float64 parity: both sides compute the same math in a different order
TOL = {torch.float64: 1e-10, torch.float32: 2e-5}


def _twin(ours, theirs):
    """Load ours' weights into theirs and back: both directions strict, keys identical."""
    assert list(ours.state_dict()) == list(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict(), strict=True)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs


def _close(a, b, dtype=torch.float64):
    tol = TOL[dtype]
    assert a.shape == b.shape
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def _compare(ours, theirs, inputs, dtype=torch.float64, modules=None):
    """Same output and the same gradients for every parameter (of ``modules``, default ours and
    theirs) and every floating input."""
    inputs_a = [t.clone().requires_grad_(t.is_floating_point()) if isinstance(t, torch.Tensor) else t for t in inputs]
    inputs_b = [t.clone().requires_grad_(t.is_floating_point()) if isinstance(t, torch.Tensor) else t for t in inputs]
    ya, yb = ours(*inputs_a), theirs(*inputs_b)
    _close(ya, yb, dtype)
    g = torch.randn_like(ya)
    (ya * g).sum().backward()
    (yb * g).sum().backward()
    mod_a, mod_b = modules or (ours, theirs)
    for (name, pa), (_, pb) in zip(mod_a.named_parameters(), mod_b.named_parameters()):
        assert (pa.grad is None) == (pb.grad is None), name
        if pa.grad is not None:
            _close(pa.grad, pb.grad, dtype)
    for a, b in zip(inputs_a, inputs_b):
        if isinstance(a, torch.Tensor) and a.is_floating_point() and b.grad is not None:
            _close(a.grad, b.grad, dtype)
    return ya


# --------------------------------------------------------------------------------------------
# norms
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape,normalized", [((7, 33), 33), ((2, 3, 5, 8), (5, 8)), ((1, 113), 113)])
@pytest.mark.parametrize("kwargs", [{}, {"elementwise_affine": False}, {"bias": False}, {"eps": 1e-3}])
def test_layer_norm_matches_torch(shape, normalized, kwargs):
    ours = ff.nn.LayerNorm(normalized, dtype=torch.float64, **kwargs)
    theirs = torch.nn.LayerNorm(normalized, dtype=torch.float64, **kwargs)
    if ours.weight is not None:
        torch.nn.init.normal_(ours.weight)
    if ours.bias is not None:
        torch.nn.init.normal_(ours.bias)
    _twin(ours, theirs)
    assert repr(ours).split("(", 1)[1] == repr(theirs).split("(", 1)[1]
    _compare(ours, theirs, [torch.randn(shape, dtype=torch.float64) * 3 + 1])


@pytest.mark.parametrize("eps", [None, 1e-6])
@pytest.mark.parametrize("elementwise_affine", [True, False])
def test_rms_norm_matches_torch(eps, elementwise_affine):
    ours = ff.nn.RMSNorm(37, eps=eps, elementwise_affine=elementwise_affine, dtype=torch.float64)
    theirs = torch.nn.RMSNorm(37, eps=eps, elementwise_affine=elementwise_affine, dtype=torch.float64)
    if ours.weight is not None:
        torch.nn.init.normal_(ours.weight)
    _twin(ours, theirs)
    assert repr(ours).split("(", 1)[1] == repr(theirs).split("(", 1)[1]
    _compare(ours, theirs, [torch.randn(3, 7, 37, dtype=torch.float64)])


@pytest.mark.parametrize("cls", [ff.nn.LayerNorm, ff.nn.RMSNorm])
def test_norm_residual_returns_norm_of_sum_and_sum(cls):
    norm = cls(16, dtype=torch.float64)
    x, r = torch.randn(4, 16, dtype=torch.float64), torch.randn(4, 16, dtype=torch.float64)
    y, h = norm(x, residual=r)
    _close(h, x + r)
    _close(y, norm(x + r))


# --------------------------------------------------------------------------------------------
# MultiheadAttention
# --------------------------------------------------------------------------------------------


def _mha_pair(E=16, H=4, **kwargs):
    torch.manual_seed(1)
    ours = ff.nn.MultiheadAttention(E, H, dtype=torch.float64, **kwargs)
    theirs = torch.nn.MultiheadAttention(E, H, dtype=torch.float64, **kwargs)
    for p in ours.parameters():  # torch zeroes the biases; random ones test them
        torch.nn.init.normal_(p, std=0.3)
    ours, theirs = _twin(ours, theirs)
    ours.eval(), theirs.eval()
    return ours, theirs


def _kpm(N, S, kind):
    keep = torch.ones(N, S, dtype=torch.bool)
    keep[-1, S // 2:] = False  # pad the last sequence
    pad = ~keep
    return pad if kind == "bool" else torch.zeros(N, S, dtype=torch.float64).masked_fill(pad, float("-inf"))


def _attn_mask(L, S, kind, N=None, H=None):
    torch.manual_seed(2)
    shape = (L, S) if N is None else (N * H, L, S)
    forbid = torch.rand(shape) < 0.3
    forbid[..., 0] = False  # every query keeps a key: torch gives NaN for empty rows
    if kind == "bool":
        return forbid
    return torch.randn(shape, dtype=torch.float64).masked_fill(forbid, float("-inf"))


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights,average", [(False, True), (True, True), (True, False)])
@pytest.mark.parametrize("mask_kind", [None, "bool", "float", "bool3d", "float3d"])
def test_mha_self_attention_matches_torch(batch_first, need_weights, average, mask_kind):
    N, L, E, H = 3, 7, 16, 4
    ours, theirs = _mha_pair(E, H, batch_first=batch_first)
    x = torch.randn((N, L, E) if batch_first else (L, N, E), dtype=torch.float64)
    kpm = attn_mask = None
    if mask_kind is not None:
        kind = mask_kind[:-2] if mask_kind.endswith("3d") else mask_kind
        kpm = _kpm(N, L, kind)
        attn_mask = _attn_mask(L, L, kind, *((N, H) if mask_kind.endswith("3d") else ()))

    def run(m, q):
        out, w = m(q, q, q, key_padding_mask=kpm, need_weights=need_weights, attn_mask=attn_mask,
                   average_attn_weights=average)
        assert (w is None) == (not need_weights)
        return out if w is None else torch.cat([out.flatten(), w.flatten()])

    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = run(ours, xa), run(theirs, xb)
    _close(ya, yb)
    g = torch.randn_like(ya)
    (ya * g).sum().backward()
    (yb * g).sum().backward()
    _close(xa.grad, xb.grad)
    for pa, pb in zip(ours.parameters(), theirs.parameters()):
        _close(pa.grad, pb.grad)


@pytest.mark.parametrize("kwargs", [{"kdim": 6, "vdim": 10}, {"bias": False}, {"add_bias_kv": True},
                                    {"add_zero_attn": True}, {"add_bias_kv": True, "add_zero_attn": True}])
def test_mha_cross_attention_options_match_torch(kwargs):
    N, L, S, E = 2, 5, 9, 16
    ours, theirs = _mha_pair(E, 4, batch_first=True, **kwargs)
    q = torch.randn(N, L, E, dtype=torch.float64)
    k = torch.randn(N, S, kwargs.get("kdim", E), dtype=torch.float64)
    v = torch.randn(N, S, kwargs.get("vdim", E), dtype=torch.float64)
    kpm = _kpm(N, S, "float")
    am = _attn_mask(L, S, "float")

    def run(m):
        def f(q, k, v):
            return m(q, k, v, key_padding_mask=kpm, attn_mask=am, need_weights=False)[0]
        return f

    _compare(run(ours), run(theirs), [q, k, v], modules=(ours, theirs))


def test_mha_unbatched_and_causal():
    ours, theirs = _mha_pair(16, 2)
    x = torch.randn(6, 16, dtype=torch.float64)
    causal_bool = torch.ones(6, 6, dtype=torch.bool).triu(1)
    ref = theirs(x, x, x, attn_mask=causal_bool, is_causal=True, need_weights=False)[0]
    _close(ours(x, x, x, attn_mask=causal_bool, is_causal=True, need_weights=False)[0], ref)
    _close(ours(x, x, x, is_causal=True, need_weights=False)[0], ref)  # mask optional here
    out, w = ours(x, x, x, is_causal=True)
    assert w.shape == (6, 6) and torch.all(w.triu(1) == 0)
    _close(out, ref)


def test_mha_fully_masked_rows_give_zeros_not_nan():
    ours, _ = _mha_pair(16, 4, batch_first=True)
    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    mask = torch.zeros(5, 5, dtype=torch.bool)
    mask[2] = True  # query 2 may attend nothing
    for need_weights in (False, True):
        out, _ = ours(x, x, x, attn_mask=mask, need_weights=need_weights)
        assert torch.isfinite(out).all()
        _close(out[:, 2], ours.out_proj.bias.expand(2, 16))
        out.sum().backward()
        assert torch.isfinite(x.grad).all()


def test_mha_bad_input_names_the_argument():
    ours, _ = _mha_pair(16, 4, batch_first=True)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="key_padding_mask"):
        ours(x, x, x, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn_mask"):
        ours(x, x, x, attn_mask=torch.zeros(4, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="attn_mask"):
        ours(x, x, x, attn_mask=torch.zeros(5, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="embed_dim"):
        ours(x[..., :8], x, x)


def test_mha_dropout_is_applied_in_training_only():
    ours, _ = _mha_pair(16, 4, batch_first=True, dropout=0.5)
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    eval_out = ours(x, x, x, need_weights=False)[0]
    ours.train()
    torch.manual_seed(3)
    a = ours(x, x, x, need_weights=False)[0]
    torch.manual_seed(3)
    b = ours(x, x, x, need_weights=False)[0]
    _close(a, b)  # seeded: reproducible
    assert (a - eval_out).abs().max() > 1e-3


# --------------------------------------------------------------------------------------------
# encoder / decoder layers and stacks
# --------------------------------------------------------------------------------------------

LAYER_CASES = [
    {"norm_first": False, "activation": "relu"},
    {"norm_first": True, "activation": "gelu"},
    {"norm_first": True, "activation": torch.nn.GELU(approximate="tanh")},
    {"norm_first": False, "activation": torch.tanh, "bias": False},
]


def _seeded_params(module):
    torch.manual_seed(4)
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.3)


@pytest.mark.parametrize("kwargs", LAYER_CASES)
@pytest.mark.parametrize("batch_first", [True, False])
def test_encoder_layer_matches_torch(kwargs, batch_first):
    args = (16, 4, 24, 0.0)
    ours = ff.nn.TransformerEncoderLayer(*args, batch_first=batch_first, dtype=torch.float64, **kwargs)
    theirs = torch.nn.TransformerEncoderLayer(*args, batch_first=batch_first, dtype=torch.float64, **kwargs)
    _seeded_params(ours)
    _twin(ours, theirs)
    x = torch.randn((3, 7, 16) if batch_first else (7, 3, 16), dtype=torch.float64)
    kpm = _kpm(3, 7, "bool")
    mask = _attn_mask(7, 7, "bool")

    def run(m):
        return lambda x: m(x, src_mask=mask, src_key_padding_mask=kpm)

    _compare(run(ours), run(theirs), [x], modules=(ours, theirs))


@pytest.mark.parametrize("kwargs", LAYER_CASES[:3])
def test_decoder_layer_matches_torch(kwargs):
    args = (16, 4, 24, 0.0)
    ours = ff.nn.TransformerDecoderLayer(*args, batch_first=True, dtype=torch.float64, **kwargs)
    theirs = torch.nn.TransformerDecoderLayer(*args, batch_first=True, dtype=torch.float64, **kwargs)
    _seeded_params(ours)
    _twin(ours, theirs)
    tgt, mem = torch.randn(2, 6, 16, dtype=torch.float64), torch.randn(2, 9, 16, dtype=torch.float64)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(6, dtype=torch.float64)

    def run(m):
        return lambda t, s: m(t, s, tgt_mask=causal, memory_key_padding_mask=_kpm(2, 9, "bool"),
                              tgt_is_causal=True)

    _compare(run(ours), run(theirs), [tgt, mem], modules=(ours, theirs))


@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_matches_torch(norm_first):
    kwargs = dict(d_model=16, nhead=2, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=20, dropout=0.0,
                  norm_first=norm_first, dtype=torch.float64)
    torch.manual_seed(5)
    ours = ff.nn.Transformer(**kwargs)
    torch.manual_seed(5)
    theirs = torch.nn.Transformer(**kwargs)
    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        assert torch.equal(a, b), name  # same seed, same initial weights as torch
    assert isinstance(ours.encoder.norm, ff.nn.LayerNorm) and isinstance(ours.decoder, ff.nn.TransformerDecoder)
    assert isinstance(ours.encoder.layers[1], ff.nn.TransformerEncoderLayer)
    assert isinstance(ours.decoder.layers[1].multihead_attn, ff.nn.MultiheadAttention)
    _twin(ours, theirs)
    src, tgt = torch.randn(8, 2, 16, dtype=torch.float64), torch.randn(5, 2, 16, dtype=torch.float64)
    tgt_mask = torch.nn.Transformer.generate_square_subsequent_mask(5, dtype=torch.float64)

    def run(m):
        return lambda s, t: m(s, t, tgt_mask=tgt_mask, src_key_padding_mask=_kpm(2, 8, "bool"),
                              memory_key_padding_mask=_kpm(2, 8, "bool"))

    _compare(run(ours), run(theirs), [src, tgt], modules=(ours, theirs))


def test_encoder_stack_matches_torch_and_modules_train():
    layer = ff.nn.TransformerEncoderLayer(16, 4, 32, dropout=0.1, batch_first=True, dtype=torch.float64)
    ours = ff.nn.TransformerEncoder(layer, 3, norm=ff.nn.LayerNorm(16, dtype=torch.float64),
                                    enable_nested_tensor=False)
    theirs = torch.nn.TransformerEncoder(
        torch.nn.TransformerEncoderLayer(16, 4, 32, dropout=0.1, batch_first=True, dtype=torch.float64), 3,
        norm=torch.nn.LayerNorm(16, dtype=torch.float64), enable_nested_tensor=False)
    _twin(ours, theirs)
    ours.eval(), theirs.eval()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    _compare(ours, theirs, [x])
    ours.train()  # dropout on: a few SGD steps lower a fitting loss
    opt = torch.optim.SGD(ours.parameters(), lr=0.05)
    target = torch.randn(2, 5, 16, dtype=torch.float64)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = F.mse_loss(ours(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


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
    _close(out, o @ attn.o_proj.weight.T + attn.o_proj.bias)


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
    _close(torch.cat(pieces, dim=1), full)


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
    _close(out, o @ attn.o_proj.weight.T + attn.o_proj.bias)
    _close(attn(x, attn_mask=keep, past_key_value=cache), out)
    with pytest.raises(ValueError, match="memory"):
        attn(x)


def test_sinusoidal_table_formula():
    table = ff.nn.sinusoidal_table(11, 8, dtype=torch.float64)
    p, i = 7, 3
    assert math.isclose(table[p, 2 * i], math.sin(p / 10000 ** (2 * i / 8)), abs_tol=1e-12)
    assert math.isclose(table[p, 2 * i + 1], math.cos(p / 10000 ** (2 * i / 8)), abs_tol=1e-12)
    enc = ff.nn.SinusoidalPositionalEncoding(8, max_positions=16, dtype=torch.float64)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    _close(enc(x, offset=3), x + table[3:8])
    assert not enc.state_dict()
    with pytest.raises(ValueError, match="max_positions"):
        enc(x, offset=12)


def test_learned_positional_embedding():
    emb = ff.nn.LearnedPositionalEmbedding(10, 4, dtype=torch.float64)
    x = torch.randn(3, 6, 4, dtype=torch.float64)
    _close(emb(x, offset=2), x + emb.weight[2:8])
    _close(emb(position_ids=torch.tensor([[0, 9]])), emb.weight[[0, 9]][None])


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
    _close(qr, q)  # position 0 is the identity
    q10 = torch.randn(1, 1, 3, 10, dtype=torch.float64)
    _close(rope(q10, q10)[0][..., 8:], q10[..., 8:])  # partial rotary keeps the tail


def test_alibi_slopes():
    _close(ff.nn.alibi_slopes(8, dtype=torch.float64), torch.tensor([2.0 ** (-h) for h in range(1, 9)],
                                                                    dtype=torch.float64))
    s6 = ff.nn.alibi_slopes(6, dtype=torch.float64)
    expect = [2.0 ** (-2 * h) for h in range(1, 5)] + [2.0 ** (-1), 2.0 ** (-3)]
    _close(s6, torch.tensor(expect, dtype=torch.float64))
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
    _close(out[0, :, 2, 5], bias.relative_attention_bias.weight[17 + 2])  # j - i = 3


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
    _close(ffn(x), h @ ffn.w2.weight.T + ffn.w2.bias)
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
    _close(block(x), expect)


# --------------------------------------------------------------------------------------------
# torch.compile, and the triton backend where it exists
# --------------------------------------------------------------------------------------------


def test_encoder_layer_under_compile_fullgraph():
    torch._dynamo.reset()
    layer = ff.nn.TransformerEncoderLayer(16, 4, 24, dropout=0.0, batch_first=True, norm_first=True)
    x = torch.randn(2, 5, 16, requires_grad=True)
    kpm = _kpm(2, 5, "bool")
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    out = compiled(x, src_key_padding_mask=kpm)
    _close(out, layer(x, src_key_padding_mask=kpm), torch.float32)
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_attention_block_under_compile_fullgraph():
    torch._dynamo.reset()
    attn = ff.nn.Attention(16, 4, 2, causal=True, rotary=ff.nn.RotaryEmbedding(4))
    x = torch.randn(2, 6, 16)
    compiled = torch.compile(attn, fullgraph=True, backend="aot_eager")
    _close(compiled(x), attn(x), torch.float32)


def _triton_skip(*families):
    """Skip unless the triton backend runs every op family the module calls."""
    reasons = [f"triton {f}: {r}" for f in families if (r := backends.unsupported_reason("triton", f, "cpu"))]
    return pytest.mark.skipif(bool(reasons), reason="; ".join(reasons))


@_triton_skip("attention", "linear_act")
def test_mha_on_triton_backend_matches_reference():
    ours, _ = _mha_pair(16, 2, batch_first=True)
    ours = ours.float()
    x = torch.randn(1, 5, 16)
    kpm = _kpm(1, 5, "bool")
    ref = ours(x, x, x, key_padding_mask=kpm, need_weights=False)[0]
    with ff.use_backend("triton"):
        out = ours(x, x, x, key_padding_mask=kpm, need_weights=False)[0]
    _close(out, ref, torch.float32)


@_triton_skip("layer_norm")
def test_layer_norm_on_triton_backend_matches_reference():
    norm = ff.nn.LayerNorm(24, backend="triton")
    x, r = torch.randn(3, 24), torch.randn(3, 24)
    y, h = norm(x, residual=r)
    _close(y, F.layer_norm(x + r, (24,), norm.weight, norm.bias), torch.float32)
    _close(h, x + r, torch.float32)


def test_from_torch_twin_shares_parameters_and_matches():
    torch.manual_seed(6)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 16, dtype=torch.float64),
        torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(16, 4, 24, 0.0, F.gelu, batch_first=True,
                                                                     dtype=torch.float64), 2,
                                    enable_nested_tensor=False),
        torch.nn.RMSNorm(16, dtype=torch.float64))
    twin = ff.nn.from_torch(model, backend="reference")
    assert isinstance(twin[1], ff.nn.TransformerEncoder) and isinstance(twin[2], ff.nn.RMSNorm)
    assert isinstance(twin[1].layers[0].self_attn, ff.nn.MultiheadAttention)
    assert type(model[1].layers[0].self_attn) is torch.nn.MultiheadAttention  # the original is untouched
    assert twin[1].layers[0].linear1.weight is model[1].layers[0].linear1.weight
    assert list(twin.state_dict()) == list(model.state_dict())
    _compare(twin, model, [torch.randn(2, 5, 16, dtype=torch.float64)])
    with pytest.raises(TypeError, match="torch.nn.Module"):
        ff.nn.from_torch(3)


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
    _close(out, _naive_attention(q, k, v, causal=True))

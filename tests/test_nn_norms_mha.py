"""fusedformer.nn's LayerNorm, RMSNorm and MultiheadAttention against torch.nn: checkpoints load both
ways (strict), same outputs and gradients (float64, reference backend), masks in torch's convention,
and the triton backend where one exists."""

import fusedformer as ff
import pytest
import torch
import torch.nn.functional as F
from _nn_testing import close, compare, key_padding_mask, random_attn_mask, twin
from _testing import skip_unless_triton

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
    twin(ours, theirs)
    assert repr(ours).split("(", 1)[1] == repr(theirs).split("(", 1)[1]
    compare(ours, theirs, [torch.randn(shape, dtype=torch.float64) * 3 + 1])


@pytest.mark.parametrize("eps", [None, 1e-6])
@pytest.mark.parametrize("elementwise_affine", [True, False])
def test_rms_norm_matches_torch(eps, elementwise_affine):
    ours = ff.nn.RMSNorm(37, eps=eps, elementwise_affine=elementwise_affine, dtype=torch.float64)
    theirs = torch.nn.RMSNorm(37, eps=eps, elementwise_affine=elementwise_affine, dtype=torch.float64)
    if ours.weight is not None:
        torch.nn.init.normal_(ours.weight)
    twin(ours, theirs)
    assert repr(ours).split("(", 1)[1] == repr(theirs).split("(", 1)[1]
    compare(ours, theirs, [torch.randn(3, 7, 37, dtype=torch.float64)])


@pytest.mark.parametrize("cls", [ff.nn.LayerNorm, ff.nn.RMSNorm])
def test_norm_residual_returns_norm_of_sum_and_sum(cls):
    norm = cls(16, dtype=torch.float64)
    x, r = torch.randn(4, 16, dtype=torch.float64), torch.randn(4, 16, dtype=torch.float64)
    y, h = norm(x, residual=r)
    close(h, x + r)
    close(y, norm(x + r))


# --------------------------------------------------------------------------------------------
# MultiheadAttention
# --------------------------------------------------------------------------------------------


def _mha_pair(E=16, H=4, **kwargs):
    torch.manual_seed(1)
    ours = ff.nn.MultiheadAttention(E, H, dtype=torch.float64, **kwargs)
    theirs = torch.nn.MultiheadAttention(E, H, dtype=torch.float64, **kwargs)
    for p in ours.parameters():  # torch zeroes the biases; random ones test them
        torch.nn.init.normal_(p, std=0.3)
    ours, theirs = twin(ours, theirs)
    ours.eval(), theirs.eval()
    return ours, theirs


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
        kpm = key_padding_mask(N, L, kind)
        attn_mask = random_attn_mask(L, L, kind, *((N, H) if mask_kind.endswith("3d") else ()))

    def run(m, q):
        out, w = m(q, q, q, key_padding_mask=kpm, need_weights=need_weights, attn_mask=attn_mask,
                   average_attn_weights=average)
        assert (w is None) == (not need_weights)
        return out if w is None else torch.cat([out.flatten(), w.flatten()])

    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = run(ours, xa), run(theirs, xb)
    close(ya, yb)
    g = torch.randn_like(ya)
    (ya * g).sum().backward()
    (yb * g).sum().backward()
    close(xa.grad, xb.grad)
    for pa, pb in zip(ours.parameters(), theirs.parameters()):
        close(pa.grad, pb.grad)


@pytest.mark.parametrize("kwargs", [{"kdim": 6, "vdim": 10}, {"bias": False}, {"add_bias_kv": True},
                                    {"add_zero_attn": True}, {"add_bias_kv": True, "add_zero_attn": True}])
def test_mha_cross_attention_options_match_torch(kwargs):
    N, L, S, E = 2, 5, 9, 16
    ours, theirs = _mha_pair(E, 4, batch_first=True, **kwargs)
    q = torch.randn(N, L, E, dtype=torch.float64)
    k = torch.randn(N, S, kwargs.get("kdim", E), dtype=torch.float64)
    v = torch.randn(N, S, kwargs.get("vdim", E), dtype=torch.float64)
    kpm = key_padding_mask(N, S, "float")
    am = random_attn_mask(L, S, "float")

    def run(m):
        def f(q, k, v):
            return m(q, k, v, key_padding_mask=kpm, attn_mask=am, need_weights=False)[0]
        return f

    compare(run(ours), run(theirs), [q, k, v], modules=(ours, theirs))


def test_mha_unbatched_and_causal():
    ours, theirs = _mha_pair(16, 2)
    x = torch.randn(6, 16, dtype=torch.float64)
    causal_bool = torch.ones(6, 6, dtype=torch.bool).triu(1)
    ref = theirs(x, x, x, attn_mask=causal_bool, is_causal=True, need_weights=False)[0]
    close(ours(x, x, x, attn_mask=causal_bool, is_causal=True, need_weights=False)[0], ref)
    close(ours(x, x, x, is_causal=True, need_weights=False)[0], ref)  # mask optional here
    out, w = ours(x, x, x, is_causal=True)
    assert w.shape == (6, 6) and torch.all(w.triu(1) == 0)
    close(out, ref)


def test_mha_fully_masked_rows_give_zeros_not_nan():
    ours, _ = _mha_pair(16, 4, batch_first=True)
    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    mask = torch.zeros(5, 5, dtype=torch.bool)
    mask[2] = True  # query 2 may attend nothing
    for need_weights in (False, True):
        out, _ = ours(x, x, x, attn_mask=mask, need_weights=need_weights)
        assert torch.isfinite(out).all()
        close(out[:, 2], ours.out_proj.bias.expand(2, 16))
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
    close(a, b)  # seeded: reproducible
    assert (a - eval_out).abs().max() > 1e-3


# --------------------------------------------------------------------------------------------
# the triton backend where it exists
# --------------------------------------------------------------------------------------------


@skip_unless_triton("attention", "linear_act")
def test_mha_on_triton_backend_matches_reference():
    ours, _ = _mha_pair(16, 2, batch_first=True)
    ours = ours.float()
    x = torch.randn(1, 5, 16)
    kpm = key_padding_mask(1, 5, "bool")
    ref = ours(x, x, x, key_padding_mask=kpm, need_weights=False)[0]
    with ff.use_backend("triton"):
        out = ours(x, x, x, key_padding_mask=kpm, need_weights=False)[0]
    close(out, ref, torch.float32)


@skip_unless_triton("layer_norm")
def test_layer_norm_on_triton_backend_matches_reference():
    norm = ff.nn.LayerNorm(24, backend="triton")
    x, r = torch.randn(3, 24), torch.randn(3, 24)
    y, h = norm(x, residual=r)
    close(y, F.layer_norm(x + r, (24,), norm.weight, norm.bias), torch.float32)
    close(h, x + r, torch.float32)

"""reference.py against plain PyTorch in float64: forwards against torch's functions, the
hand-written backwards against autograd of those functions."""

import pytest
import torch
import torch.nn.functional as F
from fusedformer import reference as ref
from fusedformer.vocabulary import ACTIVATIONS, FUSED_ACTIVATIONS

f64 = torch.float64
TOL = {"atol": 1e-10, "rtol": 1e-9}


def randn(*shape):
    return torch.randn(*shape, dtype=f64)


def autograd_grads(fn, inputs, grad_out):
    inputs = [t.detach().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    return out.detach(), torch.autograd.grad(out, inputs, grad_out, allow_unused=True)


# --------------------------------------------------------------------------------------------
# softmax
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape,dim", [((7, 113), -1), ((7, 113), 0), ((3, 5, 9), 1), ((1, 1), -1), ((4, 0), -1)])
def test_softmax_matches_torch(shape, dim):
    x = randn(*shape) * 3
    dy = randn(*shape)
    want, (dx_want,) = autograd_grads(lambda t: torch.softmax(t, dim), [x], dy)
    y = ref.softmax_forward(x, dim)
    torch.testing.assert_close(y, want, **TOL)
    torch.testing.assert_close(ref.softmax_backward(dy, y, dim), dx_want, **TOL)


def test_softmax_special_values_like_torch():
    x = torch.tensor([[0.0, float("-inf"), 1.0], [float("-inf")] * 3, [float("nan"), 0.0, 1.0],
                      [float("inf"), 0.0, 1.0]], dtype=f64)
    torch.testing.assert_close(ref.softmax_forward(x, -1), torch.softmax(x, -1), equal_nan=True)


def test_softmax_low_precision_computes_in_float32():
    x = randn(5, 300).to(torch.bfloat16)
    want = torch.softmax(x.float(), -1).to(torch.bfloat16)
    assert ref.softmax_forward(x, -1).dtype == torch.bfloat16
    torch.testing.assert_close(ref.softmax_forward(x, -1), want, atol=0, rtol=0)


# --------------------------------------------------------------------------------------------
# norms
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("M,N", [(1, 1), (7, 113), (33, 1025)])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("residual", [False, True])
def test_layer_norm_matches_torch(M, N, affine, residual):
    x, r, dy, dres = randn(M, N), randn(M, N), randn(M, N), randn(M, N)
    w, b = (1 + 0.1 * randn(N), 0.1 * randn(N)) if affine else (None, None)
    eps = 1e-5

    def torch_fn(x, r, *wb):
        h = x + r if residual else x
        out = F.layer_norm(h, (N,), *wb, eps=eps) if affine else F.layer_norm(h, (N,), eps=eps)
        return torch.cat([out, h], -1) if residual else out

    inputs = [x, r] + ([w, b] if affine else [])
    grad = torch.cat([dy, dres], -1) if residual else dy
    want, grads = autograd_grads(torch_fn, inputs, grad)
    y, res_out, mean, rstd = ref.layer_norm_forward(x, w, b, eps, r if residual else None)
    torch.testing.assert_close(y, want[:, :N], **TOL)
    h = x + r if residual else x
    if residual:
        torch.testing.assert_close(res_out, h, **TOL)
    else:
        assert res_out is None
    dx, dw, db = ref.layer_norm_backward(dy, h, w, b, mean, rstd, dres if residual else None)
    torch.testing.assert_close(dx, grads[0], **TOL)
    if residual:
        torch.testing.assert_close(dx, grads[1], **TOL)  # d(residual) = d(x): both feed h
    if affine:
        torch.testing.assert_close(dw, grads[2], **TOL)
        torch.testing.assert_close(db, grads[3], **TOL)
    else:
        assert dw is None and db is None


@pytest.mark.parametrize("M,N", [(1, 1), (7, 113), (33, 1025)])
@pytest.mark.parametrize("affine", [True, False])
def test_rms_norm_matches_torch(M, N, affine):
    x, dy = randn(M, N), randn(M, N)
    w = 1 + 0.1 * randn(N) if affine else None
    inputs = [x] + ([w] if affine else [])
    want, grads = autograd_grads(lambda x, *w: F.rms_norm(x, (N,), *w, eps=1e-6), inputs, dy)
    y, res_out, rstd = ref.rms_norm_forward(x, w, 1e-6)
    torch.testing.assert_close(y, want, **TOL)
    assert res_out is None
    dx, dw = ref.rms_norm_backward(dy, x, w, rstd)
    torch.testing.assert_close(dx, grads[0], **TOL)
    if affine:
        torch.testing.assert_close(dw, grads[1], **TOL)


def test_norm_backward_gradcheck():
    x, w, b = randn(3, 11), randn(11), randn(11)

    class LN(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w, b):
            y, _, mean, rstd = ref.layer_norm_forward(x, w, b, 1e-5)
            ctx.save_for_backward(x, w, b, mean, rstd)
            return y

        @staticmethod
        def backward(ctx, dy):
            x, w, b, mean, rstd = ctx.saved_tensors
            return ref.layer_norm_backward(dy, x, w, b, mean, rstd)

    assert torch.autograd.gradcheck(LN.apply, [t.requires_grad_() for t in (x, w, b)])


# --------------------------------------------------------------------------------------------
# linear_act
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("activation", FUSED_ACTIVATIONS)
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_act_matches_torch(activation, with_bias):
    M, K, N = 13, 24, 34
    x, w = randn(M, K), randn(N, K)
    b = randn(N) if with_bias else None
    act = ACTIVATIONS[activation].torch_forward
    out_width = N // 2 if ACTIVATIONS[activation].gated else N
    dy = randn(M, out_width)
    inputs = [x, w] + ([b] if with_bias else [])
    want, grads = autograd_grads(lambda x, w, *b: act(F.linear(x, w, *b)), inputs, dy)
    y, preact = ref.linear_act_forward(x, w, b, activation)
    torch.testing.assert_close(y, want, **TOL)
    torch.testing.assert_close(preact, F.linear(x, w, b), **TOL)
    for saved in (preact, None):  # None: the backward recomputes the pre-activation
        dx, dw, db = ref.linear_act_backward(dy, x, w, b, saved, activation)
        torch.testing.assert_close(dx, grads[0], **TOL)
        torch.testing.assert_close(dw, grads[1], **TOL)
        if with_bias:
            torch.testing.assert_close(db, grads[2], **TOL)
        else:
            assert db is None


def test_feed_forward_is_two_linears():
    x, w1, b1, w2, b2 = randn(5, 8), randn(12, 8), randn(12), randn(8, 6), randn(8)
    want = F.linear(ACTIVATIONS["geglu"].torch_forward(F.linear(x, w1, b1)), w2, b2)
    torch.testing.assert_close(ref.feed_forward(x, w1, b1, w2, b2, "geglu"), want, **TOL)


# --------------------------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------------------------


def attention_case(B=2, H=4, Hkv=2, Lq=9, Lk=13, D=8, Dv=None):
    return randn(B, H, Lq, D), randn(B, Hkv, Lk, D), randn(B, Hkv, Lk, Dv or D), randn(B, H, Lq, Dv or D)


@pytest.mark.parametrize("mask_kind", [None, "bool", "float", "key_padding", "per_head"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Lq,Lk", [(9, 13), (13, 9), (1, 5)])
def test_attention_matches_torch_sdpa(mask_kind, causal, Lq, Lk):
    B, H, Hkv, D = 2, 4, 2, 8
    q, k, v, do = attention_case(B, H, Hkv, Lq, Lk, D, Dv=6)
    mask = {
        None: None,
        "bool": torch.rand(B, H, Lq, Lk) > 0.3,
        "float": randn(B, 1, Lq, Lk),
        "key_padding": torch.arange(Lk)[None, None, None, :] < torch.tensor([Lk, Lk - 2])[:, None, None, None],
        "per_head": randn(1, H, Lq, Lk),
    }[mask_kind]
    if mask is not None and mask.dtype == torch.bool:
        mask[..., 0] = True  # torch's math path gives NaN on fully masked rows; those are tested below
    scale = 0.37

    def torch_fn(q, k, v, *m):
        bias = m[0] if m else None
        if causal:  # torch forbids is_causal with a mask: fold the causal rule into it
            tri = torch.ones(Lq, Lk, dtype=torch.bool).tril()
            bias = tri if bias is None else (bias & tri if bias.dtype == torch.bool
                                             else bias.masked_fill(~tri, float("-inf")))
        return F.scaled_dot_product_attention(q, k, v, bias, scale=scale, enable_gqa=True)

    float_mask = mask is not None and mask.dtype == f64
    inputs = [q, k, v] + ([mask] if float_mask else [])
    if mask is not None and not float_mask:
        want, grads = autograd_grads(lambda q, k, v: torch_fn(q, k, v, mask), inputs, do)
    else:
        want, grads = autograd_grads(torch_fn, inputs, do)
    out, lse = ref.attention_forward(q, k, v, mask, causal, scale)
    rows_alive = ~torch.isneginf(lse)
    torch.testing.assert_close(out[rows_alive], want[rows_alive], **TOL)
    dq, dk, dv, dbias = ref.attention_backward(do, q, k, v, mask, out, lse, causal, scale,
                                               bias_requires_grad=float_mask)
    if not rows_alive.all():  # causal with Lq > Lk keeps every row alive; nothing else kills rows here
        pytest.fail("unexpected fully masked row")
    for got, exp in zip((dq, dk, dv), grads):
        torch.testing.assert_close(got, exp, **TOL)
    if float_mask:
        assert dbias.shape == mask.shape
        torch.testing.assert_close(dbias, grads[3], **TOL)


def test_attention_lse_is_logsumexp_of_scaled_scores():
    q, k, v, _ = attention_case(H=2, Hkv=2)
    _, lse = ref.attention_forward(q, k, v, None, False, 0.5)
    torch.testing.assert_close(lse, torch.logsumexp(0.5 * q @ k.transpose(-1, -2), -1), **TOL)


def test_fully_masked_rows_give_zero_output_and_gradients():
    q, k, v, do = attention_case(B=1, H=2, Hkv=2, Lq=4, Lk=5)
    mask = torch.ones(1, 1, 4, 5, dtype=torch.bool)
    mask[..., 2, :] = False
    out, lse = ref.attention_forward(q, k, v, mask, False, 0.3)
    assert torch.isneginf(lse[..., 2]).all() and not torch.isinf(lse[..., [0, 1, 3]]).any()
    assert (out[..., 2, :] == 0).all() and not torch.isnan(out).any()
    dq, dk, dv, _ = ref.attention_backward(do, q, k, v, mask, out, lse, False, 0.3)
    assert (dq[..., 2, :] == 0).all()
    assert not any(torch.isnan(t).any() for t in (dq, dk, dv))


@pytest.mark.parametrize("dtype,tol", [(f64, 1e-10), (torch.float32, 1e-5), (torch.bfloat16, 2e-2),
                                       (torch.float16, 1e-2)])
def test_attention_finfo_min_mask_behaves_as_torch(dtype, tol):
    """A float mask of finfo(dtype).min is finite: a row masked by it everywhere attends as torch's
    softmax does (uniformly), neither a zero row nor a sum (exp(s - lse), lse rounded to the max).
    The oracle is softmax written out: torch's CPU SDPA backward makes that very sum."""
    q, k, v, do = (t.to(dtype) for t in attention_case(B=1, H=2, Hkv=2, Lq=4, Lk=5))
    mask = torch.zeros(1, 1, 4, 5, dtype=dtype)
    mask[..., 1, :] = torch.finfo(dtype).min
    mask[..., 2, 1:] = torch.finfo(dtype).min
    want, grads = autograd_grads(lambda q, k, v: torch.softmax(0.3 * q @ k.transpose(-1, -2) + mask.double(), -1) @ v,
                                 [t.double() for t in (q, k, v)], do.double())
    out, lse = ref.attention_forward(q, k, v, mask, False, 0.3)
    dq, dk, dv, _ = ref.attention_backward(do, q, k, v, mask, out, lse, False, 0.3)
    for got, exp in zip((out, dq, dk, dv), (want, *grads)):
        torch.testing.assert_close(got.double(), exp, atol=tol, rtol=tol)


def test_attention_nan_propagates():
    q, k, v, _ = attention_case(H=2, Hkv=2)
    q[0, 0, 3, 1] = float("nan")
    out, _ = ref.attention_forward(q, k, v, None, False, 0.3)
    assert torch.isnan(out[0, 0, 3]).all() and not torch.isnan(out[1]).any()


def explicit_bias(Lq, Lk, window, slopes, H):
    """The window / ALiBi rules written out element by element."""
    bias = torch.zeros(1, H, Lq, Lk, dtype=f64)
    left, right = window
    for h in range(H):
        for i in range(Lq):
            for j in range(Lk):
                if (left >= 0 and j < i - left) or (right >= 0 and j > i + right):
                    bias[0, h, i, j] = float("-inf")
                elif slopes is not None:
                    bias[0, h, i, j] = -slopes[h] * abs(i - j)
    return bias


@pytest.mark.parametrize("window,alibi", [((2, 1), False), ((-1, 0), False), ((3, -1), True), ((-1, -1), True)])
def test_window_and_alibi_equal_an_explicit_bias(window, alibi):
    H = 2
    q, k, v, do = attention_case(B=1, H=H, Hkv=H, Lq=7, Lk=9)
    slopes = torch.tensor([0.5, 0.25], dtype=f64) if alibi else None
    bias = explicit_bias(7, 9, window, slopes, H)
    out, lse = ref.attention_forward(q, k, v, None, False, 0.4, window=window, alibi_slopes=slopes)
    want, want_lse = ref.attention_forward(q, k, v, bias, False, 0.4)
    torch.testing.assert_close(out, want, **TOL)
    grads = ref.attention_backward(do, q, k, v, None, out, lse, False, 0.4, window=window, alibi_slopes=slopes)
    want_grads = ref.attention_backward(do, q, k, v, bias, want, want_lse, False, 0.4)
    for got, exp in zip(grads[:3], want_grads[:3]):
        torch.testing.assert_close(got, exp, **TOL)


def test_dropout_from_mask_matches_torch_autograd():
    q, k, v, do = attention_case(H=2, Hkv=1)
    p = 0.3
    keep = torch.rand(2, 2, 9, 13) > p

    def torch_fn(q, k, v):
        kx, vx = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
        probs = torch.softmax(0.3 * q @ kx.transpose(-1, -2), -1)
        return (probs * keep / (1 - p)) @ vx

    want, grads = autograd_grads(torch_fn, [q, k, v], do)
    out, lse = ref.attention_forward(q, k, v, None, False, 0.3, dropout_p=p, dropout_mask=keep)
    torch.testing.assert_close(out, want, **TOL)
    got = ref.attention_backward(do, q, k, v, None, out, lse, False, 0.3, dropout_p=p, dropout_mask=keep)
    for g, w in zip(got[:3], grads):
        torch.testing.assert_close(g, w, **TOL)

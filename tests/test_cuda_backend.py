"""The cuda backend on a GPU: every op against the float64 reference through fusedformer.parity
(the 2x-of-PyTorch-error rule), forward and backward, fp32/fp16/bf16, odd shapes, strided and
misaligned inputs (the kernels' scalar path), masks, GQA, fully masked rows, determinism."""

import fusedformer as ff
import pytest
import torch
import torch.nn.functional as F
from fusedformer import backends, parity, reference
from fusedformer.ops.attention import attention_fwd

pytestmark = pytest.mark.gpu

MEMORY_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ATTN_DTYPES = [torch.float16, torch.bfloat16]


def _assert_ok(rows):
    bad = [r for r in rows if not r["ok"]]
    assert not bad, parity.format_table(bad)


def _misaligned(t):
    """The same values, starting one element past an aligned boundary (differentiable)."""
    flat = torch.cat([t.new_zeros(1), t.reshape(-1)])
    return flat[1:].view(t.shape)


def _randn(g, *shape):
    return torch.randn(*shape, generator=g, dtype=torch.float64)


@pytest.fixture(autouse=True)
def _needs_extension():
    if backends.cuda_extension() is None:
        pytest.skip("fusedformer._C is not built")


# --------------------------------------------------------------------------------------------
# the default parity suite, on every case the cuda backend supports
# --------------------------------------------------------------------------------------------

DEFAULT = [c for c in parity.default_cases(quick=False) if c.op != "attention"]


@pytest.mark.parametrize("dtype", MEMORY_DTYPES, ids=str)
@pytest.mark.parametrize("case", DEFAULT, ids=lambda c: f"{c.op}-{'-'.join(map(str, c.shape.values()))}")
def test_default_cases(case, dtype):
    _assert_ok(parity.run_case(case, "cuda", dtype, "cuda"))


# --------------------------------------------------------------------------------------------
# softmax: other dims, strided and misaligned rows, rows too long for the shared-memory cache
# --------------------------------------------------------------------------------------------

SOFTMAX_SHAPES = [((1, 1), -1), ((7, 113), -1), ((33, 1025), 0), ((3, 5, 17), 1), ((2, 20000), -1), ((4, 7001), -1)]


@pytest.mark.parametrize("dtype", MEMORY_DTYPES, ids=str)
@pytest.mark.parametrize("shape,dim", SOFTMAX_SHAPES)
@pytest.mark.parametrize("layout", ["contiguous", "misaligned", "transposed"])
def test_softmax(shape, dim, layout, dtype):
    prep = {"contiguous": lambda t: t, "misaligned": _misaligned, "transposed": lambda t: t.transpose(0, -1)}[layout]
    case = parity.Case("softmax", {"shape": shape, "dim": dim}, lambda g: ([_randn(g, *shape) * 3], {}, [0]),
                       lambda x, backend: ff.softmax(prep(x), dim, backend=backend),
                       lambda x: torch.softmax(prep(x), dim))
    _assert_ok(parity.run_case(case, "cuda", dtype, "cuda"))


def test_softmax_nan_and_all_inf_rows():
    x = torch.randn(3, 37, device="cuda")
    x[0, 5] = float("nan")
    x[1] = float("-inf")
    y = ff.softmax(x, backend="cuda")
    assert torch.isnan(y[0]).all() and torch.isnan(y[1]).all()
    torch.testing.assert_close(y[2], torch.softmax(x[2], -1))


# --------------------------------------------------------------------------------------------
# norms: residual variant, no weight/bias, misaligned rows, long rows, deterministic dW/dB
# --------------------------------------------------------------------------------------------

NORM_SHAPES = [(1, 7), (7, 113), (129, 1025), (5, 13001)]


@pytest.mark.parametrize("dtype", MEMORY_DTYPES, ids=str)
@pytest.mark.parametrize("M,N", NORM_SHAPES)
@pytest.mark.parametrize("variant", ["residual", "plain-misaligned", "no-affine"])
def test_layer_norm(M, N, variant, dtype):
    def make(g):
        x, r, w, b = _randn(g, M, N), _randn(g, M, N), 1 + 0.1 * _randn(g, N), 0.1 * _randn(g, N)
        return [x, r, w, b], {}, [0, 1, 2, 3]

    def ours(x, r, w, b, backend):
        if variant == "residual":
            return ff.layer_norm(x, (N,), w, b, residual=r, backend=backend)[0]
        if variant == "no-affine":
            return ff.layer_norm(x, (N,), backend=backend)  # unused inputs get zero gradients
        return ff.layer_norm(_misaligned(x), (N,), w, b, backend=backend)

    def theirs(x, r, w, b):
        if variant == "residual":
            return F.layer_norm(x + r, (N,), w, b)
        if variant == "no-affine":
            return F.layer_norm(x, (N,))
        return F.layer_norm(x, (N,), w, b)

    _assert_ok(parity.run_case(parity.Case("layer_norm", {"M": M, "N": N, "variant": variant}, make, ours, theirs),
                               "cuda", dtype, "cuda"))


@pytest.mark.parametrize("dtype", MEMORY_DTYPES, ids=str)
@pytest.mark.parametrize("M,N", NORM_SHAPES)
@pytest.mark.parametrize("residual", [False, True])
def test_rms_norm(M, N, residual, dtype):
    def make(g):
        return [_randn(g, M, N), _randn(g, M, N), 1 + 0.1 * _randn(g, N)], {}, [0, 1, 2]

    def ours(x, r, w, backend):
        if residual:
            return ff.rms_norm(x, (N,), w, 1e-6, residual=r, backend=backend)[0]
        return ff.rms_norm(_misaligned(x), (N,), w, 1e-6, backend=backend)

    def theirs(x, r, w):
        return F.rms_norm(x + r, (N,), w, 1e-6) if residual else F.rms_norm(x, (N,), w, 1e-6)

    _assert_ok(parity.run_case(parity.Case("rms_norm", {"M": M, "N": N, "residual": residual}, make, ours, theirs),
                               "cuda", dtype, "cuda"))


def test_norm_weight_gradients_are_deterministic():
    x = torch.randn(4099, 1031, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(1031, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(1031, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(x)
    grads = [torch.autograd.grad(ff.layer_norm(x, (1031,), w, b, backend="cuda"), [w, b], dy) for _ in range(3)]
    for dw, db in grads[1:]:
        assert torch.equal(dw, grads[0][0]) and torch.equal(db, grads[0][1])


# --------------------------------------------------------------------------------------------
# linear_act: every activation, odd widths (gated halves not 16-byte aligned), misaligned rows
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", MEMORY_DTYPES, ids=str)
@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh", "silu", "swiglu", "geglu", "identity"])
@pytest.mark.parametrize("M,K,N", [(1, 8, 2), (37, 72, 82), (130, 64, 2 * 1027)])
def test_linear_act(M, K, N, activation, dtype):
    def make(g):
        return [_randn(g, M, K), _randn(g, N, K) / K**0.5, 0.1 * _randn(g, N)], {}, [0, 1, 2]

    case = parity.Case("linear_act", {"M": M, "K": K, "N": N, "activation": activation}, make,
                       lambda x, w, b, backend: ff.linear_act(x, w, b, activation, backend=backend),
                       lambda x, w, b: parity._torch_linear_act(x, w, b, activation))
    _assert_ok(parity.run_case(case, "cuda", dtype, "cuda"))


def test_linear_act_without_bias_and_nan():
    x = torch.randn(5, 16, device="cuda", dtype=torch.float16)
    x[2, 3] = float("nan")
    w = torch.randn(24, 16, device="cuda", dtype=torch.float16)
    y = ff.linear_act(x, w, None, "relu", backend="cuda")
    ref = ff.linear_act(x, w, None, "relu", backend="reference")
    assert torch.isnan(y[2]).all() and torch.isnan(ref[2]).all()
    torch.testing.assert_close(y[[0, 1, 3, 4]], ref[[0, 1, 3, 4]], atol=2e-3, rtol=2e-3)


# --------------------------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------------------------

ATTN_SHAPES = [  # B, H, Hkv, Lq, Lk
    (1, 1, 1, 1, 1), (2, 3, 3, 37, 37), (1, 4, 2, 29, 45), (2, 8, 1, 130, 67), (1, 2, 2, 200, 257)]


def _attn_case(B, H, Hkv, Lq, Lk, D, causal, mask):
    def make(g):
        args = [_randn(g, B, H, Lq, D), _randn(g, B, Hkv, Lk, D), _randn(g, B, Hkv, Lk, D)]
        if mask == "float":
            args.append(_randn(g, 1, H, Lq, Lk))
        elif mask == "key-padding":  # (B, 1, 1, Lk): every batch keeps at least its first key
            lengths = torch.randint(1, Lk + 1, (B,), generator=g)
            args.append(torch.arange(Lk)[None, None, None, :] < lengths[:, None, None, None])
        else:
            args.append(None)
        return args, {}, [0, 1, 2]

    shape = {"B": B, "H": H, "Hkv": Hkv, "Lq": Lq, "Lk": Lk, "D": D, "causal": causal, "mask": mask}
    return parity.Case(
        "attention", shape, make,
        lambda q, k, v, m, backend: ff.scaled_dot_product_attention(q, k, v, m, is_causal=causal, enable_gqa=True,
                                                                    backend=backend),
        lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, m, is_causal=causal, enable_gqa=True))


@pytest.mark.parametrize("dtype", ATTN_DTYPES, ids=str)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("shape", ATTN_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal,mask", [(False, None), (True, None), (False, "key-padding"), (True, "float")])
def test_attention(shape, D, causal, mask, dtype):
    _assert_ok(parity.run_case(_attn_case(*shape, D, causal, mask), "cuda", dtype, "cuda"))


def _reference_attention(q, k, v, mask, causal):
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out = ff.scaled_dot_product_attention(q64, k64, v64, mask, is_causal=causal, enable_gqa=True,
                                          backend="reference")
    return q64, k64, v64, out


@pytest.mark.parametrize("dtype", ATTN_DTYPES, ids=str)
@pytest.mark.parametrize("D", [64, 128])
def test_attention_fully_masked_rows_give_zeros(D, dtype):
    B, H, Hkv, Lq, Lk = 2, 4, 2, 70, 66
    q = torch.randn(B, H, Lq, D, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(B, Hkv, Lk, D, device="cuda", dtype=dtype, requires_grad=True)
    v = torch.randn(B, Hkv, Lk, D, device="cuda", dtype=dtype, requires_grad=True)
    mask = torch.rand(B, 1, Lq, Lk, device="cuda") > 0.3
    mask[0, 0, 5] = False
    mask[1, 0, 64:] = False  # a whole tail of rows, across a block boundary
    out = ff.scaled_dot_product_attention(q, k, v, mask, enable_gqa=True, backend="cuda")
    dout = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, [q, k, v], dout)
    assert (out[0, :, 5] == 0).all() and (out[1, :, 64:] == 0).all()
    assert (dq[0, :, 5] == 0).all() and (dq[1, :, 64:] == 0).all()
    q64, k64, v64, ref = _reference_attention(q, k, v, mask, False)
    rdq, rdk, rdv = torch.autograd.grad(ref, [q64, k64, v64], dout.double())
    tol = 2e-2 if dtype == torch.float16 else 6e-2
    for got, want in ((out, ref), (dq, rdq), (dk, rdk), (dv, rdv)):
        assert torch.isfinite(got).all()
        assert (got.double() - want).abs().max() <= tol * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("dtype", ATTN_DTYPES, ids=str)
def test_attention_lse_matches_reference(dtype):
    B, H, Lq, Lk, D = 2, 3, 77, 91, 64
    q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=dtype) for L in (Lq, Lk, Lk))
    out, lse = attention_fwd(q, k, v, None, True, D**-0.5, 0.0, None, -1, -1, None, "cuda")
    _, ref_lse = reference.attention_forward(q.double(), k.double(), v.double(), None, True, D**-0.5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-2, rtol=2e-3)


def test_attention_strided_inputs():
    """(B, L, H, D) tensors transposed to (B, H, L, D): no copy, strides go to the kernel."""
    B, H, L, D = 2, 4, 53, 64
    q, k, v = (torch.randn(B, L, H, D, device="cuda", dtype=torch.float16).transpose(1, 2) for _ in range(3))
    got = ff.scaled_dot_product_attention(q, k, v, backend="cuda")
    want = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    assert (got.double() - want).abs().max() < 1e-2


def test_auto_falls_through_for_unsupported_head_dims():
    q = torch.randn(1, 2, 9, 40, device="cuda", dtype=torch.float16)
    assert "head dim 40" in backends.unsupported_reason("cuda", "attention", q.device,
                                                        (q, q, q, None, False, 0.1, 0.0, None, (-1, -1), None))
    with pytest.raises(backends.BackendUnavailableError):
        ff.scaled_dot_product_attention(q, q, q, backend="cuda")


# --------------------------------------------------------------------------------------------
# launches at the limits of a block, finfo.min masks, the availability probe (issue 15)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("N", [6144, 8192, 12288])
def test_rows_at_the_launch_limits(N, dtype):
    """16-byte aligned rows past 4096 elements: 1024-thread blocks on the vector path (the fp32 norm
    backward took 72 registers there before __launch_bounds__), and row caches past 48 KB of
    shared memory (N * 8 bytes in the backward: opt-in)."""
    test_softmax((3, N), -1, "contiguous", dtype)
    test_layer_norm(3, N, "residual", dtype)
    test_rms_norm(3, N, True, dtype)


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_min_filled_bf16_mask_matches_the_reference(D, causal):
    """A float mask of finfo(bfloat16).min is finite: a row masked by it everywhere attends
    uniformly (as the reference and torch), not a zero row (its scores once overflowed to -inf)."""
    B, H, Hkv, Lq, Lk = 2, 4, 2, 70, 80
    dtype = torch.bfloat16
    q = torch.randn(B, H, Lq, D, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(B, Hkv, Lk, D, device="cuda", dtype=dtype, requires_grad=True)
    v = torch.randn(B, Hkv, Lk, D, device="cuda", dtype=dtype, requires_grad=True)
    fill = torch.finfo(dtype).min
    mask = torch.zeros(B, 1, Lq, Lk, device="cuda", dtype=dtype)
    mask.masked_fill_(torch.rand(B, 1, Lq, Lk, device="cuda") > 0.5, fill)
    mask[0, 0, 3] = fill
    mask[1, 0, 64:] = fill  # whole rows, across a query block boundary
    out = ff.scaled_dot_product_attention(q, k, v, mask, is_causal=causal, enable_gqa=True, backend="cuda")
    dout = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, [q, k, v], dout)
    q64, k64, v64, ref = _reference_attention(q, k, v, mask, causal)
    rdq, rdk, rdv = torch.autograd.grad(ref, [q64, k64, v64], dout.double())
    assert (out[0, :, 3] != 0).any() and (out[1, :, 64:] != 0).any()
    for got, want in ((out, ref), (dq, rdq), (dk, rdk), (dv, rdv)):
        assert torch.isfinite(got).all()
        assert (got.double() - want).abs().max() <= 6e-2 * max(1.0, want.abs().max().item())


def test_probe_finds_this_gpu_runnable():
    from fusedformer._backends.cuda import _common

    device = torch.cuda.current_device()
    info = backends.cuda_extension().probe(device)
    assert info["capability"] == torch.cuda.get_device_capability(device)
    assert _common.runtime_reason(device) is None

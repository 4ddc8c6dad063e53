"""Triton linear_act (kernels/bias_act.py, kernels/matmul_act.py) against the float64 reference.

Both paths (gemm: the Triton GEMM with the activation epilogue; epilogue: torch GEMM + the
elementwise bias/activation kernel) on every activation and dtype, odd shapes, strided inputs,
NaN, the recompute backward and the TMA descriptors (the interpreter runs them too). On CPU this
runs under TRITON_INTERPRET=1 (conftest); shapes are small.
"""

import fusedformer as ff
import pytest
import torch
import torch.nn.functional as F
from _testing import assert_compiles_without_interpreter, assert_parity
from fusedformer import reference
from fusedformer.kernels import _autotune
from fusedformer.kernels import matmul_act as mm_kernels
from fusedformer.parity import Case, run_case
from fusedformer.vocabulary import ACTIVATIONS, FUSED_ACTIVATIONS

tl_backend = pytest.importorskip("fusedformer._backends.triton.linear_act")

ACTS = FUSED_ACTIVATIONS
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
PATHS = ("gemm", "epilogue")


def torch_linear_act(x, w, b, activation):
    """PyTorch's own computation in the input dtype: the error scale of the parity rule."""
    return ACTIVATIONS[activation].torch_forward(F.linear(x, w, b))


def case(M, K, N, activation, bias=True):
    def make(g):
        x = torch.randn(M, K, generator=g, dtype=torch.float64)
        w = torch.randn(N, K, generator=g, dtype=torch.float64) / K**0.5
        b = 0.1 * torch.randn(N, generator=g, dtype=torch.float64) if bias else None
        return [x, w, b], {}, [0, 1, 2] if bias else [0, 1]

    return Case("linear_act", {"M": M, "K": K, "N": N, "activation": activation}, make,
                lambda x, w, b, backend: ff.linear_act(x, w, b, activation, backend=backend),
                lambda x, w, b: torch_linear_act(x, w, b, activation))


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    monkeypatch.setenv("FUSEDFORMER_LINEAR_ACT_PATH", request.param)
    return request.param


# --------------------------------------------------------------------------------------------
# parity: output, dx, dW, db within 2x of PyTorch's own error
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTS)
def test_parity_every_activation(activation, dtype, path):
    assert_parity(run_case(case(37, 72, 82, activation), "triton", dtype))


@pytest.mark.parametrize("M,K,N", [(1, 24, 40), (7, 72, 82), (37, 24, 40), (5, 13, 18)])
@pytest.mark.parametrize("activation,dtype", [("gelu", torch.float16), ("swiglu", torch.bfloat16),
                                              ("gelu_tanh", torch.float32)], ids=str)
def test_parity_odd_shapes(M, K, N, activation, dtype, path):
    assert_parity(run_case(case(M, K, N, activation), "triton", dtype))


@pytest.mark.parametrize("activation", ("silu", "geglu"))
def test_parity_without_bias(activation, path):
    assert_parity(run_case(case(7, 24, 40, activation, bias=False), "triton", torch.bfloat16))


@pytest.mark.parametrize("activation", ACTS)
def test_float64_matches_reference_exactly(activation):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(9, 24, generator=g, dtype=torch.float64)
    w = torch.randn(40, 24, generator=g, dtype=torch.float64)
    b = torch.randn(40, generator=g, dtype=torch.float64)
    y, p = tl_backend.linear_act_forward(x, w, b, activation)
    y0, p0 = reference.linear_act_forward(x, w, b, activation)
    torch.testing.assert_close(y, y0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(p, p0, rtol=1e-12, atol=1e-12)
    dy = torch.randn(y0.shape, generator=g, dtype=torch.float64)
    for got, want in zip(tl_backend.linear_act_backward(dy, x, w, b, p, activation),
                         reference.linear_act_backward(dy, x, w, b, p0, activation)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# recompute backward, preact storage, strided inputs, NaN
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ("gelu", "relu", "swiglu", "identity"))
@pytest.mark.parametrize("p", PATHS)
def test_recompute_backward_matches_saved_preact(activation, p):
    g = torch.Generator().manual_seed(2)
    x, w, b = (torch.randn(19, 24, generator=g), torch.randn(82, 24, generator=g) / 5, torch.randn(82, generator=g))
    y, preact = tl_backend.forward(x, w, b, activation, path=p)
    y_only, none = tl_backend.forward(x, w, b, activation, store_preact=False, path=p)
    assert none is None
    torch.testing.assert_close(y_only, y, rtol=0, atol=0)
    dy = torch.randn(y.shape, generator=g)
    saved = tl_backend.backward(dy, x, w, b, preact, activation, path=p)
    dx, dw, db, y_re = tl_backend.backward(dy, x, w, b, None, activation, store_y=True, path=p)
    torch.testing.assert_close(y_re, y, rtol=1e-6, atol=1e-6)
    for got, want in zip((dx, dw, db), saved[:3]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    want = reference.linear_act_backward(dy.double(), x.double(), w.double(), b.double(), None, activation)
    for got, ref in zip((dx, dw, db), want):
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("activation", ("gelu", "swiglu"))
def test_strided_inputs(activation, path):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(13, 2 * 24, generator=g, dtype=torch.float64)[:, ::2]  # column stride 2
    w = torch.randn(24, 40, generator=g, dtype=torch.float64).t()  # (40, 24), transposed
    b = torch.randn(40, generator=g, dtype=torch.float64)
    for dtype in (torch.float32, torch.bfloat16):
        xs = torch.empty(13, 2 * 24, dtype=dtype)[:, ::2].copy_(x)
        ws, bs = w.to(dtype), b.to(dtype)
        assert not xs.is_contiguous() and not ws.is_contiguous()
        got = ff.linear_act(xs, ws, bs, activation, backend="triton")
        want = reference.linear_act_forward(xs.double(), ws.double(), bs.double(), activation)[0]
        tol = 1e-5 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    # a 3-D input whose rows are transposed: grad flows back to the strided view
    x3 = torch.randn(24, 3, 5, generator=g).permute(1, 2, 0).requires_grad_()
    w3, b3 = w.float().requires_grad_(), b.float().requires_grad_()
    y = ff.linear_act(x3, w3, b3, activation, backend="triton")
    dy = torch.randn(y.shape, generator=g)
    grads = torch.autograd.grad(y, (x3, w3, b3), dy)
    x3r, w3r, b3r = (t.detach().double().requires_grad_() for t in (x3, w3, b3))
    want_grads = torch.autograd.grad(ff.linear_act(x3r, w3r, b3r, activation, backend="reference"),
                                     (x3r, w3r, b3r), dy.double())
    for got, want_g in zip(grads, want_grads):
        torch.testing.assert_close(got.double(), want_g, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("activation", ACTS)
def test_nan_propagates(activation, path):
    x = torch.randn(9, 24, dtype=torch.float16)
    x[3, 5] = float("nan")
    w, b = torch.randn(40, 24, dtype=torch.float16) / 5, torch.randn(40, dtype=torch.float16)
    y, preact = tl_backend.forward(x, w, b, activation)
    assert torch.isnan(y[3]).all() and torch.isnan(preact[3]).all()
    rows = [i for i in range(9) if i != 3]
    assert torch.isfinite(y[rows]).all()
    dy = torch.randn(y.shape, dtype=torch.float16)
    dx, dw, db = tl_backend.backward(dy, x, w, b, preact, activation)[:3]
    want = reference.linear_act_backward(dy, x, w, b, preact, activation)
    for got, ref in zip((dx, dw, db), want):
        assert torch.equal(torch.isnan(got), torch.isnan(ref))
    assert torch.isnan(dw[:, 5]).all()
    # identity's dh is dy itself, and relu's (torch's threshold_backward) passes dy where h is
    # NaN: no NaN reaches dx or db through them
    if activation not in ("identity", "relu"):
        assert torch.isnan(dx[3]).all() and torch.isnan(db).all()


@pytest.mark.parametrize("activation", ("gelu", "swiglu"))
def test_no_grad_call_skips_the_preact(activation, path):
    """Without autograd ff.linear_act runs fusedformer::linear_act_infer: same y, no preact written."""
    g = torch.Generator().manual_seed(6)
    x, w, b = torch.randn(11, 24, generator=g), torch.randn(40, 24, generator=g) / 5, torch.randn(40, generator=g)
    with torch.no_grad():
        y_infer = ff.linear_act(x, w, b, activation, backend="triton")
    y_train = ff.linear_act(x, w.requires_grad_(), b, activation, backend="triton")
    torch.testing.assert_close(y_infer, y_train.detach(), rtol=0, atol=0)
    w.requires_grad_(False)
    for backend in ("triton", "reference"):
        torch.library.opcheck(torch.ops.fusedformer.linear_act_infer.default, (x, w, b, activation, backend))
        torch.library.opcheck(torch.ops.fusedformer.linear_act_infer.default, (x, w, None, activation, backend))


def test_bias_grad_is_deterministic(path):
    g = torch.Generator().manual_seed(4)
    x, w, b = torch.randn(67, 24, generator=g), torch.randn(40, 24, generator=g), torch.randn(40, generator=g)
    dy = torch.randn(67, 20, generator=g)
    first = tl_backend.backward(dy, x, w, b, None, "geglu")[2]
    assert torch.equal(first, tl_backend.backward(dy, x, w, b, None, "geglu")[2])


# --------------------------------------------------------------------------------------------
# the GEMM kernel directly: TMA descriptors, fp32 precision flag, configs, bad input
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ("gelu", "swiglu"))
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
def test_tma_descriptor_path(activation, dtype):
    g = torch.Generator().manual_seed(5)
    M, K, N = 37, 40, 82  # K * 2 bytes is a multiple of 16: descriptors are legal
    x, w, b = (torch.randn(M, K, generator=g), torch.randn(N, K, generator=g) / K**0.5, torch.randn(N, generator=g))
    assert mm_kernels.tma_eligible(x.to(dtype), w.to(dtype))
    y, p = mm_kernels.matmul_act_forward(x.to(dtype), w.to(dtype), b.to(dtype), activation, use_tma=True)
    y0, p0 = reference.linear_act_forward(x.to(dtype).double(), w.to(dtype).double(), b.to(dtype).double(), activation)
    tol = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    torch.testing.assert_close(y.double(), y0, rtol=tol, atol=tol)
    torch.testing.assert_close(p.double(), p0, rtol=tol, atol=tol)
    dy = torch.randn(y.shape, generator=g).to(dtype)
    dh, db, y_re = mm_kernels.matmul_act_dh(dy, x.to(dtype), w.to(dtype), b.to(dtype), activation, store_y=True,
                                            use_tma=True)
    dh0 = ACTIVATIONS[activation].backward(dy.double(), p0)
    torch.testing.assert_close(dh.double(), dh0, rtol=tol, atol=tol * 4)
    torch.testing.assert_close(db.double(), dh0.sum(0), rtol=tol, atol=tol * M)
    torch.testing.assert_close(y_re, y, rtol=tol, atol=tol)


def test_tma_not_used_on_unaligned_rows():
    x, w = torch.randn(5, 13, dtype=torch.float16), torch.randn(8, 13, dtype=torch.float16)
    assert not mm_kernels.tma_eligible(x, w)
    assert not mm_kernels.tma_eligible(torch.randn(5, 16), torch.randn(8, 16))  # fp32: pointer path
    # asked for TMA but the rows are 26 bytes: the pointer path runs, still correct
    y, _ = mm_kernels.matmul_act_forward(x, w, None, "relu", use_tma=True)
    torch.testing.assert_close(y.double(), torch.relu(x.double() @ w.double().t()), rtol=1e-2, atol=1e-2)


def test_fp32_precision_flag(monkeypatch):
    assert mm_kernels._input_precision(torch.float32) == "ieee"
    monkeypatch.setattr(mm_kernels, "ALLOW_TF32", True)
    assert mm_kernels._input_precision(torch.float32) == "tf32"


def _pruned(M, gated, mode, dtype=torch.bfloat16, precision="tf32"):
    named = {"X": torch.empty(1, dtype=dtype), "M_BUCKET": M}
    return mm_kernels._prune(mm_kernels._configs(), named, GATED=gated, MODE=mode, INPUT_PRECISION=precision)


def test_config_pruning():
    gated = _pruned(4096, True, 0)
    assert gated and all(c.kwargs["BLOCK_N"] <= 128 for c in gated)
    dh = _pruned(4096, False, 1)
    assert dh and all(c.kwargs["BLOCK_M"] == mm_kernels.DH_BLOCK_M for c in dh)
    small = _pruned(16, False, 0)
    assert small and all(c.kwargs["BLOCK_M"] <= 64 for c in small)
    ieee = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps)
            for c in _pruned(4096, False, 0, torch.float32, "ieee")]
    assert (64, 64, 64, 4) not in ieee and (64, 64, 16, 4) in ieee  # 932 B of spills on sm_90a; none


@pytest.mark.parametrize("smem", [_autotune.SMEM_SM80, _autotune.SMEM_SM90], ids=["sm80", "sm90"])
def test_every_dtype_keeps_a_gemm_config(smem, monkeypatch):
    monkeypatch.setattr(_autotune, "smem_limit", lambda device: smem)
    for dtype, precision in ((torch.bfloat16, "tf32"), (torch.float32, "tf32"), (torch.float32, "ieee")):
        for gated in (False, True):
            for mode in (0, 1):
                kept = _pruned(4096, gated, mode, dtype, precision)
                assert kept, (dtype, precision, gated, mode)
                elt = torch.empty(0, dtype=dtype).element_size()
                assert all(mm_kernels.fits(c, elt, gated, precision == "ieee", smem) for c in kept)


def test_bad_input():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="path"):
        tl_backend.forward(x, torch.randn(6, 8), None, "gelu", path="fast")
    with pytest.raises(ValueError, match="weight"):
        mm_kernels.matmul_act_forward(x, torch.randn(6, 7), None, "gelu")
    with pytest.raises(ValueError, match="even"):
        mm_kernels.matmul_act_forward(x, torch.randn(5, 8), None, "swiglu")
    assert "float16" in tl_backend.unsupported(x.to(torch.int32), torch.ones(6, 8, dtype=torch.int32), None, "gelu")
    assert tl_backend.unsupported(x, torch.randn(6, 8), None, "gelu") is None


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ("gelu", "swiglu", "relu"))
@pytest.mark.parametrize("use_tma", (False, True))
@pytest.mark.parametrize("M,K,N", [(4097, 1024, 4096), (333, 1000, 2730), (8, 768, 3072)])
def test_gpu_gemm_large(activation, use_tma, M, K, N, monkeypatch):
    monkeypatch.setattr(mm_kernels, "USE_TMA", use_tma)
    monkeypatch.setenv("FUSEDFORMER_LINEAR_ACT_PATH", "gemm")
    assert_parity(run_case(case(M, K, N, activation), "triton", torch.bfloat16, device="cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ("gelu", "swiglu"))
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32), ids=("bf16", "fp32_ieee"))
def test_gpu_every_gemm_config_compiles_and_matches(activation, dtype, monkeypatch):
    """Each config the prune rule keeps, forced in turn, forward and recompute backward (MODE 1)."""
    monkeypatch.setenv("FUSEDFORMER_LINEAR_ACT_PATH", "gemm")
    gated = activation == "swiglu"
    x = torch.empty(1, device="cuda", dtype=dtype)
    for mode in (0, 1):
        named = {"X": x, "M_BUCKET": 4096}
        precision = mm_kernels._input_precision(dtype)
        for config in mm_kernels._prune(mm_kernels._configs(), named, GATED=gated, MODE=mode,
                                        INPUT_PRECISION=precision):
            monkeypatch.setattr(mm_kernels._tuned_kernel, "cache", _ForcedConfig(config))
            if mode == 0:
                assert_parity(run_case(case(777, 520, 1030, activation), "triton", dtype, device="cuda"))
            else:  # dh from the recompute GEMM, checked through dx = dh @ w
                x_in = torch.randn(777, 520, device="cuda", dtype=dtype)
                w = torch.randn(1030, 520, device="cuda", dtype=dtype) / 520**0.5
                dy = torch.randn(777, 515 if gated else 1030, device="cuda", dtype=dtype)
                dh, _, _ = mm_kernels.matmul_act_dh(dy, x_in, w, None, activation)
                want = reference.linear_act_backward(dy.double(), x_in.double(), w.double(), None, None, activation)[0]
                tol = 3e-2 if dtype == torch.bfloat16 else 1e-5
                torch.testing.assert_close(dh.double() @ w.double(), want, rtol=tol, atol=tol * want.abs().max().item())


class _ForcedConfig(dict):
    """An autotune cache that answers every key with one config (no tuning)."""

    def __init__(self, config):
        super().__init__()
        self.config = config

    def __contains__(self, key):
        return True

    def __getitem__(self, key):
        return self.config


_COMPILE_SCRIPT = r'''
import os
os.environ.pop("TRITON_INTERPRET", None)
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fusedformer.kernels import bias_act as BA
from fusedformer.kernels import matmul_act as MA

# 16-byte divisibility: what the launcher's specialisation sees for aligned tensors and row strides
ALIGNED = ("X", "W", "B", "Y", "P", "DY", "DB", "H", "DH", "stride_xm", "stride_wn", "stride_dym", "stride_hm", "K")


def compile_for(kernel, ptrs, consts, arch=90, warps=8, stages=3):
    sig = {n: ("constexpr" if n in consts else ptrs.get(n, "i32")) for n in kernel.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(kernel.arg_names)
             if n in ALIGNED and n not in consts and not sig[n].startswith("tensordesc")}
    return triton.compile(ASTSource(kernel, sig, consts, attrs), target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": warps, "num_stages": stages})


def gemm(dt, tma, mode, gated, act, precision="tf32", arch=90, even_k=False):
    desc = f"tensordesc<{dt}[128, 64]>"
    ptrs = {"X": desc if tma else "*" + dt, "W": desc if tma else "*" + dt, "B": "*" + dt, "Y": "*" + dt,
            "P": "*" + dt, "DY": "*" + dt, "DB": "*fp32"}
    consts = dict(MODE=mode, ACT=act, GATED=gated, HAS_BIAS=True, STORE_Y=mode == 1, STORE_P=True, USE_TMA=tma,
                  EVEN_K=even_k, INPUT_PRECISION=precision, GROUP_M=8, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64,
                  stride_xk=1, stride_wk=1)
    return compile_for(MA._matmul_act_kernel, ptrs, consts, arch)


k = gemm("bf16", True, 0, True, 4)
assert "cp.async.bulk.tensor" in k.asm["ptx"] and "wgmma" in k.asm["ptx"], "TMA + wgmma expected on sm_90"
gemm("fp16", True, 1, False, 3)
k = gemm("bf16", False, 0, False, 2)
# the pointer path must be software-pipelined (async copies into num_stages buffers)
assert "async_copy_global_to_local" in k.asm["ttgir"] and k.metadata.shared >= 2 * 32768, k.metadata.shared
gemm("bf16", False, 1, True, 2, even_k=True)
gemm("fp32", False, 0, False, 1, precision="ieee", arch=80)
for act, gated in ((3, False), (4, True)):
    compile_for(BA._bias_act_fwd_kernel, {"H": "*bf16", "B": "*bf16", "Y": "*bf16", "P": "*bf16"},
                dict(HAS_BIAS=True, ACT=act, GATED=gated, STORE_PREACT=True, CD=tl.float32, BLOCK_M=32,
                     BLOCK_N=128), 90, 4)
    compile_for(BA._bias_act_bwd_kernel, {n: "*fp64" for n in ("DY", "H", "B", "DH", "Y", "DB")},
                dict(ADD_BIAS=True, BIAS_GRAD=True, STORE_Y=True, ACT=act, GATED=gated, CD=tl.float64, ROW_BLOCKS=8,
                     BLOCK_M=32, BLOCK_N=128), 90, 4)
print("ok")
'''


def test_kernels_compile_for_sm90_without_a_gpu(tmp_path):
    """The interpreter never runs triton's compiler: compile the GPU paths (TMA + wgmma, the pipelined
    pointer path, fp32 ieee for sm_80, the elementwise kernels) to cubins so compile-only errors and a
    lost software pipeline show up on CPU machines too."""
    assert_compiles_without_interpreter(_COMPILE_SCRIPT, tmp_path)

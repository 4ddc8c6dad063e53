"""The triton layer_norm and rms_norm against the float64 reference (2x-of-PyTorch-error rule),
output and every gradient through ff.layer_norm / ff.rms_norm(backend="triton"): optional
weight/bias, odd and long rows (looped path), strided rows, the fused residual add, NaN/inf as
torch, empty tensors, and bitwise-deterministic dweight/dbias. CPU runs the Triton interpreter."""

import fusedformer as ff
import pytest
import torch
import torch.nn.functional as F
from _testing import assert_triton_parity
from fusedformer import backends, parity, reference
from fusedformer.kernels import _rows

pytestmark = [
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning"),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EPS = {"layer_norm": 1e-5, "rms_norm": 1e-6}


@pytest.fixture(autouse=True)
def _triton_runs(device):
    reason = backends.unavailable_reason("triton", device)
    if reason:
        pytest.skip(reason)


def _norm_case(op, M, N, *, weight=True, bias=True, residual=False, view=None, pad=0):
    """ff.<op> on x (M, N + pad) sliced to N columns when pad > 0 (row stride N + pad).
    With residual the checked output is y + 0.5 * residual_out, so grad_residual_out flows."""
    has_bias = bias and op == "layer_norm"
    view = view or (lambda t: t[:, :N] if pad else t)

    def make(g):
        args = [torch.randn(M, N + pad, generator=g, dtype=torch.float64),
                1 + 0.1 * torch.randn(N, generator=g, dtype=torch.float64) if weight else None,
                0.1 * torch.randn(N, generator=g, dtype=torch.float64) if has_bias else None,
                torch.randn(M, N + pad, generator=g, dtype=torch.float64) if residual else None]
        return args, {}, [i for i, a in enumerate(args) if a is not None]

    def call(fn, x, w, b, r, **kw):
        args = (w, b) if op == "layer_norm" else (w,)
        if r is None:
            return fn(view(x), (N,), *args, eps=EPS[op], **kw)
        y, h = fn(view(x), (N,), *args, eps=EPS[op], residual=view(r), **kw)
        return y + 0.5 * h

    def ours(x, w, b, r, backend):
        return call(ff.layer_norm if op == "layer_norm" else ff.rms_norm, x, w, b, r, backend=backend)

    def theirs(x, w, b, r):
        torch_fn = F.layer_norm if op == "layer_norm" else F.rms_norm
        if r is None:
            return call(lambda t, s, *a, eps: torch_fn(t, s, *a, eps=eps), x, w, b, None)
        h = view(x) + view(r)
        args = (w, b) if op == "layer_norm" else (w,)
        return torch_fn(h, (N,), *args, eps=EPS[op]) + 0.5 * h

    shape = {"M": M, "N": N, "weight": weight, "bias": has_bias, "residual": residual, "row_stride": N + pad}
    return parity.Case(op, shape, make, ours, theirs)


OPS = ["layer_norm", "rms_norm"]
SHAPES = [(1, 1), (7, 113), (5, 1025), (3, 4099)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("op", OPS)
def test_parity(op, shape, dtype, device):
    assert_triton_parity(_norm_case(op, *shape), dtype, device)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op,weight,bias", [("layer_norm", False, False), ("layer_norm", True, False),
                                            ("layer_norm", False, True), ("rms_norm", False, False)])
def test_optional_affine(op, weight, bias, dtype, device):
    assert_triton_parity(_norm_case(op, 9, 77, weight=weight, bias=bias), dtype, device)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", OPS)
def test_residual(op, dtype, device):
    assert_triton_parity(_norm_case(op, 11, 203, residual=True), dtype, device)
    assert_triton_parity(_norm_case(op, 4, 37, residual=True, weight=False, bias=False), dtype, device)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", OPS)
def test_strided_rows(op, dtype, device):
    """Row stride != N reaches the kernel as a view (no copy), with and without residual."""
    assert_triton_parity(_norm_case(op, 6, 45, pad=19), dtype, device)
    assert_triton_parity(_norm_case(op, 6, 45, pad=3, residual=True), dtype, device)


@pytest.mark.parametrize("op", OPS)
def test_long_rows_loop(op, device):
    """N past both single-block limits (16384 forward, 8192 backward): chunked mean/M2 and
    two-pass backward with per-program partial rows."""
    assert_triton_parity(_norm_case(op, 2, 16411, residual=True), torch.float32, device)
    assert_triton_parity(_norm_case(op, 3, 9000), torch.bfloat16, device)


@pytest.mark.parametrize("op", OPS)
def test_small_blocks_loop_and_grid_stride(op, monkeypatch, device):
    """Tiny block limits and a 2-program grid: chunk loops, several tiles per program, and
    several looped rows accumulating into one partial row."""
    monkeypatch.setattr(_rows, "MAX_FUSED_FWD", 16)
    monkeypatch.setattr(_rows, "MAX_FUSED_BWD", 16)
    monkeypatch.setattr(_rows, "LOOP_BLOCK", 16)
    monkeypatch.setattr(_rows, "MAX_PROGRAMS", 2)
    for dtype in (torch.float32, torch.bfloat16):
        assert_triton_parity(_norm_case(op, 13, 53, residual=True), dtype, device)
        assert_triton_parity(_norm_case(op, 5, 40, pad=7), dtype, device)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", OPS)
def test_backward_past_single_block(op, dtype, device):
    """Backward rows past MAX_FUSED_BWD = 8192: a stats kernel reduces each row, then a (row group
    x 4096-column chunk) grid writes dx and keeps dw/db in registers. Just above the limit with
    strided rows and the residual; well above it (5 chunks, the last one partial) without affine."""
    assert_triton_parity(_norm_case(op, 3, 8193, residual=True, pad=5), dtype, device)
    assert_triton_parity(_norm_case(op, 2, 16411, weight=False, bias=False), dtype, device)


@pytest.mark.parametrize("op,weight,bias", [("layer_norm", True, True), ("layer_norm", True, False),
                                            ("layer_norm", False, True), ("rms_norm", True, False)])
def test_backward_column_chunks_over_many_rows(op, weight, bias, monkeypatch, device):
    """Tiny chunks: each (row group, column chunk) program sums dw/db over several rows, and the
    partial rows of the 4 row groups meet in sum_partials."""
    monkeypatch.setattr(_rows, "MAX_FUSED_BWD", 16)
    monkeypatch.setattr(_rows, "LOOP_BLOCK", 16)
    assert _rows.persistent_programs(29, 29, 2, device) < 29
    for dtype in (torch.float16, torch.float32):
        assert_triton_parity(_norm_case(op, 29, 61, weight=weight, bias=bias, residual=True, pad=4), dtype, device)


def _call(op, x, w, b, **kw):
    if op == "layer_norm":
        return ff.layer_norm(x, x.shape[-1:], w, b, **kw)
    return ff.rms_norm(x, x.shape[-1:], w, **kw)


@pytest.mark.parametrize("op", OPS)
def test_3d_input_and_broadcast_grad(op, device):
    """(B, L, N) input; y.sum().backward() gives the backward a stride-0 gradient."""
    x = torch.randn(2, 5, 31, device=device, requires_grad=True)
    w = torch.randn(31, device=device, requires_grad=True)
    b = torch.randn(31, device=device, requires_grad=True)
    grads = {}
    for be in ("triton", "reference"):
        xs, ws, bs = (t.detach().clone().requires_grad_(True) for t in (x, w, b))
        _call(op, xs, ws, bs, backend=be).sum().backward()
        grads[be] = (xs.grad, ws.grad, bs.grad if op == "layer_norm" else None)
    for got, want in zip(grads["triton"], grads["reference"]):
        if want is not None:
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("op", OPS)
def test_mixed_dtype_residual(op, device):
    """bf16 x with an fp32 residual stream: residual_out is fp32 and exactly x + residual, and y
    normalizes the fp32 h, as reference.py's _add_residual says."""
    M, N = 6, 70
    x = torch.randn(M, N, device=device).to(torch.bfloat16)
    r = torch.randn(M, N, device=device)
    w = torch.randn(N, device=device)
    y, h = _call(op, x, w, None, residual=r, backend="triton")
    assert h.dtype == torch.float32 and y.dtype == torch.bfloat16
    torch.testing.assert_close(h, x.float() + r, atol=0, rtol=0)
    y_ref, h_ref = _call(op, x.double(), w.double(), None, residual=r.double(), backend="reference")
    torch.testing.assert_close(y.double(), y_ref, atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("op", OPS)
def test_nan_inf_as_torch(op, device):
    x = torch.randn(6, 40, device=device)
    x[1, 3] = float("nan")
    x[2, 7] = float("inf")
    x[3, 0] = -float("inf")
    w, b = torch.randn(40, device=device), torch.randn(40, device=device)
    xs = x.clone().requires_grad_(True)
    y = _call(op, xs, w, b, backend="triton")
    if op == "layer_norm":
        want = F.layer_norm(x, (40,), w, b)
    else:
        want = F.rms_norm(x, (40,), w)
    torch.testing.assert_close(y, want, equal_nan=True, atol=1e-5, rtol=1e-5)
    y.sum().backward()
    finite_rows = [0, 4, 5]
    assert torch.isfinite(xs.grad[finite_rows]).all()
    assert torch.isnan(xs.grad[1]).all()


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape", [(0, 8), (2, 0, 8)], ids=str)
def test_empty(op, shape, device):
    x = torch.randn(*shape, device=device, requires_grad=True)
    w = torch.randn(8, device=device, requires_grad=True)
    y = _call(op, x, w, None, backend="triton")
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape
    torch.testing.assert_close(w.grad, torch.zeros(8, device=device))


@pytest.mark.parametrize("looped", [False, True])
@pytest.mark.parametrize("op", OPS)
def test_dweight_deterministic(op, looped, monkeypatch, device):
    """dW/dB come from per-program partial rows summed in a fixed order: two runs are bitwise
    equal, and several programs (4 on the interpreter) each own several tiles."""
    if looped:  # 1025 columns in 5 chunks of 256
        monkeypatch.setattr(_rows, "MAX_FUSED_BWD", 512)
        monkeypatch.setattr(_rows, "LOOP_BLOCK", 256)
    M, N = 37, 1025
    x = torch.randn(M, N, device=device)
    w = torch.randn(N, device=device)
    b = torch.randn(N, device=device)
    g = torch.randn(M, N, device=device)
    results = []
    for _ in range(2):
        ws, bs = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
        _call(op, x, ws, bs, backend="triton").backward(g)
        results.append((ws.grad, bs.grad))
    assert torch.equal(results[0][0], results[1][0])
    if op == "layer_norm":
        assert torch.equal(results[0][1], results[1][1])
    block_m = _rows.row_config(M, N, 4, backward=True)[0]
    assert _rows.persistent_programs(-(-M // block_m), M, 4, device) > 1


def test_table_functions_match_reference(device):
    """The backend table functions themselves: same returns (dtypes, None slots) as reference.py."""
    from fusedformer._backends.triton import layer_norm as tln
    from fusedformer._backends.triton import rms_norm as trms

    x, r = torch.randn(5, 24, device=device), torch.randn(5, 24, device=device, dtype=torch.float16)
    w, b = torch.randn(24, device=device), torch.randn(24, device=device)
    for got, want in [(tln.layer_norm_forward(x, w, None, 1e-5, r), reference.layer_norm_forward(x, w, None, 1e-5, r)),
                      (trms.rms_norm_forward(x, None, 1e-6, None), reference.rms_norm_forward(x, None, 1e-6, None))]:
        assert len(got) == len(want)
        for a, c in zip(got, want):
            assert (a is None) == (c is None)
            if a is not None:
                assert a.dtype == c.dtype and a.shape == c.shape
                torch.testing.assert_close(a, c, atol=2e-5, rtol=1e-5)
    _, _, mean, rstd = reference.layer_norm_forward(x, w, b, 1e-5)
    g = torch.randn(5, 24, device=device)
    got = tln.layer_norm_backward(g, x, None, b, mean, rstd, None)
    want = reference.layer_norm_backward(g, x, None, b, mean, rstd, None)
    assert got[1] is None and want[1] is None
    torch.testing.assert_close(got[0], want[0], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(got[2], want[2], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("op", OPS)
def test_float64_is_declared_unsupported(op, device):
    x = torch.randn(4, 9, dtype=torch.float64, device=device)
    args = (x, None, None, 1e-5, None) if op == "layer_norm" else (x, None, 1e-5, None)
    assert "float64" in backends.unsupported_reason("triton", op, x.device, args)
    with pytest.raises(ff.BackendUnavailableError, match="float64"):
        _call(op, x, None, None, backend="triton")


def test_compile_fullgraph(device):
    """One norm with residual through torch.compile(fullgraph=True) on the triton backend."""
    x = torch.randn(4, 7, 33, device=device)
    r = torch.randn(4, 7, 33, device=device)
    w = torch.randn(33, device=device)

    def block(x, r, w):
        y, h = ff.rms_norm(x, (33,), w, eps=1e-6, residual=r, backend="triton")
        return y * 2 + h

    inputs = [t.clone().requires_grad_(True) for t in (x, r, w)]
    out = torch.compile(block, fullgraph=True, backend="aot_eager")(*inputs)
    out.sum().backward()
    eager = [t.clone().requires_grad_(True) for t in (x, r, w)]
    want = block(*eager)
    want.sum().backward()
    torch.testing.assert_close(out, want)
    for a, c in zip(inputs, eager):
        torch.testing.assert_close(a.grad, c.grad)


@pytest.mark.gpu
@pytest.mark.parametrize("op", OPS)
def test_int64_offsets(op):
    """More than 2^31 elements (4.3 GB of bf16): the last rows land where they should."""
    x = torch.randn(65537, 32768, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(32768, device="cuda", dtype=torch.bfloat16)
    y = _call(op, x, w, None, backend="triton")
    tail = x[-3:].float()
    want = F.layer_norm(tail, (32768,), w.float()) if op == "layer_norm" else F.rms_norm(tail, (32768,), w.float())
    torch.testing.assert_close(y[-3:].float(), want, atol=3e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("N", [768, 1024, 4096, 8192])
def test_benchmark_shapes(op, N):
    """The benchmark's shapes (4096 rows, bf16) on the GPU: output and every gradient."""
    assert_triton_parity(_norm_case(op, 4096, N, residual=True), torch.bfloat16, "cuda")


def test_kernels_compile_for_sm90():
    """Every kernel compiles for the H100 (sm_90a) as launched at hidden 4096 and at a looped
    32768, with no register spills and 16-byte vector loads of the rows. Runs Triton's own
    compiler and ptxas in a subprocess (this process runs the interpreter); no GPU needed."""
    import inspect
    import json
    import os
    import subprocess
    import sys

    import triton

    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("triton's bundled ptxas is missing")
    if "constexprs" not in inspect.signature(triton.compiler.ASTSource).parameters:
        pytest.skip(f"triton {triton.__version__}'s ASTSource takes no constexprs= (the sm_90a compile helper's)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(__file__), "triton_sm90_compile.py")
    proc = subprocess.run([sys.executable, script, "4096", "32768"], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 2 * 9 + 2  # + the looped backward's two stats kernels at 32768
    for row in rows:
        assert row["spill"] == 0, row
        if row["kernel"] != "sum_partials":
            assert "ld.global.v4.b32" in row["mem"], row

"""The triton softmax against the float64 reference (2x-of-PyTorch-error rule), forward and
backward through ff.softmax(backend="triton"): odd lengths, non-last dims read through strides,
strided and broadcast inputs, the looped long-row path, NaN/inf exactly as torch, empty tensors.
On CPU the kernels run in the Triton interpreter, so shapes stay small."""

import fusedformer as ff
import pytest
import torch
from _testing import assert_triton_parity
from fusedformer import backends, parity
from fusedformer.kernels import _rows
from fusedformer.kernels import softmax as ksoftmax

pytestmark = [
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),  # masked -inf lanes
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _triton_runs(device):
    reason = backends.unavailable_reason("triton", device)
    if reason:
        pytest.skip(reason)


def _case(shape, dim, view=lambda t: t, scale=3.0):
    """softmax(view(x), dim) for x of ``shape``: ``view`` slices/transposes the cast input."""
    return parity.Case(
        "softmax", {"shape": shape, "dim": dim},
        lambda g: ([torch.randn(*shape, generator=g, dtype=torch.float64) * scale], {}, [0]),
        lambda x, backend: ff.softmax(view(x), dim, backend=backend),
        lambda x: torch.softmax(view(x), dim))


# row lengths: 1, odd, one past a block, past the fp32 single-block limit (looped path)
LAST_DIM_SHAPES = [(7, 1), (1, 7), (7, 113), (3, 1000), (2, 1025), (2, 4099)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", LAST_DIM_SHAPES, ids=str)
def test_last_dim(shape, dtype, device):
    assert_triton_parity(_case(shape, -1), dtype, device)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,dim", [((5, 37, 9), 1), ((37, 6), 0), ((3, 4, 5, 6), 2), ((2, 300, 40), 1)],
                         ids=str)
def test_other_dims(shape, dim, dtype, device):
    # (2, 300, 40) dim 1: 300 * 32 lanes exceed one columns tile, so that kernel loops
    assert_triton_parity(_case(shape, dim), dtype, device)


STRIDED = {
    "column_slice": ((9, 40), -1, lambda t: t[:, 3:36]),  # row stride 40, length 33
    "step_slice": ((9, 40), -1, lambda t: t[::2, ::3]),  # non-unit stride along the softmax dim
    "transposed": ((13, 21), -1, lambda t: t.t()),  # softmax dim has stride 21: columns kernel
    "batched_transpose": ((3, 11, 17), -1, lambda t: t.transpose(1, 2)),
    "permuted_4d": ((2, 3, 4, 5), 1, lambda t: t.permute(0, 3, 1, 2)),  # rows (0), (2, 3): two groups
    "three_groups": ((2, 3, 4, 5), -1, lambda t: t.permute(0, 2, 1, 3)),  # > 2 row groups: one copy
    "broadcast": ((1, 29), -1, lambda t: t.expand(6, 29)),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(STRIDED))
def test_strided(name, dtype, device):
    shape, dim, view = STRIDED[name]
    assert_triton_parity(_case(shape, dim, view), dtype, device)


def test_strided_inputs_are_read_in_place():
    """The layouts above reach the kernels without a copy (except three row groups)."""
    x = torch.randn(3, 11, 17)
    for t, dim in [(x.transpose(1, 2), 2), (x[:, 2:9, ::2], 2), (x, 1), (x.transpose(0, 2), 1), (x[0].t(), 0)]:
        y = torch.empty(t.shape)
        assert ksoftmax.collapse(t.shape, dim, t, y) is not None, (t.stride(), dim)
    t = torch.randn(2, 3, 4, 5).permute(0, 3, 1, 2)
    assert ksoftmax.collapse(t.shape, 1, t, torch.empty(t.shape))[:3] == (2, 12, 5)
    t = torch.randn(2, 3, 4, 5).permute(0, 2, 1, 3)
    assert ksoftmax.collapse(t.shape, 3, t, torch.empty(t.shape)) is None


def test_launchers_take_negative_dims_and_refuse_other_shapes(device):
    """The kernel launchers, called directly: a negative dim counts from the end, as torch's (it
    once indexed out of bounds), a layout the kernels cannot read is copied, and a dim out of
    range or a tensor of another shape is refused before any launch."""
    x = torch.randn(5, 37, device=device)
    y = ksoftmax.softmax_fwd(x, torch.empty_like(x), -1)
    torch.testing.assert_close(y, torch.softmax(x, -1))
    dy, y = torch.randn_like(x), torch.softmax(x, -2)
    dx = ksoftmax.softmax_bwd(dy, y, torch.empty_like(x), -2)
    torch.testing.assert_close(dx, torch._softmax_backward_data(dy, y, -2, x.dtype))
    t = torch.randn(2, 3, 4, 5, device=device).permute(0, 2, 1, 3)  # three row groups: read from a copy
    torch.testing.assert_close(ksoftmax.softmax_fwd(t, torch.empty(t.shape, device=device), -1), torch.softmax(t, -1))
    with pytest.raises(ValueError, match="dim 2 is out of range"):
        ksoftmax.softmax_fwd(x, torch.empty_like(x), 2)
    with pytest.raises(ValueError, match="every tensor must have shape"):
        ksoftmax.softmax_fwd(x, torch.empty(5, 36, device=device), 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1, 16385), (2, 65536)], ids=str)
def test_long_rows_loop(shape, dtype, device):
    """Rows longer than one block: online max/sum forward, two-pass backward."""
    assert_triton_parity(_case(shape, -1), dtype, device)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_long_rows_held_head(dtype, device):
    """Past one tile the first MAX_FUSED_FWD columns stay in registers between the passes: a
    strided row just past the limit, and rows whose maximum sits in the head or in the tail."""
    assert_triton_parity(_case((3, 16400), -1, lambda t: t[:, 5:16394]), dtype, device)
    for where in (7, 20000):
        def peaked(t, where=where):  # the row maximum at column `where`
            return t + 15.0 * (torch.arange(t.shape[-1], device=t.device) == where).to(t.dtype)
        assert_triton_parity(_case((2, 20011), -1, peaked), dtype, device)


def test_small_blocks_loop_and_grid_stride(monkeypatch, device):
    """Tiny block limits and a 2-program grid: every kernel walks chunks and several tiles."""
    monkeypatch.setattr(_rows, "MAX_FUSED_FWD", 16)
    monkeypatch.setattr(_rows, "MAX_FUSED_BWD", 16)
    monkeypatch.setattr(_rows, "LOOP_BLOCK", 16)
    monkeypatch.setattr(_rows, "MAX_PROGRAMS", 2)
    monkeypatch.setattr(ksoftmax, "COLUMN_TILE", 64)
    for shape, dim in [((9, 53), -1), ((4, 45, 7), 1)]:
        assert_triton_parity(_case(shape, dim), torch.float32, device)


def _nan_inf_rows(device, dtype):
    x = torch.randn(7, 37, dtype=dtype)
    x[0, 5] = float("nan")
    x[1, 3] = float("inf")
    x[2, :] = -float("inf")
    x[3, :20] = -float("inf")  # the first chunks of the looped path are all -inf
    x[4, 10] = -float("inf")
    x[5, 0], x[5, 1] = float("inf"), -float("inf")
    return x.to(device)


@pytest.mark.parametrize("looped", [False, True])
@pytest.mark.parametrize("dim", [-1, 0])
def test_nan_inf_as_torch(looped, dim, device, monkeypatch):
    if looped:
        monkeypatch.setattr(_rows, "MAX_FUSED_FWD", 16)
        monkeypatch.setattr(_rows, "MAX_FUSED_BWD", 16)
        monkeypatch.setattr(_rows, "LOOP_BLOCK", 16)
        monkeypatch.setattr(ksoftmax, "COLUMN_TILE", 16)
    x = _nan_inf_rows(device, torch.float32)
    x = x if dim == -1 else x.t().contiguous()
    dim = dim if dim == -1 else 0
    x_ours = x.clone().requires_grad_(True)
    x_theirs = x.clone().requires_grad_(True)
    y_ours = ff.softmax(x_ours, dim, backend="triton")
    y_theirs = torch.softmax(x_theirs, dim)
    torch.testing.assert_close(y_ours, y_theirs, equal_nan=True)
    g = torch.randn_like(y_theirs)
    y_ours.backward(g)
    y_theirs.backward(g)
    torch.testing.assert_close(x_ours.grad, x_theirs.grad, equal_nan=True)


@pytest.mark.parametrize("shape,dim", [((0, 5), -1), ((5, 0), -1), ((3, 0, 4), 0), ((0,), 0)], ids=str)
def test_empty(shape, dim, device):
    x = torch.randn(*shape, device=device, requires_grad=True)
    y = ff.softmax(x, dim, backend="triton")
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_backward_broadcast_grad(device):
    """y.sum().backward() hands the backward a stride-0 gradient."""
    x = torch.randn(6, 45, device=device, requires_grad=True)
    ff.softmax(x, -1, backend="triton").sum().backward()
    xr = x.detach().clone().requires_grad_(True)
    torch.softmax(xr, -1).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, atol=1e-6, rtol=0)


def test_float64_is_declared_unsupported(device):
    x = torch.randn(4, 9, dtype=torch.float64, device=device)
    assert "float64" in backends.unsupported_reason("triton", "softmax", x.device, (x, 1))
    with pytest.raises(ff.BackendUnavailableError, match="float64"):
        ff.softmax(x, -1, backend="triton")


def test_configs_are_cached():
    """Launch decisions are a dict lookup: the same tuple object for every row count of a bucket."""
    a = _rows.row_config(1000, 4099, 2)
    assert _rows.row_config(5000, 4099, 2) is a
    assert a[2] and a[1] == 8192  # one block holds the row: one read


def test_compile_fullgraph(device):
    x = torch.randn(5, 37, device=device, requires_grad=True)
    fn = torch.compile(lambda t: ff.softmax(t, 1, backend="triton") * 2, fullgraph=True, backend="aot_eager")
    y = fn(x)
    y.sum().backward()
    xr = x.detach().clone().requires_grad_(True)
    (torch.softmax(xr, 1) * 2).sum().backward()
    torch.testing.assert_close(y, torch.softmax(xr, 1) * 2)
    torch.testing.assert_close(x.grad, xr.grad, atol=1e-6, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("dim", [-1, 0])
def test_int64_offsets(dim):
    """More than 2^31 elements (4.3 GB of fp16): the last rows/columns land where they should."""
    x = torch.randn(65537, 32768, device="cuda", dtype=torch.float16)
    y = ff.softmax(x, dim, backend="triton")
    if dim == -1:
        torch.testing.assert_close(y[-3:], torch.softmax(x[-3:].float(), -1).half(), atol=1e-3, rtol=1e-2)
    else:
        torch.testing.assert_close(y[:, -3:], torch.softmax(x[:, -3:].float(), 0).half(), atol=1e-3, rtol=1e-2)

"""cuda backend: softmax along any dim (csrc/softmax.cu works on unit-stride rows; other dims are
moved last on this side)."""

import torch

from fusedformer._backends.cuda import _common

REQUIRED_SYMBOLS = ("softmax_forward", "softmax_backward", "set_device")


def unsupported(x, dim):
    return _common.dtype_reason("softmax", x)


def _rows(t, dim):
    """(..., N along dim, ...) -> (M, N) rows with unit stride, and the moved shape."""
    moved = t.movedim(dim, -1) if dim != t.dim() - 1 else t
    n = moved.shape[-1] if moved.dim() else 1
    return _common.unit_rows(moved.reshape(-1, n)), moved.shape


def softmax_forward(x, dim):
    ext = _common.extension(REQUIRED_SYMBOLS)
    x2, moved_shape = _rows(x, dim)
    y2 = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    M, N = x2.shape
    with _common.launch_context(x) as stream:
        ext.softmax_forward(_common.code(x), x2.data_ptr(), y2.data_ptr(), M, N, x2.stride(0), y2.stride(0),
                            _common.rows_aligned(x2, y2), stream)
    y = y2.view(moved_shape)
    return y.movedim(-1, dim) if dim != x.dim() - 1 else y


def softmax_backward(grad_y, y, dim):
    ext = _common.extension(REQUIRED_SYMBOLS)
    grad_y = grad_y.to(y.dtype)
    dy2, moved_shape = _rows(grad_y, dim)
    y2, _ = _rows(y, dim)
    dx2 = torch.empty(y2.shape, dtype=y.dtype, device=y.device)
    M, N = y2.shape
    with _common.launch_context(y) as stream:
        ext.softmax_backward(_common.code(y), dy2.data_ptr(), y2.data_ptr(), dx2.data_ptr(), M, N, dy2.stride(0),
                             y2.stride(0), dx2.stride(0), _common.rows_aligned(dy2, y2, dx2), stream)
    dx = dx2.view(moved_shape)
    return dx.movedim(-1, dim) if dim != y.dim() - 1 else dx

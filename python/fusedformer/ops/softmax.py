"""ff.softmax: softmax along any dim, fp32 math, as torch.softmax."""

import torch

from fusedformer import backends
from fusedformer._backends.tables import SOFTMAX
from fusedformer.ops._checks import FLOAT_DTYPES, check_float, check_tensor, normalize_dim
from fusedformer.ops._dispatch import call, custom_op, differentiable

OP = SOFTMAX.name


@custom_op("softmax_fwd")
def softmax_fwd(x: torch.Tensor, dim: int, backend: str) -> torch.Tensor:
    if x.numel() == 0:
        return torch.empty_like(x, memory_format=torch.contiguous_format)
    return SOFTMAX.implementation(backend).softmax_forward(x, dim)


@softmax_fwd.register_fake
def _(x, dim, backend):
    return x.new_empty(x.shape)


@custom_op("softmax_bwd")
def softmax_bwd(grad_y: torch.Tensor, y: torch.Tensor, dim: int, backend: str) -> torch.Tensor:
    if y.numel() == 0:
        return torch.empty_like(y, memory_format=torch.contiguous_format)
    return SOFTMAX.implementation(backend).softmax_backward(grad_y, y, dim)


@softmax_bwd.register_fake
def _(grad_y, y, dim, backend):
    return y.new_empty(y.shape)


def _setup_context(ctx, inputs, output):
    _, ctx.dim, ctx.backend = inputs
    ctx.save_for_backward(output)


def _backward(ctx, grad_y):
    (y,) = ctx.saved_tensors
    return call(softmax_bwd, grad_y, y, ctx.dim, ctx.backend), None, None


_softmax_fwd = differentiable(softmax_fwd, _setup_context, _backward)


def softmax(x: torch.Tensor, dim: int = -1, *, backend: str | None = None,
            dtype: torch.dtype | None = None) -> torch.Tensor:
    """Softmax of ``x`` along ``dim`` (computed in float32 for low-precision input), as
    ``torch.softmax(x, dim, dtype=dtype)``: with ``dtype`` the input is cast to it first (the
    gradient flows back through the cast, in x's dtype); a row of all -inf gives NaN, NaN
    propagates. ``x`` any shape, a floating dtype; the result has its shape and its (or
    ``dtype``'s) dtype.

    Backends: reference and torch any float dtype; triton and cuda float32/float16/bfloat16 on a
    GPU (float64 runs on the reference)."""
    if type(x) is torch.Tensor and dtype is None and type(dim) is int:  # the lean path: see lean_choice
        impl = backends.lean_choice(OP, x, backend)
        if impl is not None:
            try:
                return impl.softmax_lean(x, dim)
            except Exception:  # refused: the full path's checks name the argument
                pass
    if dtype is not None:
        check_tensor(OP, "x", x)
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"{OP}: dtype must be a torch.dtype or None, got {type(dtype).__name__}")
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"{OP}: dtype {dtype} is not a floating dtype; expected one of {FLOAT_DTYPES}")
        x = x.to(dtype)
    check_float(OP, "x", x)
    ndim = x.ndim
    dim = normalize_dim(OP, "dim", dim, ndim)
    if ndim == 0:
        return softmax(x.reshape(1), 0, backend=backend).reshape(())
    name = backends.select(OP, x.device, (x, dim), backend)
    return _softmax_fwd(x, dim, name)

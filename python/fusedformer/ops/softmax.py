"""ff.softmax: softmax along any dim, fp32 math, as torch.softmax."""

import torch

from fusedformer import backends
from fusedformer.ops._checks import check_float, normalize_dim

OP = "softmax"


@torch.library.custom_op("fusedformer::softmax_fwd", mutates_args=())
def softmax_fwd(x: torch.Tensor, dim: int, backend: str) -> torch.Tensor:
    if x.numel() == 0:
        return torch.empty_like(x, memory_format=torch.contiguous_format)
    return backends.get_op(backend, "softmax_forward")(x, dim).contiguous()


@softmax_fwd.register_fake
def _(x, dim, backend):
    return x.new_empty(x.shape)


@torch.library.custom_op("fusedformer::softmax_bwd", mutates_args=())
def softmax_bwd(grad_y: torch.Tensor, y: torch.Tensor, dim: int, backend: str) -> torch.Tensor:
    if y.numel() == 0:
        return torch.empty_like(y, memory_format=torch.contiguous_format)
    return backends.get_op(backend, "softmax_backward")(grad_y, y, dim).contiguous()


@softmax_bwd.register_fake
def _(grad_y, y, dim, backend):
    return y.new_empty(y.shape)


def _setup_context(ctx, inputs, output):
    _, ctx.dim, ctx.backend = inputs
    ctx.save_for_backward(output)


def _backward(ctx, grad_y):
    (y,) = ctx.saved_tensors
    return softmax_bwd(grad_y, y, ctx.dim, ctx.backend), None, None


softmax_fwd.register_autograd(_backward, setup_context=_setup_context)


def softmax(x, dim=-1, *, backend=None):
    """Softmax of ``x`` along ``dim`` (computed in float32 for low-precision input), as
    ``torch.softmax(x, dim)``: a row of all -inf gives NaN, NaN propagates."""
    check_float(OP, "x", x)
    dim = normalize_dim(OP, "dim", dim, x.dim())
    if x.dim() == 0:
        return softmax(x.reshape(1), 0, backend=backend).reshape(())
    name = backends.select(OP, x.device, (x, dim), backend)
    return softmax_fwd(x, dim, name)

"""ff.rms_norm: F.rms_norm, plus the pre-norm block's fused residual add."""

from collections.abc import Sequence

import torch

from fusedformer import backends
from fusedformer._backends.tables import RMS_NORM
from fusedformer.ops._checks import as_rows, as_vector
from fusedformer.ops._dispatch import call, custom_op, differentiable, reshaped
from fusedformer.ops.layer_norm import lean_norm, plain_call, validate_norm
from fusedformer.vocabulary import compute_dtype, rms_norm_eps

OP = RMS_NORM.name


@custom_op("rms_norm_fwd")
def rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor | None, eps: float, residual: torch.Tensor | None,
                 backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (M, N) -> (y, residual_out or an empty tensor, rstd)."""
    if x.numel() == 0:
        res = x.new_empty(x.shape, dtype=residual.dtype) if residual is not None else x.new_empty(0)
        return x.new_empty(x.shape), res, x.new_empty(x.shape[0], dtype=compute_dtype(x))
    y, res, rstd = RMS_NORM.implementation(backend).rms_norm_forward(x, weight, eps, residual)
    return y, res if res is not None else x.new_empty(0), rstd


@rms_norm_fwd.register_fake
def _(x, weight, eps, residual, backend):
    res = x.new_empty(x.shape, dtype=residual.dtype) if residual is not None else x.new_empty(0)
    return x.new_empty(x.shape), res, x.new_empty(x.shape[0], dtype=compute_dtype(x))


@custom_op("rms_norm_bwd")
def rms_norm_bwd(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, rstd: torch.Tensor,
                 grad_residual_out: torch.Tensor | None, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (dx, dweight or an empty tensor)."""
    if x.numel() == 0:
        return x.new_empty(x.shape), torch.zeros_like(weight) if weight is not None else x.new_empty(0)
    dx, dw = RMS_NORM.implementation(backend).rms_norm_backward(grad_y, x, weight, rstd, grad_residual_out)
    return dx, dw if dw is not None else x.new_empty(0)


@rms_norm_bwd.register_fake
def _(grad_y, x, weight, rstd, grad_residual_out, backend):
    return x.new_empty(x.shape), weight.new_empty(weight.shape) if weight is not None else x.new_empty(0)


def _setup_context(ctx, inputs, output):
    x, weight, eps, residual, backend = inputs
    _, res, rstd = output
    ctx.backend = backend
    ctx.has_residual = residual is not None
    ctx.residual_dtype = residual.dtype if residual is not None else None
    ctx.save_for_backward(res if residual is not None else x, weight, rstd)


def _backward(ctx, grad_y, grad_res, grad_rstd):
    h, weight, rstd = ctx.saved_tensors
    dx, dw = call(rms_norm_bwd, grad_y, h, weight, rstd, grad_res if ctx.has_residual else None, ctx.backend)
    dres = dx.to(ctx.residual_dtype) if ctx.has_residual else None
    return dx, dw if weight is not None else None, None, dres, None


def _inference(x, weight, eps, residual, backend):
    """rms_norm_fwd for eager calls no gradient flows from: the backend's inference entry, no rstd."""
    if x.numel() == 0:
        return rms_norm_fwd.body(x, weight, eps, residual, backend)
    return (*RMS_NORM.implementation(backend).rms_norm_inference(x, weight, eps, residual), None)


_rms_norm_fwd = differentiable(rms_norm_fwd, _setup_context, _backward, _inference)


def rms_norm(x: torch.Tensor, normalized_shape: int | Sequence[int], weight: torch.Tensor | None = None,
             eps: float | None = None, *, residual: torch.Tensor | None = None,
             backend: str | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """F.rms_norm(x, normalized_shape, weight, eps): x * rsqrt(mean(x^2) + eps) * weight, eps
    defaulting to the epsilon of the dtype the math runs in, as torch: float64's for float64,
    float32's for every other dtype (float16/bfloat16 too). With ``residual=`` it normalizes
    h = x + residual and returns ``(out, h)``. Shapes and dtypes as layer_norm.

    Backends: reference and torch any float dtype; triton float32/float16/bfloat16; cuda
    float32/float16/bfloat16 with the residual in x's dtype."""
    if type(x) is torch.Tensor and (eps is None or type(eps) is float and eps >= 0.0):  # the lean path
        impl = backends.lean_choice(OP, x, backend)  # (see backends.lean_choice)
        if impl is not None:
            if residual is None:
                try:
                    return impl.rms_norm_lean(x, normalized_shape, weight, eps)
                except Exception:  # refused: the full path's checks name the argument
                    pass
            elif plain_call(x, normalized_shape, weight, None, eps, residual) and x.numel():
                return lean_norm(x, residual, impl.rms_norm_inference, weight, rms_norm_eps(x, eps))
    n_dims = validate_norm(OP, x, normalized_shape, weight, None, eps, residual)
    eps = float(rms_norm_eps(x, eps))
    x2 = as_rows(x, n_dims)
    r2 = as_rows(residual, n_dims) if residual is not None else None
    w = as_vector(weight)
    name = backends.select(OP, x.device, (x2, w, eps, r2), backend)
    y, res, _ = _rms_norm_fwd(x2, w, eps, r2, name)
    if residual is None:
        return reshaped(y, x.shape)
    return reshaped(y, x.shape), reshaped(res, x.shape)

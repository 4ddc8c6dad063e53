"""ff.layer_norm: F.layer_norm, plus the pre-norm block's fused residual add."""

from collections.abc import Sequence

import torch

from fusedformer import backends
from fusedformer._backends.tables import LAYER_NORM
from fusedformer.ops._checks import (
    FLOAT_DTYPES,
    as_rows,
    as_vector,
    check_float,
    check_number,
    check_same_device,
    check_shape,
    normalized_size,
)
from fusedformer.ops._dispatch import call, custom_op, differentiable, reshaped
from fusedformer.vocabulary import compute_dtype

OP = LAYER_NORM.name


@custom_op("layer_norm_fwd")
def layer_norm_fwd(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                   residual: torch.Tensor | None, backend: str
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (M, N) -> (y, residual_out or an empty tensor, mean, rstd)."""
    if x.numel() == 0:
        M = x.shape[0]
        res = x.new_empty(x.shape, dtype=residual.dtype) if residual is not None else x.new_empty(0)
        return x.new_empty(x.shape), res, x.new_empty(M, dtype=compute_dtype(x)), x.new_empty(
            M, dtype=compute_dtype(x))
    y, res, mean, rstd = LAYER_NORM.implementation(backend).layer_norm_forward(x, weight, bias, eps, residual)
    return y, res if res is not None else x.new_empty(0), mean, rstd


@layer_norm_fwd.register_fake
def _(x, weight, bias, eps, residual, backend):
    M = x.shape[0]
    res = x.new_empty(x.shape, dtype=residual.dtype) if residual is not None else x.new_empty(0)
    return x.new_empty(x.shape), res, x.new_empty(M, dtype=compute_dtype(x)), x.new_empty(M, dtype=compute_dtype(x))


@custom_op("layer_norm_bwd")
def layer_norm_bwd(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None,
                   bias: torch.Tensor | None, mean: torch.Tensor, rstd: torch.Tensor,
                   grad_residual_out: torch.Tensor | None, backend: str
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dx, dweight or an empty tensor, dbias or an empty tensor)."""
    if x.numel() == 0:
        dx = x.new_empty(x.shape)
        dw = torch.zeros_like(weight) if weight is not None else x.new_empty(0)
        db = torch.zeros_like(bias) if bias is not None else x.new_empty(0)
        return dx, dw, db
    dx, dw, db = LAYER_NORM.implementation(backend).layer_norm_backward(
        grad_y, x, weight, bias, mean, rstd, grad_residual_out)
    return dx, dw if dw is not None else x.new_empty(0), db if db is not None else x.new_empty(0)


@layer_norm_bwd.register_fake
def _(grad_y, x, weight, bias, mean, rstd, grad_residual_out, backend):
    dw = weight.new_empty(weight.shape) if weight is not None else x.new_empty(0)
    db = bias.new_empty(bias.shape) if bias is not None else x.new_empty(0)
    return x.new_empty(x.shape), dw, db


def _setup_context(ctx, inputs, output):
    x, weight, bias, eps, residual, backend = inputs
    _, res, mean, rstd = output
    ctx.backend = backend
    ctx.has_residual = residual is not None
    ctx.residual_dtype = residual.dtype if residual is not None else None
    # backward normalizes what the forward normalized: h = x + residual when there is one
    ctx.save_for_backward(res if residual is not None else x, weight, bias, mean, rstd)


def _backward(ctx, grad_y, grad_res, grad_mean, grad_rstd):
    h, weight, bias, mean, rstd = ctx.saved_tensors
    grad_res = grad_res if ctx.has_residual else None
    dx, dw, db = call(layer_norm_bwd, grad_y, h, weight, bias, mean, rstd, grad_res, ctx.backend)
    dres = dx.to(ctx.residual_dtype) if ctx.has_residual else None
    return (dx, dw if weight is not None else None, db if bias is not None else None, None, dres, None)


def _inference(x, weight, bias, eps, residual, backend):
    """layer_norm_fwd for eager calls no gradient flows from: the backend's inference entry, no
    mean/rstd (None)."""
    if x.numel() == 0:
        return layer_norm_fwd.body(x, weight, bias, eps, residual, backend)
    return (*LAYER_NORM.implementation(backend).layer_norm_inference(x, weight, bias, eps, residual), None, None)


_layer_norm_fwd = differentiable(layer_norm_fwd, _setup_context, _backward, _inference)


def plain_call(x, normalized_shape, weight, bias, eps, residual):
    """Whether the call is the common valid one (one normalized dim, float tensors of the right
    shapes on x's device, weight and bias in x's dtype, eps a float >= 0 or None), told in a few
    attribute reads: a small norm's checks one by one cost more than its kernel. False sends the
    call through every check."""
    if not isinstance(x, torch.Tensor):
        return False
    dtype = x.dtype
    n = normalized_shape[0] if type(normalized_shape) is tuple and len(normalized_shape) == 1 else normalized_shape
    if (dtype not in FLOAT_DTYPES or not x.ndim or type(n) is not int or x.shape[-1] != n
            or not (eps is None or type(eps) is float and eps >= 0.0)):
        return False
    device, shape = x.device, (n,)
    for t in (weight, bias):
        if t is not None and not (isinstance(t, torch.Tensor) and t.dtype is dtype and t.shape == shape
                                  and t.device == device):
            return False
    return residual is None or (isinstance(residual, torch.Tensor) and residual.dtype in FLOAT_DTYPES
                                and residual.shape == x.shape and residual.device == device)


def validate_norm(op, x, normalized_shape, weight, bias, eps, residual):
    """Shared by layer_norm and rms_norm: returns the number of normalized (trailing) dims."""
    if plain_call(x, normalized_shape, weight, bias, eps, residual):
        return 1
    check_float(op, "x", x)
    shape, _ = normalized_size(op, x, normalized_shape)
    for name, t in (("weight", weight), ("bias", bias)):
        check_float(op, name, t, optional=True)
        check_shape(op, name, t, shape)
    check_float(op, "residual", residual, optional=True)
    check_shape(op, "residual", residual, x.shape)
    check_same_device(op, "x", x, weight=weight, bias=bias, residual=residual)
    if eps is not None:
        check_number(op, "eps", eps, low=0.0)
    return len(shape)


def lean_norm(x, residual, inference, *params):
    """A norm's lean path, the call told valid by plain_call: ``inference(rows, *params,
    residual rows)``, its outputs in x's shape. x is not empty (backends may assume rows)."""
    if residual is None and x.ndim == 2 and x.is_contiguous():  # rows already: no shape round trip (~7k)
        return inference(x, *params, None)[0]
    y, res = inference(as_rows(x, 1), *params, as_rows(residual, 1) if residual is not None else None)
    if residual is None:
        return reshaped(y, x.shape)
    return reshaped(y, x.shape), reshaped(res, x.shape)


def layer_norm(x: torch.Tensor, normalized_shape: int | Sequence[int], weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, eps: float = 1e-5, *, residual: torch.Tensor | None = None,
               backend: str | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """F.layer_norm(x, normalized_shape, weight, bias, eps). With ``residual=`` it normalizes
    h = x + residual and returns ``(out, h)``: the pre-norm block's add & norm in one pass.
    ``x`` (..., *normalized_shape), ``weight``/``bias`` normalized_shape; fp32 math inside, the
    result in x's dtype.

    Backends: reference and torch any float dtype; triton float32/float16/bfloat16 (residual of any
    of them); cuda float32/float16/bfloat16 with the residual in x's dtype."""
    if type(x) is torch.Tensor and type(eps) is float and eps >= 0.0:  # the lean path (see backends.lean_choice)
        impl = backends.lean_choice(OP, x, backend)
        if impl is not None:
            if residual is None:
                try:
                    return impl.layer_norm_lean(x, normalized_shape, weight, bias, eps)
                except Exception:  # refused: the full path's checks name the argument
                    pass
            elif plain_call(x, normalized_shape, weight, bias, eps, residual) and x.numel():
                return lean_norm(x, residual, impl.layer_norm_inference, weight, bias, eps)
    check_number(OP, "eps", eps)  # no default epsilon here (rms_norm's None): None is refused, as torch
    n_dims = validate_norm(OP, x, normalized_shape, weight, bias, eps, residual)
    x2 = as_rows(x, n_dims)
    r2 = as_rows(residual, n_dims) if residual is not None else None
    w, b = as_vector(weight), as_vector(bias)
    name = backends.select(OP, x.device, (x2, w, b, float(eps), r2), backend)
    y, res, _, _ = _layer_norm_fwd(x2, w, b, float(eps), r2, name)
    if residual is None:
        return reshaped(y, x.shape)
    return reshaped(y, x.shape), reshaped(res, x.shape)

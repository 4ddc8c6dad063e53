"""Triton layer norm: the layer_norm rows of backends.py's op table (same contract as reference.py).
The launchers here also serve rms_norm.py: one set of kernels runs both norms."""

import torch

from fusedformer.kernels import layer_norm as _k

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def unsupported_dtype(op, **tensors):
    """Why the kernels cannot take these tensors (the first with another dtype), or None."""
    for name, t in tensors.items():
        if t is not None and t.dtype not in _DTYPES:
            return f"{op}: {name} has dtype {t.dtype}; the triton kernels take float16, bfloat16, float32"
    return None


def unsupported(x, weight, bias, eps, residual):
    return unsupported_dtype("layer_norm", x=x, weight=weight, bias=bias, residual=residual)


def unit_columns(t):
    """t with unit column stride (a view when it already has one; any row stride, even 0)."""
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def norm_forward(x, weight, bias, eps, residual, rms):
    """(y, residual_out, mean, rstd) of x (M, N) > 0 elements; mean is None for RMS norm."""
    M, N = x.shape
    x, residual = unit_columns(x), unit_columns(residual)
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    res_out = torch.empty((M, N), dtype=residual.dtype, device=x.device) if residual is not None else None
    mean = None if rms else torch.empty(M, dtype=torch.float32, device=x.device)
    rstd = torch.empty(M, dtype=torch.float32, device=x.device)
    return _k.norm_fwd(x, unit_columns(weight), unit_columns(bias), float(eps), residual, y, res_out, mean, rstd)


def norm_backward(grad_y, x, weight, bias, mean, rstd, grad_residual_out):
    """(dx, dweight, dbias) of x (M, N) > 0 elements; mean is None for RMS norm."""
    x, grad_y, grad_residual_out = unit_columns(x), unit_columns(grad_y), unit_columns(grad_residual_out)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dw = torch.empty_like(weight, memory_format=torch.contiguous_format) if weight is not None else None
    db = torch.empty_like(bias, memory_format=torch.contiguous_format) if bias is not None else None
    return _k.norm_bwd(grad_y, x, unit_columns(weight), mean if mean is None else mean.contiguous(),
                       rstd.contiguous(), grad_residual_out, dx, dw, db)


def layer_norm_forward(x, weight, bias, eps, residual=None):
    return norm_forward(x, weight, bias, eps, residual, rms=False)


def layer_norm_backward(grad_y, x, weight, bias, mean, rstd, grad_residual_out=None):
    return norm_backward(grad_y, x, weight, bias, mean, rstd, grad_residual_out)

"""Triton layer norm: the layer_norm rows of backends.py's op table (same contract as reference.py)."""

import torch

from fusedformer import reference
from fusedformer.kernels import layer_norm as _k

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def unsupported(x, weight, bias, eps, residual):
    for name, t in (("x", x), ("weight", weight), ("bias", bias), ("residual", residual)):
        if t is not None and t.dtype not in _DTYPES:
            return f"layer_norm: {name} has dtype {t.dtype}; the triton kernels take float16, bfloat16, float32"
    return None


def unit_columns(t):
    """t with unit column stride (a view when it already has one; any row stride, even 0)."""
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def layer_norm_forward(x, weight, bias, eps, residual=None):
    if x.numel() == 0:
        return reference.layer_norm_forward(x, weight, bias, eps, residual)
    M, N = x.shape
    x, residual = unit_columns(x), unit_columns(residual)
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    res_out = torch.empty((M, N), dtype=residual.dtype, device=x.device) if residual is not None else None
    mean = torch.empty(M, dtype=torch.float32, device=x.device)
    rstd = torch.empty(M, dtype=torch.float32, device=x.device)
    return _k.layer_norm_fwd(x, unit_columns(weight), unit_columns(bias), float(eps), residual, y, res_out, mean,
                             rstd)


def layer_norm_backward(grad_y, x, weight, bias, mean, rstd, grad_residual_out=None):
    if x.numel() == 0:
        return reference.layer_norm_backward(grad_y, x, weight, bias, mean, rstd, grad_residual_out)
    x, grad_y, grad_residual_out = unit_columns(x), unit_columns(grad_y), unit_columns(grad_residual_out)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dw = torch.empty_like(weight, memory_format=torch.contiguous_format) if weight is not None else None
    db = torch.empty_like(bias, memory_format=torch.contiguous_format) if bias is not None else None
    return _k.layer_norm_bwd(grad_y, x, unit_columns(weight), mean.contiguous(), rstd.contiguous(),
                             grad_residual_out, dx, dw, db)

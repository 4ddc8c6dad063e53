"""Triton RMS norm: the rms_norm rows of backends.py's op table (same contract as reference.py)."""

import torch

from fusedformer import reference
from fusedformer._backends.triton.layer_norm import unit_columns
from fusedformer.kernels import rms_norm as _k

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def unsupported(x, weight, eps, residual):
    for name, t in (("x", x), ("weight", weight), ("residual", residual)):
        if t is not None and t.dtype not in _DTYPES:
            return f"rms_norm: {name} has dtype {t.dtype}; the triton kernels take float16, bfloat16, float32"
    return None


def rms_norm_forward(x, weight, eps, residual=None):
    if x.numel() == 0:
        return reference.rms_norm_forward(x, weight, eps, residual)
    M, N = x.shape
    x, residual = unit_columns(x), unit_columns(residual)
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    res_out = torch.empty((M, N), dtype=residual.dtype, device=x.device) if residual is not None else None
    rstd = torch.empty(M, dtype=torch.float32, device=x.device)
    return _k.rms_norm_fwd(x, unit_columns(weight), float(eps), residual, y, res_out, rstd)


def rms_norm_backward(grad_y, x, weight, rstd, grad_residual_out=None):
    if x.numel() == 0:
        return reference.rms_norm_backward(grad_y, x, weight, rstd, grad_residual_out)
    x, grad_y, grad_residual_out = unit_columns(x), unit_columns(grad_y), unit_columns(grad_residual_out)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dw = torch.empty_like(weight, memory_format=torch.contiguous_format) if weight is not None else None
    return _k.rms_norm_bwd(grad_y, x, unit_columns(weight), rstd.contiguous(), grad_residual_out, dx, dw)

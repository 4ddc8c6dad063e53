"""torch RMS norm: aten's _fused_rms_norm forward (what F.rms_norm runs); same contract as
reference.py. torch has no CPU kernel for its backward (autograd differentiates F.rms_norm's
decomposition there), so the backward is the closed form in a few fused torch ops."""

import torch

from fusedformer._backends.torch.layer_norm import backward_dtype, cast, normalized_input
from fusedformer.vocabulary import compute_dtype, rms_norm_eps


def _decomposed_rms_norm(x, normalized_shape, weight, eps):
    """aten::_fused_rms_norm as torch decomposes it (torch/_decomp), for the torch versions
    without the op: (y in x's dtype, rstd (M, 1) in the compute dtype). Last dimension only."""
    xc = cast(x, compute_dtype(x))
    rstd = torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)
    y = xc * rstd
    return cast(y * weight if weight is not None else y, x.dtype), rstd


# torch's Python binding of aten::_fused_rms_norm: ~14k instructions less per call than torch.ops.aten's.
# torch 2.5 has no such op (2.8 has).
_fused_rms_norm = getattr(torch, "_fused_rms_norm", _decomposed_rms_norm)


def _fused_forward(x, weight, eps, residual):
    """(y, residual_out, rstd (M, 1)) as _fused_rms_norm gives them."""
    h, residual_out, (w,) = normalized_input(x, residual, weight)
    y, rstd = _fused_rms_norm(h, [h.shape[-1]], w, eps)
    return cast(y, x.dtype), residual_out, rstd


def rms_norm_forward(x, weight, eps, residual=None):
    y, residual_out, rstd = _fused_forward(x, weight, eps, residual)
    return y, residual_out, cast(rstd.view(-1), compute_dtype(x))


def rms_norm_inference(x, weight, eps, residual=None):
    """Without the statistic's reshape and cast; the kernel alone when nothing needs casting."""
    if residual is None and (weight is None or weight.dtype == x.dtype):
        return _fused_rms_norm(x, [x.shape[-1]], weight, eps)[0], None
    return _fused_forward(x, weight, eps, residual)[:2]


def rms_norm_lean(x, normalized_shape, weight, eps):
    """F.rms_norm itself when x is a float tensor and the weight (if any) shares its dtype: torch
    takes complex x and integer weights, which the op refuses, and warns on a mixed float weight,
    which the full path casts quietly. The default epsilon is spelled out: torch 2.5's is a 16-bit
    x's own."""
    if not x.is_floating_point() or weight is not None and weight.dtype is not x.dtype:
        raise TypeError("rms_norm: the full path checks or casts these dtypes")
    return torch.rms_norm(x, normalized_shape, weight, rms_norm_eps(x, eps))


def rms_norm_backward(grad_y, x, weight, rstd, grad_residual_out=None):
    """With xhat = x * rstd and g = dy * weight: dx = rstd * (g - xhat * mean(g * xhat)),
    dweight = sum_rows(dy * xhat)."""
    dtype = backward_dtype(x, grad_y, weight)
    dy = cast(grad_y, dtype)
    r = cast(rstd, dtype)[:, None]
    xhat = cast(x, dtype) * r
    g = dy * cast(weight, dtype) if weight is not None else dy
    dot = torch.linalg.vecdot(g, xhat).unsqueeze(-1).div_(x.shape[-1])
    dx = torch.addcmul(g, xhat, dot, value=-1).mul_(r)
    if grad_residual_out is not None:
        dx += cast(grad_residual_out, dtype)
    dweight = cast(torch.linalg.vecdot(dy.t(), xhat.t()), weight.dtype) if weight is not None else None
    return cast(dx, x.dtype), dweight

"""Triton RMS norm: the rms_norm rows of backends.py's op table (same contract as reference.py),
on the layer norm kernels with their RMS switch (mean=None)."""

from fusedformer._backends.triton.layer_norm import norm_backward, norm_forward, norm_lean, unsupported_dtype
from fusedformer.vocabulary import rms_norm_eps


def unsupported(x, weight, eps, residual):
    return unsupported_dtype("rms_norm", x=x, weight=weight, residual=residual)


def rms_norm_forward(x, weight, eps, residual=None):
    y, res_out, _, rstd = norm_forward(x, weight, None, eps, residual, rms=True)
    return y, res_out, rstd


def rms_norm_lean(x, normalized_shape, weight, eps):
    """See layer_norm.norm_lean."""
    return norm_lean(x, normalized_shape, weight, None, rms_norm_eps(x, eps), rms=True)


def rms_norm_backward(grad_y, x, weight, rstd, grad_residual_out=None):
    dx, dw, _ = norm_backward(grad_y, x, weight, None, None, rstd, grad_residual_out)
    return dx, dw

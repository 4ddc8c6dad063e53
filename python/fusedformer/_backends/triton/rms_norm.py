"""Triton RMS norm: the rms_norm rows of backends.py's op table (same contract as reference.py),
on the layer norm kernels with their RMS switch (mean=None)."""

from fusedformer._backends.triton.layer_norm import norm_backward, norm_forward, unsupported_dtype


def unsupported(x, weight, eps, residual):
    return unsupported_dtype("rms_norm", x=x, weight=weight, residual=residual)


def rms_norm_forward(x, weight, eps, residual=None):
    y, res_out, _, rstd = norm_forward(x, weight, None, eps, residual, rms=True)
    return y, res_out, rstd


def rms_norm_backward(grad_y, x, weight, rstd, grad_residual_out=None):
    dx, dw, _ = norm_backward(grad_y, x, weight, None, None, rstd, grad_residual_out)
    return dx, dw

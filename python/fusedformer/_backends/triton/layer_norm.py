"""Triton layer norm: the layer_norm rows of backends.py's op table (same contract as reference.py).
The launchers here also serve rms_norm.py: one set of kernels runs both norms."""

import torch

from fusedformer._backends.triton._guards import Refused
from fusedformer.kernels import layer_norm as _k
from fusedformer.vocabulary import EAGER_TENSOR_TYPES, empty_dense

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
    y = empty_dense(x)  # x is (M, N)
    res_out = empty_dense(residual) if residual is not None else None
    mean = None if rms else torch.empty(M, dtype=torch.float32, device=x.device)
    rstd = torch.empty(M, dtype=torch.float32, device=x.device)
    return _k.norm_fwd(x, unit_columns(weight), unit_columns(bias), float(eps), residual, y, res_out, mean, rstd)


def norm_backward(grad_y, x, weight, bias, mean, rstd, grad_residual_out):
    """(dx, dweight, dbias) of x (M, N) > 0 elements; mean is None for RMS norm."""
    x, grad_y, grad_residual_out = unit_columns(x), unit_columns(grad_y), unit_columns(grad_residual_out)
    dx = empty_dense(x)
    dw = empty_dense(weight) if weight is not None else None
    db = empty_dense(bias) if bias is not None else None
    return _k.norm_bwd(grad_y, x, unit_columns(weight), mean if mean is None else mean.contiguous(),
                       rstd.contiguous(), grad_residual_out, dx, dw, db)


def norm_lean(x, normalized_shape, weight, bias, eps, rms):
    """y of a norm's lean call, x (..., N) normalized over its last dim: norm_forward on x's rows,
    as the full path runs it. The ops' lean path checked only eps (a float >= 0, or None for RMS
    norm, made the full path's default by rms_norm_lean) and that there is no residual; this refuses
    every call but the plain one that ops/layer_norm's plain_call admits, and of those the ones
    the full path answers otherwise:

    - x's dtype not one the kernels take (an integer or complex x the full path refuses; float64,
      which it refuses for triton by name or runs on torch under ``auto``);
    - normalized_shape not one int (alone or in a 1-tuple) equal to x's last dim (a 0-D x has
      none: its shape[-1] raises): other valid shapes (several dims, a list) take the full path,
      the invalid ones (8.0 among them, equal to 8) are refused there;
    - an empty x: the op body answers it without the backend (norm_forward wants rows);
    - a weight or bias not a plain tensor of x's dtype, shape (N,) and device: another device is
      refused by the full path, another float dtype it passes to the kernels mixed (not here),
      and a tensor subclass takes the custom op.

    What passes is the full path's call: rows x.reshape(-1, N) (a view when the strides allow,
    as the full path's), the same norm_forward (unit column strides, the kernel, its config), y
    reshaped back (a view: y is contiguous)."""
    dtype, shape = x.dtype, x.shape
    n = normalized_shape[0] if type(normalized_shape) is tuple and len(normalized_shape) == 1 else normalized_shape
    if dtype not in _DTYPES or type(n) is not int or shape[-1] != n or x.numel() == 0:  # 0-D: shape[-1] raises
        raise Refused
    if weight is not None or bias is not None:
        device, params = x.device, (n,)
        for t in (weight, bias):
            if t is not None and not (type(t) in EAGER_TENSOR_TYPES and t.dtype is dtype and t.shape == params
                                      and t.device == device):
                raise Refused
    if len(shape) == 2:  # rows already: no reshape round trip
        return norm_forward(x, weight, bias, eps, None, rms)[0]
    return norm_forward(x.reshape(-1, n), weight, bias, eps, None, rms)[0].reshape(shape)


def layer_norm_lean(x, normalized_shape, weight, bias, eps):
    """See norm_lean."""
    return norm_lean(x, normalized_shape, weight, bias, eps, rms=False)


def layer_norm_forward(x, weight, bias, eps, residual=None):
    return norm_forward(x, weight, bias, eps, residual, rms=False)


def layer_norm_backward(grad_y, x, weight, bias, mean, rstd, grad_residual_out=None):
    return norm_backward(grad_y, x, weight, bias, mean, rstd, grad_residual_out)

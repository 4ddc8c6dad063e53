"""Triton softmax: the softmax rows of backends.py's op table (same contract as reference.py)."""

import torch

from fusedformer._backends.triton._guards import Refused
from fusedformer.kernels import softmax as _k
from fusedformer.vocabulary import empty_dense

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def unsupported(x, dim):
    if x.dtype not in _DTYPES:
        return f"softmax: dtype {x.dtype} is not supported by the triton kernels (float16, bfloat16, float32)"
    return None


def softmax_forward(x, dim):
    y = empty_dense(x)
    if x.numel() == 0:
        return y
    return _k.softmax_fwd(x, y, dim)  # reads x through its strides, or copies a layout it cannot


def softmax_lean(x, dim):
    """softmax_forward for ff.softmax's lean call (any tensor, an int dim, nothing checked).
    Refuses, so that the full path answers (or raises), what softmax_forward would not answer as
    the full path does: a dtype the kernels do not take (the full path refuses it, or ``auto``
    runs it on torch), a dim out of range (refused; and an empty tensor, which softmax_forward
    answers without looking at dim, must not pass with one), a 0-D tensor (the op reshapes it).
    That suffices: there is no other tensor to check, an empty x gets the op body's answer
    (a contiguous empty tensor of x's shape and dtype), and any layout the kernels cannot read
    softmax_forward copies, as on the full path."""
    ndim = x.ndim
    if x.dtype not in _DTYPES or not -ndim <= dim < ndim:
        raise Refused
    return softmax_forward(x, dim % ndim)  # the full path's normalized dim


def softmax_backward(grad_y, y, dim):
    dx = empty_dense(y)
    if y.numel() == 0:
        return dx
    return _k.softmax_bwd(grad_y.to(y.dtype), y, dx, dim)  # copies layouts it cannot read

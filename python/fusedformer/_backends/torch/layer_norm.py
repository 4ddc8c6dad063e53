"""torch layer norm: aten's native_layer_norm and native_layer_norm_backward (what F.layer_norm
runs), same contract as reference.py.

torch's kernels widen low-precision input internally, so x goes in as it is. A residual add, or a
weight of another dtype than x, makes the math run in the compute dtype instead (h = x + residual
is normalized unrounded, as the reference does). The backward of low-precision input runs in
float32: the saved mean and rstd are float32 by contract, and the kernel wants them in x's dtype.
"""

import torch

from fusedformer.vocabulary import compute_dtype


def normalized_input(x, residual, *params):
    """(h, residual_out, params): the tensor to normalize, the residual stream's next value (None
    without residual) and the weight/bias in h's dtype. Shared with rms_norm."""
    if residual is None and _same_dtype(x.dtype, params):
        return x, None, params
    cd = compute_dtype(x)
    h = x.to(cd) if residual is None else x.to(cd) + residual.to(cd)
    residual_out = h.to(residual.dtype) if residual is not None else None
    return h, residual_out, tuple(p.to(cd) if p is not None else None for p in params)


def _same_dtype(dtype, params):
    for p in params:  # a loop, not all(generator): this runs on every call
        if p is not None and p.dtype != dtype:
            return False
    return True


def backward_dtype(x, grad_y, *params):
    """The dtype a norm backward runs in: x's own when every tensor shares it and it is float32
    or float64, else the compute dtype (float32 for low precision). Shared with rms_norm."""
    cd = compute_dtype(x)
    same = x.dtype == cd and grad_y.dtype == cd and all(p is None or p.dtype == cd for p in params)
    return x.dtype if same else cd


def cast(t, dtype):
    """t in ``dtype`` (None stays None); t itself when it has it: a .to() that changes nothing
    still costs ~9k instructions, a third of a small norm's kernel call. Shared with rms_norm."""
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _native_forward(x, weight, bias, eps, residual):
    """(y, residual_out, mean (M, 1), rstd (M, 1)) as native_layer_norm gives them."""
    h, residual_out, (w, b) = normalized_input(x, residual, weight, bias)
    y, mean, rstd = torch.native_layer_norm(h, (h.shape[-1],), w, b, eps)
    return cast(y, x.dtype), residual_out, mean, rstd


def layer_norm_forward(x, weight, bias, eps, residual=None):
    y, residual_out, mean, rstd = _native_forward(x, weight, bias, eps, residual)
    cd = compute_dtype(x)
    return y, residual_out, cast(mean.view(-1), cd), cast(rstd.view(-1), cd)


def layer_norm_inference(x, weight, bias, eps, residual=None):
    """Without the statistics' reshapes and casts (~20k instructions per call); torch.layer_norm
    itself when nothing needs casting (~10k less than the general path, a third of a small call)."""
    dtype = x.dtype
    if residual is None and (weight is None or weight.dtype is dtype) and (bias is None or bias.dtype is dtype):
        return torch.layer_norm(x, (x.shape[-1],), weight, bias, eps), None
    return _native_forward(x, weight, bias, eps, residual)[:2]


def layer_norm_lean(x, normalized_shape, weight, bias, eps):
    """F.layer_norm itself: torch refuses what ff.layer_norm refuses (a non-float x, weights of
    another shape, device or a dtype it cannot mix, a normalized_shape not a sequence of ints),
    and computes the rest as the full path does (low-precision x with float32 weights too)."""
    return torch.layer_norm(x, normalized_shape, weight, bias, eps)


def layer_norm_backward(grad_y, x, weight, bias, mean, rstd, grad_residual_out=None):
    dtype = backward_dtype(x, grad_y, weight, bias)
    mask = [True, weight is not None, bias is not None]
    dx, dw, db = torch.ops.aten.native_layer_norm_backward(
        cast(grad_y, dtype), cast(x, dtype), (x.shape[-1],), cast(mean, dtype), cast(rstd, dtype),
        cast(weight, dtype), cast(bias, dtype), mask)
    if grad_residual_out is not None:
        dx = dx + cast(grad_residual_out, dtype)
    dw = cast(dw, weight.dtype) if weight is not None else None
    db = cast(db, bias.dtype) if bias is not None else None
    return cast(dx, x.dtype), dw, db

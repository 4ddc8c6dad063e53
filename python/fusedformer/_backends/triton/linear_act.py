"""Triton linear_act: the op table of backends.py on kernels/matmul_act.py and kernels/bias_act.py.

Two paths, same semantics as reference.linear_act_forward / _backward:
  gemm      one Triton GEMM whose epilogue adds the bias and applies the activation (gated:
            act(gate) * up from one pass over the stacked weight), storing the preact only when
            the backward needs it; the recompute backward rebuilds h in the same GEMM and emits dh
            from its epilogue. Decode-size M (fewer output tiles than SMs) splits K instead: fp32
            partial sums per slice, added in order by the epilogue kernel (deterministic).
  epilogue  torch's GEMM (cuBLAS) for x @ W^T, then one elementwise bias + activation kernel
            (the general path: any dtype the backend takes, float64 included).
``auto`` takes gemm for float16 / bfloat16 and epilogue for float32 / float64 (cuBLAS's fp32
GEMM honours torch.backends.cuda.matmul.allow_tf32; the Triton GEMM's fp32 mode is set by
fusedformer.kernels.matmul_act.ALLOW_TF32). FUSEDFORMER_LINEAR_ACT_PATH=gemm|epilogue|auto forces one.

Backward: dh = act'(preact) * dy in one elementwise pass (bias partial sums in the same pass,
no atomics), then dX = dh @ W and dW = dh^T @ x on cuBLAS: they are plain GEMMs with nothing
left to fuse. Beyond the table, ``linear_act_inference`` (no preact stored) and
``linear_act_recompute`` (backward that also returns act(h)) serve ff.feed_forward(recompute=True).
"""

import os

import torch

from fusedformer._backends.triton._guards import Refused, before_sm80
from fusedformer.backends import environment_value
from fusedformer.kernels import bias_act as bias_act_kernels
from fusedformer.kernels import matmul_act as matmul_act_kernels
from fusedformer.vocabulary import EAGER_TENSOR_TYPES

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
PATHS = ("auto", "gemm", "epilogue")
# read per call through backends.environment_value (os.environ.get costs ~8k instructions a call)
_PATH_VARIABLE = os.environ.encodekey("FUSEDFORMER_LINEAR_ACT_PATH")


def unsupported(x, weight, bias, activation):
    """Why the triton kernels cannot run these forward arguments, or None."""
    dtype = x.dtype
    if dtype not in DTYPES:
        return f"triton linear_act supports float16, bfloat16, float32 and float64, not {dtype}"
    if dtype is torch.bfloat16 and before_sm80(x):
        return "bfloat16 linear_act needs an sm_80 or newer GPU"
    return None


def choose_path(x, path=None):
    """'gemm' or 'epilogue' for input x (see the module docstring)."""
    path = path or environment_value(_PATH_VARIABLE) or "auto"
    if path not in PATHS:
        raise ValueError(f"linear_act (triton): path must be one of {PATHS}, got {path!r}")
    if x.dtype == torch.float64:
        return "epilogue"  # no float64 tensor-core GEMM in Triton worth having
    if path == "auto":
        return "gemm" if x.dtype in (torch.float16, torch.bfloat16) else "epilogue"
    return path


def forward(x, weight, bias, activation, *, store_preact=True, path=None):
    """(y, preact or None): y = act(x @ weight^T + bias); preact only when ``store_preact``."""
    reason = unsupported(x, weight, bias, activation)
    if reason:
        raise ValueError(f"linear_act (triton): {reason}")
    if choose_path(x, path) == "gemm":
        return matmul_act_kernels.matmul_act_forward(x, weight, bias, activation, store_preact=store_preact)
    h = torch.mm(x, weight.t())
    return bias_act_kernels.bias_act_forward(h, bias, activation, store_preact=store_preact)


def backward(grad_y, x, weight, bias, preact, activation, *, store_y=False, path=None):
    """(dx, dweight, dbias or None, y or None). ``preact`` None recomputes it; ``store_y`` then
    also returns act(preact) from the same pass (ignored when preact is given)."""
    reason = unsupported(x, weight, bias, activation)
    if reason:
        raise ValueError(f"linear_act (triton): {reason}")
    bias_grad = bias is not None
    y = None
    if preact is not None:
        dh, db, _ = bias_act_kernels.bias_act_backward(grad_y, preact, None, activation, bias_grad=bias_grad,
                                                       out_dtype=x.dtype)
    elif choose_path(x, path) == "gemm":
        dh, db, y = matmul_act_kernels.matmul_act_dh(grad_y, x, weight, bias, activation, store_y=store_y)
    else:
        h = torch.mm(x, weight.t())
        dh, db, y = bias_act_kernels.bias_act_backward(grad_y, h, bias, activation, add_bias=True,
                                                       bias_grad=bias_grad, store_y=store_y)
    dx = torch.mm(dh, weight)
    dweight = torch.mm(dh.t(), x)
    return dx, dweight, db.to(bias.dtype) if bias_grad else None, y


# --------------------------------------------------------------------------------------------
# the op table
# --------------------------------------------------------------------------------------------


def linear_act_forward(x, weight, bias, activation):
    return forward(x, weight, bias, activation)


def linear_act_backward(grad_y, x, weight, bias, preact, activation):
    return backward(grad_y, x, weight, bias, preact, activation)[:3]


def linear_act_inference(x, weight, bias, activation):
    """y alone: the preact is never written."""
    return forward(x, weight, bias, activation, store_preact=False)[0]


def linear_act_lean(x, weight, bias, activation):
    """linear_act_inference for ff.linear_act's lean call, x (..., K) of any rank. The op's
    plain_call told the call valid (float tensors of one dtype on x's device, shapes matching, a
    fused activation, an even weight height for a gated one) and non-empty (the full path sends
    empty ones to the reference). Left to refuse: what ``forward`` refuses by ``unsupported``
    (float64 runs here, as on the full path; bfloat16 before sm_80 does not, and ``auto`` then
    runs it on torch), and a weight or bias of a tensor subclass (plain_call takes any
    isinstance; the full path sends a subclass through the custom op). What passes is the full
    path's call: rows x.reshape(-1, K), the same ``forward`` without the preact, y viewed back."""
    if type(weight) not in EAGER_TENSOR_TYPES or bias is not None and type(bias) not in EAGER_TENSOR_TYPES:
        raise Refused
    shape = x.shape
    if len(shape) == 2:
        return forward(x, weight, bias, activation, store_preact=False)[0]
    y = forward(x.reshape(-1, shape[-1]), weight, bias, activation, store_preact=False)[0]
    return y.view(*shape[:-1], y.shape[-1])


def linear_act_recompute(grad_y, x, weight, bias, activation):
    """(dx, dweight, dbias, y): the backward without a saved preact, also returning y = act(h)."""
    return backward(grad_y, x, weight, bias, None, activation, store_y=True)

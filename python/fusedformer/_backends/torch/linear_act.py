"""torch linear_act: F.linear (addmm) and torch's activation kernels with their aten backward
(what autograd runs for F.linear followed by the activation); same contract as reference.py.

Gated activations split the preact into [gate; up] and return act(gate) * up, as reference.py;
their backward writes both halves of dL/dpreact into one tensor (a cat of the two would copy them).
"""

import functools

import torch
import torch.nn.functional as F

from fusedformer.vocabulary import GATED_ACTIVATIONS

aten = torch.ops.aten

# name -> (act(h), dL/dh given dL/dy and h); gated names give the gate's activation
_ACTIVATIONS = {
    "relu": (F.relu, lambda dy, h: aten.threshold_backward(dy, h, 0)),
    "gelu": (F.gelu, aten.gelu_backward),
    "gelu_tanh": (functools.partial(F.gelu, approximate="tanh"),
                  functools.partial(aten.gelu_backward, approximate="tanh")),
    "silu": (F.silu, aten.silu_backward),
    "identity": (lambda h: h, lambda dy, h: dy),
    "swiglu": (F.silu, aten.silu_backward),
    "geglu": (F.gelu, aten.gelu_backward),
}
# gated names: the gate's backward writing into a given tensor (``grad_input=``)
_GATE_BACKWARD_INTO = {"swiglu": aten.silu_backward.grad_input, "geglu": aten.gelu_backward.grad_input}


def _activate(h, activation):
    act, _ = _ACTIVATIONS[activation]
    if activation in GATED_ACTIVATIONS:
        gate, up = h.chunk(2, dim=-1)
        return act(gate).mul_(up)  # act(gate) is a fresh tensor: no second allocation
    return act(h)


def _activation_grad(grad_y, h, activation):
    act, act_grad = _ACTIVATIONS[activation]
    if activation in GATED_ACTIVATIONS:
        gate, up = h.chunk(2, dim=-1)
        dh = torch.empty_like(h)
        dgate, dup = dh.chunk(2, dim=-1)
        _GATE_BACKWARD_INTO[activation](grad_y * up, gate, grad_input=dgate)
        torch.mul(grad_y, act(gate), out=dup)
        return dh
    return act_grad(grad_y, h)


def linear_act_forward(x, weight, bias, activation):
    preact = F.linear(x, weight, bias)
    y = _activate(preact, activation)
    # the contract's y and preact never alias: only identity would return preact itself
    return (y.clone() if y is preact else y), preact


def linear_act_inference(x, weight, bias, activation):
    """y alone, no preact kept (the optional entry ops/ uses when no gradient is needed)."""
    return _activate(F.linear(x, weight, bias), activation)


# the lean entry: F.linear and the activations take x (..., K) of any rank, no rows needed
linear_act_lean = linear_act_inference


def linear_act_backward(grad_y, x, weight, bias, preact, activation):
    if preact is None:
        preact = F.linear(x, weight, bias)
    dh = _activation_grad(grad_y, preact, activation)
    dx = dh.mm(weight)
    dweight = dh.t().mm(x)
    dbias = dh.sum(0) if bias is not None else None
    return dx, dweight, dbias

"""Probing and verification: running a module or model without touching its state, and the
tolerances by which a fused replacement counts as computing what the original computed."""

import contextlib
import math

import torch


def float_param(module):
    return next((p for p in module.parameters() if p.is_floating_point()), None)


def dtype_device(module):
    p = float_param(module)
    return (p.dtype, p.device) if p is not None else (torch.get_default_dtype(), torch.device("cpu"))


def tolerance(dtype):
    """(atol, rtol) between a module's own output and its fused replacement's in ``dtype``."""
    return (1e-4, 1e-3) if dtype in (torch.float32, torch.float64) else (3e-2, 3e-2)


def close(a, b, dtype):
    atol, rtol = tolerance(dtype)
    return a.shape == b.shape and bool(torch.allclose(a.float(), b.float(), atol=atol, rtol=rtol, equal_nan=True))


def has_hooks(module):
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or getattr(module, "_backward_pre_hooks", None))


def wrapped_forward(module):
    """A module whose ``forward`` is an instance attribute (accelerate's hooks, a user's wrapper):
    replacing it would drop the wrapper, and a class swap would never run."""
    return "forward" in module.__dict__


@contextlib.contextmanager
def eval_no_grad(module):
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, mode in modes:
            m.training = mode


def output_tensors(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in output_tensors(o)]
    return []


def run(model, inputs):
    """The model's detached output tensors on ``inputs`` (a tuple of args or a dict of kwargs), in
    eval mode without grad; the model's training flags are restored."""
    with eval_no_grad(model):
        out = model(**inputs) if isinstance(inputs, dict) else model(*inputs)
    return [t.detach().clone() for t in output_tensors(out)]


def run_module(module, probe):
    args, kwargs = probe
    with eval_no_grad(module):
        # forward, not __call__: the user's hooks do not fire for the probes
        return [t.detach().clone() for t in output_tensors(module.forward(*args, **kwargs))]


def compare(before, after, dtype):
    """(max abs difference, tolerance, ok) of the floating output closest to failing: ok when
    non-finite values sit in the same places and every tensor's finite values are within
    atol + rtol * its largest reference magnitude (rounding errors grow with the magnitudes a
    value was computed from, not with the value: a small logit of a deep bfloat16 model carries
    the error of the large ones)."""
    a = [t for t in output_tensors(before) if t.is_floating_point()]
    b = [t for t in output_tensors(after) if t.is_floating_point()]
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return math.inf, 0.0, False
    atol, rtol = tolerance(dtype)
    worst = (0.0, 0.0, atol)  # (diff / tolerance, diff, tolerance)
    for x, y in zip(a, b):
        x, y = x.detach().double(), y.detach().double()
        finite = torch.isfinite(x)
        if not torch.equal(finite, torch.isfinite(y)):
            return math.inf, 0.0, False
        if finite.any():
            d = (x - y).abs()[finite].max().item()
            t = atol + rtol * x.abs()[finite].max().item()
            worst = max(worst, (d / t, d, t))
    return worst[1], worst[2], worst[0] <= 1.0

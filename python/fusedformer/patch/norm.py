"""The norm rule: a leaf module with a 1-D ``weight`` (and optional ``bias``) and an epsilon
attribute whose forward computes an RMS norm or a layer norm on a probe input gets an instance
forward on ff.rms_norm / ff.layer_norm. T5LayerNorm, LlamaRMSNorm and their kin match this way."""

import types

import torch
import torch.nn.functional as F

from fusedformer.ops import layer_norm, rms_norm
from fusedformer.patch.verify import close, eval_no_grad, wrapped_forward

EPS_NAMES = ("eps", "variance_epsilon", "epsilon", "layer_norm_eps")


def norm_forward(kind, eps_name, backend):
    """Instance forward computing the norm ``kind`` ('rms' or 'layer'); closures never capture the
    module itself, so a deepcopy of a patched model is patched independently."""

    def forward(self, hidden_states, *args, **kwargs):
        w = self.weight
        if args or kwargs or (w is not None and w.dtype != hidden_states.dtype):
            # mixed precision (e.g. fp32 weight on bf16 activations) keeps the module's own casting
            return type(self).forward(self, hidden_states, *args, **kwargs)
        shape = tuple(w.shape) if w is not None else tuple(self.normalized_shape)
        eps = getattr(self, eps_name)
        if kind == "rms":
            return rms_norm(hidden_states, shape, w, eps, backend=backend)
        return layer_norm(hidden_states, shape, w, getattr(self, "bias", None), eps, backend=backend)

    return forward


def _eps_name(module):
    if isinstance(module, (torch.nn.LayerNorm, torch.nn.RMSNorm)):
        return "eps"
    return next((e for e in EPS_NAMES if isinstance(getattr(module, e, None), (float, int))
                 and not isinstance(getattr(module, e), bool)), None)


def _looks_like_norm(module, eps_name):
    if eps_name is None or any(True for _ in module.children()):
        return False
    w, b = getattr(module, "weight", None), getattr(module, "bias", None)
    if not (isinstance(w, torch.nn.Parameter) and w.dim() == 1
            or w is None and isinstance(module, (torch.nn.LayerNorm, torch.nn.RMSNorm))):
        return False
    return b is None or isinstance(b, torch.nn.Parameter) and w is not None and b.shape == w.shape


def probe_norm(module, eps_name, backend):
    """Which norm the module's forward computes on a random input with random affine
    parameters: 'rms', 'layer' or None (also None when the fused replacement disagrees with the
    module). The parameters are restored bit for bit."""
    w, b = module.weight, getattr(module, "bias", None)
    shape = tuple(w.shape) if w is not None else tuple(module.normalized_shape)
    eps = getattr(module, eps_name)
    eps = torch.finfo(torch.float32).eps if eps is None else float(eps)
    params = [p for p in (w, b) if isinstance(p, torch.Tensor)]
    dtype = params[0].dtype if params else torch.float32
    device = params[0].device if params else torch.device("cpu")
    gen = torch.Generator().manual_seed(1234)
    x = (torch.randn(3, 5, *shape, generator=gen) * 2 + 0.5).to(device, dtype)
    saved = [p.detach().clone() for p in params]
    with eval_no_grad(module):
        try:
            for p in params:
                p.copy_(torch.rand(p.shape, generator=gen).to(device, p.dtype) + 0.5)
            try:
                y = type(module).forward(module, x)
            except Exception:
                return None
            if not isinstance(y, torch.Tensor):
                return None
            dims = tuple(range(-len(shape), 0))
            x64 = x.double()
            rms = x64 * torch.rsqrt(x64.pow(2).mean(dims, keepdim=True) + eps)
            rms = rms * w.double() if w is not None else rms
            lay = F.layer_norm(x64, shape, w.double() if w is not None else None,
                               b.double() if b is not None else None, eps)
            kind = "rms" if b is None and close(y, rms, dtype) else "layer" if close(y, lay, dtype) else None
            if kind is not None and not close(y, norm_forward(kind, eps_name, backend)(module, x), dtype):
                return None
            return kind
        finally:
            for p, s in zip(params, saved):
                p.copy_(s)


def try_norm(module, label, backend, report, log):
    """Apply the norm rule to ``module``; True when it matched (replaced, or left with a reason
    in the report), False when the module is no norm by its attributes."""
    eps_name = _eps_name(module)
    if not _looks_like_norm(module, eps_name):
        return False
    typ = type(module).__name__
    if wrapped_forward(module):
        report.left.append((label, typ, "a norm whose forward is an instance attribute (a wrapper), which "
                            "patching would replace"))
        return True
    kind = probe_norm(module, eps_name, backend)
    if kind is None:
        report.left.append((label, typ, "has a weight and an epsilon but computes neither an RMS norm nor a "
                            "layer norm on a probe input"))
        return True
    log.set(module, forward=types.MethodType(norm_forward(kind, eps_name, backend), module))
    report.replaced.append((label, typ, "ff.rms_norm" if kind == "rms" else "ff.layer_norm"))
    return True

"""ff.patch / ff.unpatch / ff.patched: route an existing torch.nn or Hugging Face model through
fusedformer in place, and undo it exactly.

Nothing is rebuilt: every parameter stays the same tensor (optimizers, tied weights and
state_dict keys stay valid) and hooks on the patched modules keep firing. Two mechanisms:
- exact torch.nn types (LayerNorm, RMSNorm, MultiheadAttention, TransformerEncoder/DecoderLayer,
  TransformerEncoder/Decoder) get their ``__class__`` swapped to the fusedformer drop-in subclass
  from ``fusedformer.nn`` (which adds only a ``backend`` attribute and overrides ``forward``);
- any other module matched by rule (norms with ``weight`` + an epsilon, MLPs with
  gate/up/down or fc1/fc2-style projections and an activation, Linear + activation) gets an
  instance ``forward`` on fusedformer ops, kept only if a probe input gives the same output as the
  module's own forward. Hugging Face attention goes through the ``fusedformer`` attention function.
Every change is logged (class, attributes added) so ``unpatch`` restores the model exactly.
"""

import contextlib
import dataclasses
import math
import types

import torch
import torch.nn.functional as F

from fusedformer import _hf
from fusedformer import nn as ffnn
from fusedformer.ops import feed_forward, layer_norm, linear_act, rms_norm

OPS = ("attention", "norm", "mlp")
_STATE = "_fusedformer_patch"
_REPORT = "_fusedformer_report"

# exact torch.nn type -> (fusedformer drop-in subclass, op group it belongs to)
_CLASS_SWAPS = {
    torch.nn.LayerNorm: (ffnn.LayerNorm, "norm"),
    torch.nn.RMSNorm: (ffnn.RMSNorm, "norm"),
    torch.nn.MultiheadAttention: (ffnn.MultiheadAttention, "attention"),
    torch.nn.TransformerEncoderLayer: (ffnn.TransformerEncoderLayer, "layer"),
    torch.nn.TransformerDecoderLayer: (ffnn.TransformerDecoderLayer, "layer"),
    torch.nn.TransformerEncoder: (ffnn.TransformerEncoder, "layer"),
    torch.nn.TransformerDecoder: (ffnn.TransformerDecoder, "layer"),
}
_EPS_NAMES = ("eps", "variance_epsilon", "epsilon", "layer_norm_eps")
_ACT_NAMES = ("act_fn", "act", "activation_fn", "activation", "act_func", "intermediate_act_fn")
_GATED = (("gate_proj", "up_proj", "down_proj"), ("wi_0", "wi_1", "wo"), ("w1", "w3", "w2"))
_PLAIN = (("fc1", "fc2"), ("c_fc", "c_proj"), ("wi", "wo"), ("dense_h_to_4h", "dense_4h_to_h"), ("lin1", "lin2"),
          ("w_1", "w_2"), ("linear1", "linear2"))
_SINGLE = ("dense",)
_GATED_ACT = {"silu": "swiglu", "gelu": "geglu", "gelu_tanh": "geglu_tanh", "relu": "reglu"}


class PatchVerificationError(RuntimeError):
    """The patched model's outputs differ from the original's; the model was left unpatched."""

    def __init__(self, message, report):
        super().__init__(message)
        self.report = report


@dataclasses.dataclass
class PatchReport:
    """What ff.patch did. ``replaced``: (module name, original type, replacement); ``left``:
    (module name, type, reason); ``attention``: how attention is routed; ``verified``: max abs
    difference and tolerance of the verification forward, or None when not run."""

    replaced: list = dataclasses.field(default_factory=list)
    left: list = dataclasses.field(default_factory=list)
    attention: str | None = None
    verified: dict | None = None
    backend: str | None = None

    def __str__(self):
        lines = [f"fusedformer patch (backend={self.backend or 'auto'}): {len(self.replaced)} replaced, "
                 f"{len(self.left)} left"]
        if self.attention:
            lines.append(f"  attention: {self.attention}")
        lines += [f"  replaced {name or '<root>'}: {orig} -> {new}" for name, orig, new in self.replaced]
        lines += [f"  left     {name or '<root>'}: {typ} ({why})" for name, typ, why in self.left]
        if self.verified is not None:
            lines.append(f"  verified: max abs diff {self.verified['max_abs_diff']:.3g} "
                         f"(tolerance {self.verified['tolerance']:.3g})")
        return "\n".join(lines)


class _Log:
    """Undo log: per touched module its original class and the __dict__ keys it had."""

    def __init__(self):
        self.entries, self.extra = [], []

    def touch(self, module):
        if not any(m is module for m, _, _ in self.entries):
            self.entries.append((module, module.__class__, set(module.__dict__)))

    def undo(self):
        for fn in reversed(self.extra):
            fn()
        for module, cls, keys in reversed(self.entries):
            for key in [k for k in module.__dict__ if k not in keys]:
                del module.__dict__[key]
            module.__class__ = cls
        self.entries, self.extra = [], []


# --------------------------------------------------------------------------------------------
# probes: a module's own forward against the fusedformer replacement on a random input
# --------------------------------------------------------------------------------------------


def _float_param(module):
    return next((p for p in module.parameters() if p.is_floating_point()), None)


def _tolerance(dtype):
    return (1e-4, 1e-3) if dtype in (torch.float32, torch.float64) else (3e-2, 3e-2)


def _close(a, b, dtype):
    atol, rtol = _tolerance(dtype)
    return a.shape == b.shape and bool(torch.allclose(a.float(), b.float(), atol=atol, rtol=rtol, equal_nan=True))


@contextlib.contextmanager
def _eval_no_grad(module):
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, mode in modes:
            m.training = mode


def activation_name(act):
    """Identify an activation callable numerically: 'relu', 'gelu', 'gelu_tanh', 'silu' or None."""
    if not callable(act) or (isinstance(act, torch.nn.Module) and any(True for _ in act.parameters())):
        return None
    z = torch.linspace(-6.0, 6.0, 97)
    try:
        y = act(z)
    except Exception:  # an activation needing other inputs: not one of ours
        return None
    refs = {"relu": F.relu(z), "gelu": F.gelu(z), "gelu_tanh": F.gelu(z, approximate="tanh"), "silu": F.silu(z)}
    for name, ref in refs.items():
        if isinstance(y, torch.Tensor) and y.shape == ref.shape and torch.allclose(y, ref, atol=1e-6, rtol=1e-5):
            return name
    return None


def _linear_weight(layer):
    """(weight as (out, in), bias) of a plain nn.Linear or a GPT-2-style Conv1D (weight (in, out),
    ``nf`` outputs); None for anything else (quantized, LoRA-wrapped, custom forward)."""
    if type(layer).forward is torch.nn.Linear.forward and isinstance(layer, torch.nn.Linear):
        return layer.weight, layer.bias
    w = getattr(layer, "weight", None)
    if (type(layer).__name__ == "Conv1D" and isinstance(w, torch.nn.Parameter) and w.dim() == 2
            and getattr(layer, "nf", None) == w.shape[1] and not any(True for _ in layer.children())):
        return w.t(), getattr(layer, "bias", None)
    return None


def _has_hooks(module):
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or getattr(module, "_backward_pre_hooks", None))


# --------------------------------------------------------------------------------------------
# rule-based replacements (instance forwards; closures never capture the module itself)
# --------------------------------------------------------------------------------------------


def _norm_forward(kind, eps_name, backend):
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


def _probe_norm(module, eps_name, backend):
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
    with _eval_no_grad(module):
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
            kind = "rms" if b is None and _close(y, rms, dtype) else "layer" if _close(y, lay, dtype) else None
            if kind is not None and not _close(y, _norm_forward(kind, eps_name, backend)(module, x), dtype):
                return None
            return kind
        finally:
            for p, s in zip(params, saved):
                p.copy_(s)


def _mlp_forward(names, activation, gated, drop_name, drop_at, backend):
    """Instance forward of an MLP: ``names`` are its projection children (gate, up, down) /
    (in, out) / (in,); ``drop_at`` is where its dropout child sits ('hidden' or 'output')."""

    def forward(self, hidden_states, *args, **kwargs):
        layers = [_linear_weight(getattr(self, n)) for n in names]
        if args or kwargs or any(p is None for p in layers) or (
                drop_name is not None and self.training and getattr(self, drop_name).p > 0 and drop_at is None):
            return type(self).forward(self, hidden_states, *args, **kwargs)
        if gated:
            (wg, bg), (wu, bu), (w2, b2) = layers
            w1 = torch.cat([wg, wu])  # [gate; up]: one GEMM for both, the op's gated layout
            b1 = torch.cat([bg, bu]) if bg is not None and bu is not None else None
            if (bg is None) != (bu is None):
                return type(self).forward(self, hidden_states)
        elif len(layers) == 2:
            (w1, b1), (w2, b2) = layers
        else:
            (w1, b1), = layers
            return linear_act(hidden_states, w1, b1, activation, backend=backend)
        drop = getattr(self, drop_name) if drop_name is not None else None
        if drop is None or not self.training or drop.p == 0:
            y = _ffn(hidden_states, w1, b1, w2, b2, activation, backend)
            return drop(y) if drop is not None and drop_at == "output" else y
        if drop_at == "output":
            return drop(_ffn(hidden_states, w1, b1, w2, b2, activation, backend))
        h = _hidden(hidden_states, w1, b1, activation, backend)
        return linear_act(drop(h), w2, b2, "identity", backend=backend)

    return forward


def _hidden(x, w1, b1, activation, backend):
    if activation in ("geglu_tanh", "reglu"):  # gated forms the fused op lacks: two GEMMs
        (wg, wu), (bg, bu) = w1.chunk(2), (b1.chunk(2) if b1 is not None else (None, None))
        return linear_act(x, wg, bg, _GATED_ACT_INV[activation], backend=backend) * linear_act(
            x, wu, bu, "identity", backend=backend)
    return linear_act(x, w1, b1, activation, backend=backend)


def _ffn(x, w1, b1, w2, b2, activation, backend):
    if activation in ("geglu_tanh", "reglu"):
        return linear_act(_hidden(x, w1, b1, activation, backend), w2, b2, "identity", backend=backend)
    return feed_forward(x, w1, b1, w2, b2, activation, backend=backend)


_GATED_ACT_INV = {v: k for k, v in _GATED_ACT.items()}


def _mlp_match(module):
    """(names, activation, gated, act_attr) when the module looks like an MLP by its children and
    attributes, else None. Other children may only be dropouts and the activation."""
    children = dict(module.named_children())
    act_attr = next((a for a in _ACT_NAMES if callable(getattr(module, a, None))), None)
    if act_attr is None:
        return None
    act = activation_name(getattr(module, act_attr))
    if act is None:
        return "unrecognised activation " + type(getattr(module, act_attr)).__name__
    for names, gated in [(n, True) for n in _GATED] + [(n, False) for n in _PLAIN] + [((s,), False) for s in _SINGLE]:
        if not all(n in children for n in names):
            continue
        others = [c for k, c in children.items() if k not in names and k != act_attr]
        if any(not isinstance(c, torch.nn.Dropout) for c in others):
            return "has children besides its projections, activation and dropout"
        if any(_linear_weight(children[n]) is None for n in names):
            return "projections are not plain Linear / Conv1D"
        if any(_has_hooks(children[n]) for n in names):
            return "a projection has hooks (fusing would skip them)"
        activation = _GATED_ACT[act] if gated else act
        return names, activation, gated, act_attr
    return None


def _probe_mlp(module, names, activation, gated, backend):
    """Compare the module's forward with the fused one (eval, random input); also locate its
    dropout: returns (ok, drop_name, drop_at)."""
    drops = [(k, c) for k, c in module.named_children() if isinstance(c, torch.nn.Dropout)]
    if len(drops) > 1:
        return False, None, None
    p = _float_param(module)
    first = getattr(module, names[0])
    w_in = _linear_weight(first)[0]
    gen = torch.Generator().manual_seed(4321)
    x = torch.randn(2, 3, w_in.shape[1], generator=gen).to(p.device, p.dtype)
    seen = {}
    handle = drops[0][1].register_forward_pre_hook(lambda m, a: seen.setdefault("in", a[0])) if drops else None
    try:
        with _eval_no_grad(module):
            try:
                y = type(module).forward(module, x)
            except Exception:
                return False, None, None
            new = _mlp_forward(names, activation, gated, None, None, backend)
            y_new = new(module, x)
    finally:
        if handle is not None:
            handle.remove()
    if not isinstance(y, torch.Tensor) or not _close(y, y_new, p.dtype):
        return False, None, None
    if not drops:
        return True, None, None
    drop_name, t = drops[0][0], seen.get("in")
    drop_at = None
    if t is not None and t.shape == y.shape and torch.equal(t, y) and len(names) > 1:
        drop_at = "output"
    elif t is not None and len(names) > 1:
        w1, b1 = (_linear_weight(getattr(module, names[0])))
        if gated:
            (wg, bg), (wu, bu) = _linear_weight(getattr(module, names[0])), _linear_weight(getattr(module, names[1]))
            w1, b1 = torch.cat([wg, wu]), (torch.cat([bg, bu]) if bg is not None else None)
        with torch.no_grad():
            h = _hidden(x, w1, b1, activation, backend)
        if t.shape == h.shape and t.shape != y.shape and _close(t, h, p.dtype):
            drop_at = "hidden"
    return True, drop_name, drop_at


# --------------------------------------------------------------------------------------------
# torch.nn drop-ins by class swap
# --------------------------------------------------------------------------------------------


def _swap(module, log, backend):
    cls, _ = _CLASS_SWAPS[type(module)]
    if cls in (ffnn.TransformerEncoderLayer, ffnn.TransformerDecoderLayer):
        for child in module.children():
            log.touch(child)
        log.touch(module)
        module.__class__ = cls
        module._fuse(backend)
    else:
        log.touch(module)
        module.__class__ = cls
        module.backend = backend
    return cls


def _dtype_device(module):
    p = _float_param(module)
    return (p.dtype, p.device) if p is not None else (torch.get_default_dtype(), torch.device("cpu"))


def _probe_inputs(module, gen):
    """Random inputs for one torch.nn module of the swap table (shapes from its attributes)."""
    dtype, device = _dtype_device(module)
    p = types.SimpleNamespace(dtype=dtype, device=device)
    if isinstance(module, (torch.nn.LayerNorm, torch.nn.RMSNorm)):
        return (torch.randn(2, 3, *module.normalized_shape, generator=gen).to(p.device, p.dtype),), {}
    if isinstance(module, (torch.nn.TransformerEncoder, torch.nn.TransformerDecoder)):
        layer = module.layers[0]
    else:
        layer = module
    if isinstance(layer, torch.nn.MultiheadAttention):
        E, bf = layer.embed_dim, layer.batch_first
        shape = (lambda n: (2, n, E)) if bf else (lambda n: (n, 2, E))
        q = torch.randn(*shape(3), generator=gen).to(p.device, p.dtype)
        k = torch.randn(*shape(4)[:-1], layer.kdim, generator=gen).to(p.device, p.dtype)
        v = torch.randn(*shape(4)[:-1], layer.vdim, generator=gen).to(p.device, p.dtype)
        return (q, k, v), {"need_weights": False}
    E = layer.linear1.in_features
    bf = layer.self_attn.batch_first
    x = torch.randn(*((2, 5, E) if bf else (5, 2, E)), generator=gen).to(p.device, p.dtype)
    if isinstance(layer, torch.nn.TransformerDecoderLayer):
        mem = torch.randn(*((2, 4, E) if bf else (4, 2, E)), generator=gen).to(p.device, p.dtype)
        return (x, mem), {}
    return (x,), {}


def _output_tensors(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _output_tensors(o)]
    return []


def _compare(before, after, dtype):
    """(max abs difference, tolerance, ok) over the floating outputs: ok when every element is
    within atol + rtol * |reference| and non-finite values sit in the same places."""
    a = [t for t in _output_tensors(before) if t.is_floating_point()]
    b = [t for t in _output_tensors(after) if t.is_floating_point()]
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return math.inf, 0.0, False
    atol, rtol = _tolerance(dtype)
    diff, scale, ok = 0.0, 0.0, True
    for x, y in zip(a, b):
        x, y = x.detach().double(), y.detach().double()
        finite = torch.isfinite(x)
        if not torch.equal(finite, torch.isfinite(y)):
            return math.inf, 0.0, False
        if finite.any():
            d, ref = (x - y).abs()[finite], x.abs()[finite]
            diff, scale = max(diff, d.max().item()), max(scale, ref.max().item())
            ok = ok and bool((d <= atol + rtol * ref).all())
    return diff, atol + rtol * scale, ok


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------


def patch(model, ops=OPS, backend=None, verify=True, *, example_inputs=None, return_report=False):
    """Route ``model`` through fusedformer in place and return it (``(model, report)`` with
    ``return_report=True``). ``ops``: any of 'attention', 'norm', 'mlp' (torch.nn encoder/decoder
    layers are swapped whole when all three are asked for). ``backend``: 'reference', 'triton',
    'cuda' or None (the usual selection). ``verify``: run a forward on a small synthetic batch
    before and after (Hugging Face models: inputs from the config; else ``example_inputs``, a
    tuple of args or a dict of kwargs) and probe every swapped torch.nn module on random inputs;
    on a mismatch raise PatchVerificationError and leave the model unpatched. Patching a model
    that is already patched re-patches it with the new arguments."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"patch: model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(ops, str):
        ops = (ops,)
    ops = tuple(ops)
    bad = [o for o in ops if o not in OPS]
    if bad or not ops:
        raise ValueError(f"patch: ops must be a non-empty subset of {OPS}, got {ops!r}")
    if backend is not None and backend not in ("reference", "triton", "cuda", "auto"):
        raise ValueError(f"patch: backend must be 'reference', 'triton', 'cuda', 'auto' or None, got {backend!r}")
    if example_inputs is not None and not isinstance(example_inputs, (tuple, dict, torch.Tensor)):
        raise TypeError("patch: example_inputs must be a tensor, a tuple of args or a dict of kwargs")
    if _STATE in model.__dict__:
        unpatch(model)
    hf = _hf.is_hf_model(model)
    inputs = None
    if verify:
        inputs = example_inputs if example_inputs is not None else (_hf.synthetic_inputs(model) if hf else None)
        inputs = (inputs,) if isinstance(inputs, torch.Tensor) else inputs
        before = _run(model, inputs) if inputs is not None else None

    report, log = PatchReport(backend=backend), _Log()
    try:
        _patch_modules(model, ops, backend, verify, report, log, hf)
        if hf and "attention" in ops:
            undo, reason = _hf.switch_attention(model, backend)
            if undo is None:
                report.attention = f"left as {_hf.attention_implementation(model)!r}: {reason}"
            else:
                report.attention = f"Hugging Face attention implementation -> '{_hf.NAME}'"
                log.extra.append(undo)
        if inputs is not None:
            after = _run(model, inputs)
            p = _float_param(model)
            diff, tol, ok = _compare(before, after, p.dtype if p is not None else torch.float32)
            report.verified = {"max_abs_diff": diff, "tolerance": tol}
            if not ok:
                raise PatchVerificationError(
                    f"patch: the patched model's outputs differ from the original's (max abs diff {diff:.3g} > "
                    f"tolerance {tol:.3g}); the model was left unpatched.\n{report}", report)
    except BaseException:
        log.undo()
        raise
    model.__dict__[_STATE] = log
    model.__dict__[_REPORT] = report
    return (model, report) if return_report else model


def _run(model, inputs):
    with _eval_no_grad(model):
        out = model(**inputs) if isinstance(inputs, dict) else model(*inputs)
    return [t.detach().clone() for t in _output_tensors(out)]


def _patch_modules(model, ops, backend, verify, report, log, hf):
    names = {}
    for name, m in model.named_modules(remove_duplicate=False):
        names.setdefault(id(m), []).append(name)
    done = set()
    whole_layers = all(o in ops for o in OPS)
    gen = torch.Generator().manual_seed(0)
    for _name, module in model.named_modules():
        if id(module) in done:
            continue
        label = " = ".join(names[id(module)])
        typ = type(module)
        if typ.__module__.startswith("fusedformer."):  # already fusedformer's own module
            continue
        if typ in _CLASS_SWAPS:
            group = _CLASS_SWAPS[typ][1]
            if group == "layer" and not whole_layers:
                report.left.append((label, typ.__name__, "whole-layer swap needs ops attention, norm and mlp"))
                continue
            if group != "layer" and group not in ops:
                continue
            if group == "layer" and isinstance(module, (torch.nn.TransformerEncoder, torch.nn.TransformerDecoder)) \
                    and any(type(layer) not in _CLASS_SWAPS for layer in module.layers):
                report.left.append((label, typ.__name__, "its layers are not torch.nn transformer layers"))
                continue
            if group == "layer" and typ in (torch.nn.TransformerEncoderLayer, torch.nn.TransformerDecoderLayer) \
                    and any(_has_hooks(c) for c in module.children() if type(c) is not torch.nn.Dropout):
                report.left.append((label, typ.__name__, "a submodule has hooks the fused layer would skip"))
                continue
            probe = _probe_inputs(module, gen) if verify else None
            ref = _run_module(module, probe) if verify else None
            cls = _swap(module, log, backend)
            if verify:
                diff, tol, ok = _compare(ref, _run_module(module, probe), _dtype_device(module)[0])
                if not ok:
                    raise PatchVerificationError(f"patch: {label} ({typ.__name__}) differs after the swap "
                                                 f"(max abs diff {diff:.3g} > {tol:.3g}); the model was left "
                                                 "unpatched", report)
            report.replaced.append((label, typ.__name__, f"fusedformer.nn.{cls.__name__}"))
            # a stack swaps only its own forward: its layers and final norm come next in the walk
            subs = [module] if cls in (ffnn.TransformerEncoder, ffnn.TransformerDecoder) else module.modules()
            done.update(id(sub) for sub in subs)
            continue
        if isinstance(module, (torch.nn.MultiheadAttention, torch.nn.TransformerEncoderLayer,
                               torch.nn.TransformerDecoderLayer)):
            report.left.append((label, typ.__name__, f"a subclass of torch.nn.{typ.__mro__[1].__name__}: its own "
                                "code may differ, so it is left as is"))
            continue
        if "norm" in ops and _try_norm(module, label, backend, report, log):
            done.add(id(module))
            continue
        if "mlp" in ops:
            matched = _mlp_match(module)
            if isinstance(matched, tuple):
                names_, activation, gated, _ = matched
                ok, drop_name, drop_at = _probe_mlp(module, names_, activation, gated, backend)
                if ok:
                    log.touch(module)
                    module.forward = types.MethodType(
                        _mlp_forward(names_, activation, gated, drop_name, drop_at, backend), module)
                    op = "ff.linear_act" if len(names_) == 1 else "ff.feed_forward"
                    report.replaced.append((label, typ.__name__, f"{op}({activation!r})"))
                    done.add(id(module))
                else:
                    report.left.append((label, typ.__name__, "looks like an MLP but its forward computes "
                                        "something else on a probe input"))
                continue
            if isinstance(matched, str) and any(n in dict(module.named_children()) for g in _GATED + _PLAIN for n in g):
                report.left.append((label, typ.__name__, f"MLP-like but {matched}"))
                continue
        if "attention" in ops and not hf and "attention" in typ.__name__.lower() and typ.__module__.split(".")[0] \
                not in ("torch", "fusedformer"):
            report.left.append((label, typ.__name__, "unrecognised custom attention module (left as is)"))


def _run_module(module, probe):
    args, kwargs = probe
    with _eval_no_grad(module):
        # forward, not __call__: the user's hooks do not fire for the probes
        return [t.detach().clone() for t in _output_tensors(module.forward(*args, **kwargs))]


def _try_norm(module, label, backend, report, log):
    """Rule for norms: a leaf with a 1-D ``weight`` and an epsilon attribute (or a LayerNorm /
    RMSNorm subclass) whose forward is an RMS norm or a layer norm on a probe input."""
    if any(True for _ in module.children()):
        return False
    eps_name = next((e for e in _EPS_NAMES if isinstance(getattr(module, e, None), (float, int))
                     and not isinstance(getattr(module, e), bool)), None)
    if isinstance(module, (torch.nn.LayerNorm, torch.nn.RMSNorm)):
        eps_name = "eps"
    w = getattr(module, "weight", None)
    if eps_name is None or not (isinstance(w, torch.nn.Parameter) and w.dim() == 1 or (
            w is None and isinstance(module, (torch.nn.LayerNorm, torch.nn.RMSNorm)))):
        return False
    b = getattr(module, "bias", None)
    if b is not None and not (isinstance(b, torch.nn.Parameter) and w is not None and b.shape == w.shape):
        return False
    kind = _probe_norm(module, eps_name, backend)
    if kind is None:
        report.left.append((label, type(module).__name__, "has a weight and an epsilon but computes neither an RMS "
                            "norm nor a layer norm on a probe input"))
        return True
    log.touch(module)
    module.forward = types.MethodType(_norm_forward(kind, eps_name, backend), module)
    report.replaced.append((label, type(module).__name__, "ff.rms_norm" if kind == "rms" else "ff.layer_norm"))
    return True


def unpatch(model):
    """Undo ff.patch exactly: original classes, forwards and attention implementation; no
    fusedformer attribute left behind. Returns the model; a model never patched is returned as is."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"unpatch: model must be a torch.nn.Module, got {type(model).__name__}")
    log = model.__dict__.pop(_STATE, None)
    model.__dict__.pop(_REPORT, None)
    if log is not None:
        log.undo()
    return model


def patch_report(model):
    """The PatchReport of a patched model, or None."""
    return model.__dict__.get(_REPORT)


@contextlib.contextmanager
def patched(model, ops=OPS, backend=None, verify=True, **kwargs):
    """``with ff.patched(model) as m:`` patch on entry, unpatch on exit (also on an exception)."""
    patch(model, ops, backend, verify, **kwargs)
    try:
        yield model
    finally:
        unpatch(model)

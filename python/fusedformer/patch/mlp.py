"""The MLP rule: a module whose children are projections with known names (gate/up/down,
fc1/fc2, c_fc/c_proj, ...; or one ``dense``), an activation attribute and at most one dropout,
and whose forward computes act(x W1^T + b1) W2^T + b2 (gated: act(gate) * up) on a probe input,
gets an instance forward on fusedformer.nn's ``mlp`` (ff.feed_forward) or ff.linear_act."""

import dataclasses
import types

import torch
import torch.nn.functional as F

from fusedformer.nn.feed_forward import mlp
from fusedformer.ops import linear_act
from fusedformer.patch.verify import close, eval_no_grad, float_param, has_hooks, wrapped_forward
from fusedformer.vocabulary import EAGER_TENSOR_TYPES, gated_activation

ACT_NAMES = ("act_fn", "act", "activation_fn", "activation", "act_func", "intermediate_act_fn")
GATED = (("gate_proj", "up_proj", "down_proj"), ("wi_0", "wi_1", "wo"), ("w1", "w3", "w2"))
PLAIN = (("fc1", "fc2"), ("c_fc", "c_proj"), ("wi", "wo"), ("dense_h_to_4h", "dense_4h_to_h"), ("lin1", "lin2"),
         ("w_1", "w_2"), ("linear1", "linear2"))
SINGLE = (("dense",),)


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


def linear_weight(layer):
    """(weight as (out, in), bias) of a plain nn.Linear or a GPT-2-style Conv1D (weight (in, out),
    ``nf`` outputs); None for anything else (quantized, LoRA-wrapped, custom forward)."""
    if type(layer).forward is torch.nn.Linear.forward and isinstance(layer, torch.nn.Linear):
        return layer.weight, layer.bias
    w = getattr(layer, "weight", None)
    if (type(layer).__name__ == "Conv1D" and isinstance(w, torch.nn.Parameter) and w.dim() == 2
            and getattr(layer, "nf", None) == w.shape[1] and not any(True for _ in layer.children())):
        return w.t(), getattr(layer, "bias", None)
    return None


@dataclasses.dataclass(frozen=True)
class MlpMatch:
    names: tuple  # projection children: (gate, up, down), (in, out) or (in,)
    activation: str  # the fused op's activation name (gated forms for gated MLPs)
    drop_name: str | None = None  # its dropout child
    drop_at: str | None = None  # where that dropout sits: 'hidden', 'output' or None (not found)


def _weights(module, names, stacked):
    """(w1, b1, w2, b2) for the fused op (gated: w1 stacks [gate; up]), None where the
    projections cannot be fused as they are now; single projections give (w1, b1, None, None).
    ``stacked`` is the module's StackedGate."""
    layers = [linear_weight(getattr(module, n)) for n in names]
    if any(layer is None for layer in layers):
        return None
    if len(layers) == 1:
        return (*layers[0], None, None)
    *ins, (w2, b2) = layers
    if len(ins) == 1:
        return (*ins[0], w2, b2)
    (wg, bg), (wu, bu) = ins
    if (bg is None) != (bu is None):
        return None
    return (*stacked(wg, bg, wu, bu), w2, b2)




class StackedGate:
    """A gated MLP's [gate; up] weight (and bias) for the op's one GEMM: a cat where a gradient
    flows to the parameters (it is their autograd path) or under torch.compile (the graph sees it);
    otherwise the cat of an earlier call, as long as each parameter is the same tensor with the
    same version and storage (an optimizer step, load_state_dict or .to() changes one of those).
    Rebuilding it per call copied both weights on every forward: at decode shapes more memory
    traffic than the GEMM itself. The price: one more copy of the gate and up weights while kept."""

    def __init__(self):
        self.key, self.value = None, None

    def __call__(self, wg, bg, wu, bu):
        tensors = (wg, bg, wu, bu) if bg is not None else (wg, wu)
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors) or torch.compiler.is_compiling():
            return _cat(wg, bg, wu, bu)
        if any(type(t) not in EAGER_TENSOR_TYPES for t in tensors):  # sharded or fake parameters: no storage to tell by
            return _cat(wg, bg, wu, bu)
        key = [(t._version, t.data_ptr(), t.dtype, t.device) for t in tensors]
        if self.key is None or self.key[0] != key or any(a is not b for a, b in zip(self.key[1], tensors)):
            self.key, self.value = (key, tensors), _cat(wg, bg, wu, bu)
        return self.value


def _cat(wg, bg, wu, bu):
    return torch.cat([wg, wu]), (torch.cat([bg, bu]) if bg is not None else None)


def mlp_forward(match, backend):
    """Instance forward of a matched MLP; closures never capture the module itself."""
    stacked = StackedGate()

    def forward(self, hidden_states, *args, **kwargs):
        weights = _weights(self, match.names, stacked)
        drop = getattr(self, match.drop_name) if match.drop_name is not None else None
        drawn = drop is not None and drop.training and drop.p > 0
        if (args or kwargs or weights is None or any(w is not None and w.dtype != hidden_states.dtype
                                                     for w in weights[::2]) or drawn and match.drop_at is None):
            return type(self).forward(self, hidden_states, *args, **kwargs)
        w1, b1, w2, b2 = weights
        if w2 is None:
            return linear_act(hidden_states, w1, b1, match.activation, backend=backend)
        hidden_p = drop.p if drawn and match.drop_at == "hidden" else 0.0
        y = mlp(hidden_states, w1, b1, w2, b2, match.activation, hidden_p, drawn, backend)
        return drop(y) if drawn and match.drop_at == "output" else y

    return forward


def match_mlp(module):
    """An MlpMatch (dropout not yet located) when the module looks like an MLP by its children
    and attributes; a string saying why not when it looks like one but cannot be fused; None
    when it is no MLP."""
    found = _match(module)
    return "MLP-like but " + found if isinstance(found, str) else found


def _match(module):
    children = dict(module.named_children())
    names = next((n for n in GATED + PLAIN + SINGLE if all(c in children for c in n)), None)
    act_attr = next((a for a in ACT_NAMES if callable(getattr(module, a, None))), None)
    if act_attr is None:
        return None
    act = activation_name(getattr(module, act_attr))
    if act is None:
        return "unrecognised activation " + type(getattr(module, act_attr)).__name__ if names else None
    if names is None:
        return None
    others = [c for k, c in children.items() if k not in names and k != act_attr]
    if any(not isinstance(c, torch.nn.Dropout) for c in others):
        return "has children besides its projections, activation and dropout"
    if len(others) > 1:
        return "has more than one dropout"
    if any(linear_weight(children[n]) is None for n in names):
        return "projections are not plain Linear / Conv1D"
    if any(has_hooks(children[n]) for n in names):
        return "a projection has hooks (fusing would skip them)"
    dtypes = sorted({str(children[n].weight.dtype).removeprefix("torch.") for n in names})
    if len(dtypes) > 1:
        return f"projections in different dtypes ({', '.join(dtypes)}): fusing would skip the module's casts"
    if wrapped_forward(module):
        return "its forward is an instance attribute (a wrapper), which patching would replace"
    drop_name = next((k for k, c in children.items() if isinstance(c, torch.nn.Dropout)), None)
    activation = gated_activation(act).name if names in GATED else act
    return MlpMatch(names, activation, drop_name)


def _run_training(module, forward, x, seed):
    """``forward(module, x)`` in training mode (dropout drawn with ``seed``), without grad; the
    caller's RNG state and the module's training flags are restored."""
    modes = [(m, m.training) for m in module.modules()]
    devices = [x.device] if x.device.type == "cuda" else []
    try:
        module.train()
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            return forward(module, x)
    finally:
        for m, mode in modes:
            m.training = mode


def _locate_dropout(module, match, x, backend):
    """Where the dropout sits: the placement whose fused training forward draws exactly what the
    module's own forward draws (with p raised to 0.5 for the probe, so that 'hidden' and
    'output' differ)."""
    drop = getattr(module, match.drop_name)
    p = drop.p
    try:
        drop.p = 0.5
        want = _run_training(module, type(module).forward, x, seed=99)
        for place in ("hidden", "output"):
            candidate = dataclasses.replace(match, drop_at=place)
            got = _run_training(module, mlp_forward(candidate, backend), x, seed=99)
            if close(want, got, x.dtype):
                return candidate
    finally:
        drop.p = p
    return match


def probe_mlp(module, match, backend):
    """The match with its dropout located when the module's forward equals the fused one on a
    random input (eval); else a string saying how it failed."""
    p = float_param(module)
    w_in = linear_weight(getattr(module, match.names[0]))[0]
    x = torch.randn(2, 3, w_in.shape[1], generator=torch.Generator().manual_seed(4321)).to(p.device, p.dtype)
    with eval_no_grad(module):
        try:
            y = type(module).forward(module, x)
        except Exception:
            return "looks like an MLP but its own forward fails on a probe input"
        try:
            y_new = mlp_forward(match, backend)(module, x)
        except Exception as e:  # an input the fused op refuses: say so, never crash the patch
            return f"looks like an MLP but the fused replacement fails on a probe input ({type(e).__name__}: {e})"
    if not isinstance(y, torch.Tensor) or not close(y, y_new, p.dtype):
        return "looks like an MLP but its forward computes something else on a probe input"
    if match.drop_name is None or len(match.names) == 1:
        return match
    return _locate_dropout(module, match, x, backend)


def try_mlp(module, label, backend, report, log):
    """Apply the MLP rule; True when it matched (replaced, or left with a reason)."""
    match = match_mlp(module)
    if match is None:
        return False
    typ = type(module).__name__
    if isinstance(match, MlpMatch):
        match = probe_mlp(module, match, backend)
    if isinstance(match, str):
        report.left.append((label, typ, match))
        return True
    log.set(module, forward=types.MethodType(mlp_forward(match, backend), module))
    op = "ff.linear_act" if len(match.names) == 1 else "ff.feed_forward"
    report.replaced.append((label, typ, f"{op}({match.activation!r})"))
    return True

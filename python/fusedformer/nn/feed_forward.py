"""FeedForward: the transformer MLP, plain or gated, on ff.feed_forward / ff.linear_act."""

import torch
import torch.nn.functional as F

from fusedformer.ops import feed_forward, linear_act
from fusedformer.vocabulary import ACTIVATIONS


def activation_name(activation):
    """torch.nn's ``activation`` argument ('relu', 'gelu', F.relu, F.gelu, nn.ReLU(), nn.GELU(...))
    -> the fused op's activation name, or None for any other callable (applied unfused)."""
    if isinstance(activation, str):
        if activation in ("relu", "gelu"):
            return activation
        raise RuntimeError(f"activation should be relu/gelu, not {activation}")
    if activation is F.relu or isinstance(activation, torch.nn.ReLU):
        return "relu"
    if activation is F.gelu:
        return "gelu"
    if isinstance(activation, torch.nn.GELU):
        return "gelu" if activation.approximate == "none" else "gelu_tanh"
    if activation is F.silu or isinstance(activation, torch.nn.SiLU):
        return "silu"
    if not callable(activation):
        raise TypeError(f"activation must be 'relu', 'gelu' or a callable, got {type(activation).__name__}")
    return None


def mlp(x, w1, b1, w2, b2, activation, dropout, training, backend):
    """Linear(w1, b1) -> activation -> dropout -> Linear(w2, b2). One ff.feed_forward call when the
    activation is fused and no dropout is drawn; otherwise linear_act, activation, dropout, linear_act.
    ``activation`` is a name of vocabulary.ACTIVATIONS or a callable."""
    if isinstance(activation, str) and activation in ACTIVATIONS and not ACTIVATIONS[activation].fused:
        # a gated activation the ops do not fuse: gate and up run as two GEMMs, multiplied here
        (w_gate, w_up), (b_gate, b_up) = w1.chunk(2), (b1.chunk(2) if b1 is not None else (None, None))
        gate_fn = ACTIVATIONS[activation].function.name
        h = linear_act(x, w_gate, b_gate, gate_fn, backend=backend) * linear_act(
            x, w_up, b_up, "identity", backend=backend)
    elif isinstance(activation, str) and (dropout == 0.0 or not training):
        return feed_forward(x, w1, b1, w2, b2, activation, backend=backend)
    elif isinstance(activation, str):
        h = linear_act(x, w1, b1, activation, backend=backend)
    else:
        h = activation(linear_act(x, w1, b1, "identity", backend=backend))
    h = F.dropout(h, dropout, training)
    return linear_act(h, w2, b2, "identity", backend=backend)


class FeedForward(torch.nn.Module):
    """The position-wise MLP of a transformer block.

    Plain:  y = act(x W_1^T + b_1) W_2^T + b_2                        W_1 (d_ff, d_model)
    Gated:  y = (act(x W_g^T + b_g) * (x W_u^T + b_u)) W_2^T + b_2     W_1 = [W_g; W_u] (2 d_ff, d_model)

    ``activation``: 'relu', 'gelu' (erf), 'gelu_tanh', 'silu', or gated 'swiglu' (SiLU gate),
    'geglu' (erf-GELU gate), 'geglu_tanh' (tanh-GELU gate, T5 v1.1's gated-gelu), 'reglu'.
    Parameters: ``w1`` (Linear d_model -> d_ff or 2 d_ff), ``w2`` (Linear d_ff -> d_model); dropout
    is applied to the hidden activations during training.
    """

    def __init__(self, d_model, d_ff, activation="gelu", bias=True, dropout=0.0, *, d_out=None, backend=None,
                 device=None, dtype=None):
        super().__init__()
        known = tuple(a for a in ACTIVATIONS if a != "identity")
        if activation not in known:
            raise ValueError(f"FeedForward: unknown activation {activation!r}; choose one of {known}")
        gated = ACTIVATIONS[activation].gated
        factory = {"device": device, "dtype": dtype}
        self.activation, self.dropout, self.backend = activation, float(dropout), backend
        self.w1 = torch.nn.Linear(d_model, 2 * d_ff if gated else d_ff, bias=bias, **factory)
        self.w2 = torch.nn.Linear(d_ff, d_out or d_model, bias=bias, **factory)

    def extra_repr(self):
        return f"activation={self.activation!r}, dropout={self.dropout}"

    def forward(self, x):
        return mlp(x, self.w1.weight, self.w1.bias, self.w2.weight, self.w2.bias, self.activation, self.dropout,
                   self.training, self.backend)

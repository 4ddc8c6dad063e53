"""ff.feed_forward: the transformer MLP, act(x @ w1^T + b1) @ w2^T + b2."""

import torch

from fusedformer.ops.linear_act import linear_act_rows, output_width, validate_linear

OP = "feed_forward"


def feed_forward(x, w1, b1, w2, b2, activation="gelu", *, backend=None):
    """Linear -> activation -> Linear. w1 (F, d_model) or (2F, d_model) for gated activations
    (rows [:F] gate, [F:] up), w2 (d_out, F); b1, b2 optional. Both GEMMs run as linear_act
    ops (the second with the identity activation) on the selected backend."""
    validate_linear(OP, x, w1, b1, activation, "w1", "b1")
    hidden_width = output_width(w1, activation)
    if isinstance(w2, torch.Tensor) and w2.dim() == 2 and w2.shape[1] != hidden_width:
        raise ValueError(f"{OP}: w2 has shape {tuple(w2.shape)}, expected (d_out, {hidden_width}) to match "
                         f"the {hidden_width}-wide hidden of w1 and activation {activation!r}")
    validate_linear(OP, x.new_empty(0, hidden_width), w2, b2, "identity", "w2", "b2")
    x2 = x.reshape(-1, x.shape[-1])
    hidden = linear_act_rows(x2, w1, b1, activation, backend)
    y = linear_act_rows(hidden, w2, b2, "identity", backend)
    return y.view(*x.shape[:-1], y.shape[-1])

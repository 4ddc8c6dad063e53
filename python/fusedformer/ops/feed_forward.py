"""ff.feed_forward: the transformer MLP, act(x @ w1^T + b1) @ w2^T + b2.

One custom op pair (``fusedformer::feed_forward_fwd`` / ``_bwd``) runs both GEMMs on the backend
chosen for linear_act. With ``recompute=True`` the forward keeps neither the preact nor the
hidden activation (each M x d_ff, the largest activations of a transformer block): the backward
rebuilds them from x and w1, on the triton backend inside the GEMM whose epilogue emits dh.

Backward, with hidden = act(preact), preact = x @ w1^T + b1, y = hidden @ w2^T + b2:
    dhidden = dy @ w2,  dw2 = dy^T @ hidden,  db2 = sum_rows(dy)
    (dx, dw1, db1) = linear_act backward of dhidden through act
"""

import math

import torch

from fusedformer import backends
from fusedformer._backends.tables import LINEAR_ACT
from fusedformer.ops._dispatch import call, custom_op, differentiable
from fusedformer.ops.linear_act import output_width, plain_call, rows_backend, validate_linear

OP = "feed_forward"


def _mm(a, b):
    # float16/bfloat16 on CPU: widen (CPU half GEMMs are slow or missing); on CUDA cuBLAS
    # accumulates in fp32 already
    if a.device.type == "cpu" and a.dtype in (torch.float16, torch.bfloat16):
        return torch.mm(a.float(), b.float()).to(a.dtype)
    return torch.mm(a, b)


@custom_op("feed_forward_fwd")
def feed_forward_fwd(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
                     b2: torch.Tensor | None, activation: str, backend: str, recompute: bool
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (M, d_model) -> (y (M, d_out), hidden (M, F), preact (M, N1)); hidden and preact are
    empty (0,) tensors when ``recompute`` (nothing kept for the backward)."""
    impl = LINEAR_ACT.implementation(rows_backend(backend, x, w1, w2))
    if recompute:
        hidden = impl.linear_act_inference(x, w1, b1, activation)
        saved_hidden, preact = x.new_empty(0), x.new_empty(0)
    else:
        hidden, preact = impl.linear_act_forward(x, w1, b1, activation)
        saved_hidden = hidden
    y = impl.linear_act_inference(hidden, w2, b2, "identity")
    return y, saved_hidden, preact


@feed_forward_fwd.register_fake
def _(x, w1, b1, w2, b2, activation, backend, recompute):
    y = x.new_empty(x.shape[0], w2.shape[0])
    if recompute:
        return y, x.new_empty(0), x.new_empty(0)
    return y, x.new_empty(x.shape[0], w2.shape[1]), x.new_empty(x.shape[0], w1.shape[0])


@custom_op("feed_forward_bwd")
def feed_forward_bwd(grad_y: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None,
                     w2: torch.Tensor, b2: torch.Tensor | None, hidden: torch.Tensor, preact: torch.Tensor,
                     activation: str, backend: str, recompute: bool
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dx, dw1, db1, dw2, db2); a missing bias gets an empty (0,) gradient."""
    impl = LINEAR_ACT.implementation(rows_backend(backend, x, w1, w2))
    dhidden = _mm(grad_y, w2)
    if recompute:
        dx, dw1, db1, hidden = impl.linear_act_recompute(dhidden, x, w1, b1, activation)
    else:
        dx, dw1, db1 = impl.linear_act_backward(dhidden, x, w1, b1, preact, activation)
    dw2 = _mm(grad_y.t(), hidden)
    acc = torch.float64 if grad_y.dtype == torch.float64 else torch.float32
    db2 = grad_y.sum(0, dtype=acc).to(b2.dtype) if b2 is not None else x.new_empty(0)
    if db1 is None:
        db1 = x.new_empty(0)
    return dx, dw1, db1, dw2, db2


@feed_forward_bwd.register_fake
def _(grad_y, x, w1, b1, w2, b2, hidden, preact, activation, backend, recompute):
    db1 = b1.new_empty(b1.shape) if b1 is not None else x.new_empty(0)
    db2 = b2.new_empty(b2.shape) if b2 is not None else x.new_empty(0)
    return x.new_empty(x.shape), w1.new_empty(w1.shape), db1, w2.new_empty(w2.shape), db2


def _setup_context(ctx, inputs, output):
    x, w1, b1, w2, b2, activation, backend, recompute = inputs
    ctx.activation, ctx.backend, ctx.recompute = activation, backend, recompute
    ctx.save_for_backward(x, w1, b1, w2, b2, output[1], output[2])


def _backward(ctx, grad_y, grad_hidden, grad_preact):
    x, w1, b1, w2, b2, hidden, preact = ctx.saved_tensors
    dx, dw1, db1, dw2, db2 = call(feed_forward_bwd, grad_y, x, w1, b1, w2, b2, hidden, preact, ctx.activation,
                                              ctx.backend, ctx.recompute)
    return (dx, dw1, db1 if b1 is not None else None, dw2, db2 if b2 is not None else None, None, None, None)


_feed_forward_fwd = differentiable(feed_forward_fwd, _setup_context, _backward)


def feed_forward(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
                 b2: torch.Tensor | None, activation: str = "gelu", *, backend: str | None = None,
                 recompute: bool = False) -> torch.Tensor:
    """Linear -> activation -> Linear. x (..., d_model), w1 (F, d_model) or (2F, d_model) for gated
    activations (rows [:F] gate, [F:] up), w2 (d_out, F); b1, b2 optional; returns (..., d_out) in
    x's dtype. ``recompute=True`` keeps no M x F activation for the backward and recomputes it
    there (one more x @ w1^T GEMM). Backends: as linear_act (both GEMMs are linear_act's)."""
    if type(x) is torch.Tensor and type(recompute) is bool:  # the lean path (see backends.lean_choice)
        impl = backends.lean_choice(LINEAR_ACT.name, x, backend)
        if (impl is not None and plain_call(x, w1, b1, activation) and x.numel() and w1.numel()
                and plain_call(x, w2, b2, "identity", output_width(w1, activation)) and w2.numel()):
            try:
                return impl.linear_act_lean(impl.linear_act_lean(x, w1, b1, activation), w2, b2, "identity")
            except Exception:  # refused: the full path's checks name the argument
                pass
    validate_linear(OP, x, w1, b1, activation, "w1", "b1")
    hidden_width = output_width(w1, activation)
    if isinstance(w2, torch.Tensor) and w2.dim() == 2 and w2.shape[1] != hidden_width:
        raise ValueError(f"{OP}: w2 has shape {tuple(w2.shape)}, expected (d_out, {hidden_width}) to match "
                         f"the {hidden_width}-wide hidden of w1 and activation {activation!r}")
    validate_linear(OP, x, w2, b2, "identity", "w2", "b2", in_features=hidden_width)
    if not isinstance(recompute, bool):
        raise TypeError(f"{OP}: recompute must be a bool, got {type(recompute).__name__}")
    rows = x.ndim == 2  # rows already: no reshape there and back (~20k instructions)
    x2 = x if rows else x.reshape(math.prod(x.shape[:-1]), x.shape[-1])  # reshape(-1, K) cannot tell M when K is 0
    name = backends.select(LINEAR_ACT.name, x2.device, (x2, w1, b1, activation), backend)
    y = _feed_forward_fwd(x2, w1, b1, w2, b2, activation, name, recompute)[0]
    return y if rows else y.view(*x.shape[:-1], y.shape[-1])

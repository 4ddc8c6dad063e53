"""How an op reaches its backend: a torch.library custom op under torch.compile / export, and the
op's plain Python body in eager mode.

The custom op is what graphs see: one node with a fake implementation and a registered autograd
formula, never a graph break. In eager mode the same body and the same autograd formula run
through a ``torch.autograd.Function`` instead, skipping the custom-op dispatcher: 10-25 us of host
time per call, as much as a small kernel takes on a GPU. When no gradient can flow (grad mode off,
or no tensor argument requiring grad) the body runs alone: an autograd.Function costs about 50k
instructions per call even then (benchmarks/NOTES.md). Eager means: not under torch.compile and
every tensor argument a plain tensor (fake, functional and other subclass tensors of tracers such
as AOTAutograd or non-strict export take the custom op).
"""

import functools

import torch

from fusedformer.vocabulary import EAGER_TENSOR_TYPES

_TRACED, _NO_GRAD, _GRAD = range(3)


def _mode(args):
    """_TRACED (run the custom op), _NO_GRAD (the body alone) or _GRAD (the autograd.Function);
    one pass over the arguments, as this runs on every call."""
    if torch.compiler.is_compiling():
        return _TRACED
    mode = _NO_GRAD
    grad_enabled = torch.is_grad_enabled()  # first: without it no requires_grad needs reading
    for a in args:
        if isinstance(a, torch.Tensor):
            if type(a) not in EAGER_TENSOR_TYPES:
                return _TRACED
            if grad_enabled and a.requires_grad:
                mode = _GRAD
    return mode


def _dense(outputs):
    if isinstance(outputs, torch.Tensor):
        return outputs.contiguous()
    return tuple(t.contiguous() for t in outputs)


def custom_op(name):
    """Decorator: ``fusedformer::<name>`` from a function whose annotations give the schema; the
    function stays reachable as ``op.body`` for the eager path.

    The custom op returns contiguous tensors, as the fake implementations promise graphs. The
    eager path returns the backend's tensors as they come (torch's CPU flash kernel writes a
    transposed lse): copying them would cost a kernel per output and nobody needs it."""

    def wrap(body):
        @functools.wraps(body)  # the schema comes from body's signature
        def dense_body(*args, **kwargs):
            return _dense(body(*args, **kwargs))

        op = torch.library.custom_op(f"fusedformer::{name}", mutates_args=())(dense_body)
        op.body = body
        return op

    return wrap


def call(op, *args):
    """Run a custom op without autograd (backward and inference ops): its body in eager mode,
    the op itself otherwise."""
    return op(*args) if _mode(args) == _TRACED else op.body(*args)


def differentiable(op, setup_context, backward, inference=None):
    """Register ``backward`` / ``setup_context`` (register_autograd's contract) on ``op`` and
    return a callable that runs, in eager mode, the body alone when no gradient can flow and the
    same body and formula through an autograd.Function when one can; ``op`` otherwise.
    ``inference``, if given, replaces the body when no gradient can flow: the same arguments and
    outputs, except that those only the backward reads may be None (a backend's inference entry).
    ``backward`` always gets the first output's gradient; any other output's is None when that
    output was not used (the norms' residual stream, which their backends take as optional, and
    the backward's own outputs: statistics, preact, hidden)."""
    op.register_autograd(backward, setup_context=setup_context)

    class Eager(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            output = op.body(*args)
            setup_context(ctx, args, output)
            # autograd would fill a zero gradient for every output nobody used (an (M, d_ff) fill for
            # feed_forward's preact and hidden per call); only the first output's is filled, if needed
            ctx.set_materialize_grads(False)
            first = output[0] if isinstance(output, tuple) else output
            ctx.first_output = (first.shape, first.dtype, first.device)
            return output

        @staticmethod
        def backward(ctx, grad, *grads):
            if grad is None:  # the first output unused, another one (the norms' residual stream) used
                shape, dtype, device = ctx.first_output
                grad = torch.zeros(shape, dtype=dtype, device=device)
            return backward(ctx, grad, *grads)

    def apply(*args):
        mode = _mode(args)
        if mode == _NO_GRAD:
            return (inference or op.body)(*args)
        return Eager.apply(*args) if mode == _GRAD else op(*args)

    return apply


def reshaped(t, shape):
    """``t.reshape(shape)``, or ``t`` itself when it has that shape already: the ops' shape
    adapters run on every call, and a reshape that changes nothing still costs a dispatcher
    round trip (~10k instructions; a view to a torch.Size ~24k)."""
    return t if t.shape == shape else t.reshape(shape)

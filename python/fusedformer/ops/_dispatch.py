"""How an op reaches its backend: a torch.library custom op under torch.compile / export, and the
op's plain Python body in eager mode.

The custom op is what graphs see: one node with a fake implementation and a registered autograd
formula, never a graph break. In eager mode the same body and the same autograd formula run
through a ``torch.autograd.Function`` instead, skipping the custom-op dispatcher: 10-25 us of host
time per call, as much as a small kernel takes on a GPU. Eager means: not under torch.compile and
every tensor argument a plain tensor (fake, functional and other subclass tensors of tracers such
as AOTAutograd or non-strict export take the custom op).
"""

import torch

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _eager(args):
    if torch.compiler.is_compiling():
        return False
    return all(type(a) in _PLAIN for a in args if isinstance(a, torch.Tensor))


def custom_op(name):
    """Decorator: ``fusedformer::<name>`` from a function whose annotations give the schema; the
    function stays reachable as ``op.body`` for the eager path."""

    def wrap(body):
        op = torch.library.custom_op(f"fusedformer::{name}", mutates_args=())(body)
        op.body = body
        return op

    return wrap


def call(op, *args):
    """Run a custom op without autograd (backward and inference ops): its body in eager mode,
    the op itself otherwise."""
    return op.body(*args) if _eager(args) else op(*args)


def differentiable(op, setup_context, backward):
    """Register ``backward`` / ``setup_context`` (register_autograd's contract) on ``op`` and
    return a callable that runs the same body and formula through an autograd.Function in eager
    mode, and ``op`` otherwise."""
    op.register_autograd(backward, setup_context=setup_context)

    class Eager(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            output = op.body(*args)
            setup_context(ctx, args, output)
            return output

        @staticmethod
        def backward(ctx, *grads):
            return backward(ctx, *grads)

    def apply(*args):
        return Eager.apply(*args) if _eager(args) else op(*args)

    return apply

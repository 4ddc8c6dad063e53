"""Which backend ran, or would run, an op on given inputs, and why not the others.

    ff.which_backend(ff.scaled_dot_product_attention, q, k, v, is_causal=True)
        # the choice for this call; nothing is computed
    ff.explain(model, input_ids)
        # runs the call; every op's choice, each once, with how many calls made it

Both read the selection itself (``fusedformer.backends.select``): the requested backend
(argument, ``use_backend``, FUSEDFORMER_BACKEND or auto), the one chosen, and for every backend
whether it can run these inputs and, if not, why.
"""

import contextlib
import dataclasses

import torch

from fusedformer import backends


@dataclasses.dataclass(frozen=True)
class Selection:
    """One backend choice: ``op`` (its family, e.g. "attention") on ``device``, the ``requested``
    backend ("auto" or a name), the ``backend`` chosen (None: nothing could run it, the call
    raised BackendUnavailableError), ``reasons`` {backend: None if it can run these inputs, else
    why not} and ``auto_order``, the backends ``auto`` tries on this device, in order."""

    op: str
    device: str
    requested: str
    backend: str | None
    reasons: dict
    auto_order: tuple

    def __str__(self):
        head = f"{self.op} on {self.device}, backend={self.requested!r} -> {self.backend or 'no backend can run it'}"
        return "\n".join([head, *(f"  {name:<10} {self._why(name)}" for name in self.reasons)])

    def _why(self, name):
        reason = self.reasons[name]
        if name == self.backend:
            return "chosen"
        if reason is not None:
            return f"cannot: {reason}"
        if self.requested != "auto":
            return f"could run it; {self.requested} was asked for"
        if name in self.auto_order:
            return f"could run it; auto chose {self.backend}, earlier in its order here ({', '.join(self.auto_order)})"
        return f"could run it; auto does not try it on {self.device} (ask for it by name)"


@dataclasses.dataclass
class Explanation:
    """What ``explain`` saw: ``selections`` {Selection: number of calls that made it}, in first-seen
    order, and the call's ``result``."""

    selections: dict
    result: object = None

    def backends(self):
        """{op: set of the backends that ran it}."""
        ran = {}
        for s in self.selections:
            ran.setdefault(s.op, set()).add(s.backend)
        return ran

    def __str__(self):
        if not self.selections:
            return "no fusedformer op was called"
        return "\n".join(f"{s}\n  ({n} call{'s' if n > 1 else ''})" for s, n in self.selections.items())


def _selection(family, device, args, requested, chosen):
    # what a reason depends on, hashable: Selection is a key of Explanation.selections
    reasons = {name: backends.unsupported_reason(name, family, device, args) for name in backends.BACKENDS}
    order = backends.AUTO_ORDER.get(device.type, ("reference",))
    device_name = str(device) if device.index is None else f"{device.type}:{device.index}"
    return Selection(family, device_name, requested, chosen, _Frozen(reasons), tuple(order))


class _Frozen(dict):
    def __hash__(self):
        return hash(tuple(self.items()))


@contextlib.contextmanager
def _observing(observer):
    backends.observers.append(observer)
    try:
        yield
    finally:
        backends.observers.remove(observer)


def explain(fn, *args, **kwargs):
    """Run ``fn(*args, **kwargs)`` (a fusedformer op, a module, a whole model, ...) and return an
    :class:`Explanation` of every backend choice its fusedformer ops made, each once with its
    call count; the call's return value is ``.result``. ``print(ff.explain(...))`` shows them."""
    seen = {}

    def record(family, device, op_args, requested, chosen):
        key = _selection(family, device, op_args, requested, chosen)
        seen[key] = seen.get(key, 0) + 1

    with _observing(record):
        result = fn(*args, **kwargs)
    return Explanation(seen, result)


class _Chosen(Exception):
    def __init__(self, selection):
        self.selection = selection


def which_backend(op, *args, **kwargs):
    """The :class:`Selection` the first fusedformer op inside ``op(*args, **kwargs)`` makes, without
    running it: the op's inputs are checked as in a real call, the choice is made, and the call
    stops there. Raises ValueError if ``op`` calls no fusedformer op."""

    def stop(family, device, op_args, requested, chosen):
        raise _Chosen(_selection(family, device, op_args, requested, chosen))

    try:
        with _observing(stop), torch.no_grad():
            op(*args, **kwargs)
    except _Chosen as chosen:
        return chosen.selection
    raise ValueError(f"which_backend: {getattr(op, '__name__', op)!r} made no backend choice (not a fusedformer op?)")

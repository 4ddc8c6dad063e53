"""The backend registry: which backends exist, whether one can run on a device, and which one
runs a call.

What a backend implements, op family by op family, is declared in ``_backends/tables.py`` (and
checked by ``_backends/contract.py``): ops reach their backend through those tables. This module
only chooses the backend's name.

Selection, first match wins: the ``backend=`` argument, the innermost ``use_backend(...)``
context, the FUSEDFORMER_BACKEND variable, then ``auto``: the first backend in
``AUTO_ORDER[device type]`` that is available for the device and supports the inputs (on a
CPU: torch, then the reference). A backend asked for by name that cannot run the inputs raises
``BackendUnavailableError`` listing every backend and why; ``auto`` falls through and never fails
while the reference can run. On a GPU, each backend ``auto`` passes over is logged once per
(op, backend, reason) on the ``fusedformer`` logger; ``fusedformer.explain`` shows every choice.
"""

import contextlib
import logging
import os
import threading

import torch

from fusedformer._backends.contract import BackendUnavailableError, runs_everything
from fusedformer._backends.tables import FAMILIES

BACKENDS = ("reference", "torch", "triton", "cuda")

# What ``auto`` tries, fastest first, by device type; any other device type runs the reference.
# The cuda backend is selectable by name but stays out of ``auto`` until a committed GPU run in
# benchmarks/results/ shows its kernels passing (they compile here but have never run; see the
# README's backend matrix). A new backend: its name in BACKENDS, its families in
# _backends/tables.FAMILIES_BY_BACKEND, its rule in unavailable_reason, and a place here for ``auto``.
AUTO_ORDER = {
    "cuda": ("triton", "torch", "reference"),
    # torch's own fused kernels; the reference only for what they cannot compute exactly
    "cpu": ("torch", "reference"),
}


# The use_backend contexts in force, innermost last, as (name, marker) entries, per thread: no
# thread sees another's, and each exit removes its own entry (by its marker), not whatever is
# innermost, so contexts exited out of order leave the right one. A thread-local rather than a
# ContextVar: torch.compile(fullgraph=True) traces (and guards on) a thread-local's attributes,
# but cannot trace ContextVar.get. asyncio tasks of one thread therefore share it.
class _Contexts(threading.local):
    entries = ()  # each thread starts with none


_contexts = _Contexts()


# Availability never changes within a process: cached in plain dicts (not
# functools.lru_cache, which torch.compile traces around with a warning).
_cache = {}


def _cached(fn):
    def wrapper(*args):
        key = (fn.__name__, *args)
        if key not in _cache:
            _cache[key] = fn(*args)
        return _cache[key]

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


@contextlib.contextmanager
def use_backend(name):
    """Run the enclosed ops on backend ``name`` ('reference', 'torch', 'triton', 'cuda' or 'auto')."""
    _check_name(name, "use_backend")
    entry = (name, object())
    _contexts.entries += (entry,)
    try:
        yield name
    finally:
        _contexts.entries = tuple(e for e in _contexts.entries if e is not entry)


def _check_name(name, where):
    if not isinstance(name, str):
        raise TypeError(f"{where}: backend must be a str, got {type(name).__name__}")
    if name not in BACKENDS + ("auto",):
        raise ValueError(f"{where}: unknown backend {name!r}; choose one of {BACKENDS + ('auto',)}")


def requested_backend(backend=None):
    """The backend name in force for a call: argument > context > environment > 'auto'."""
    if backend is not None:
        _check_name(backend, "backend")
        return backend
    entries = _contexts.entries
    if entries:
        return entries[-1][0]
    env = environment_value(_BACKEND_VARIABLE)
    if env:
        _check_name(env, "FUSEDFORMER_BACKEND")
        return env
    return "auto"


# --------------------------------------------------------------------------------------------
# availability: why a backend cannot run on a device at all (cached; None means it can)
# --------------------------------------------------------------------------------------------


@_cached
def _triton_import_error():
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising anything else
        return f"triton is not importable ({exc.__class__.__name__}: {exc})"
    return None


@_cached
def _triton_floor_reason(family):
    import triton

    from fusedformer._backends.triton_floors import floor_reason

    return floor_reason(family, triton.__version__)


def triton_interpreted():
    # the kernel layer's answer; imported here, as importing fusedformer.kernels under
    # TRITON_INTERPRET=1 patches triton's interpreter, which only a triton run needs
    from fusedformer.kernels import interpreted

    return interpreted()


@_cached
def _cuda_extension_error():
    try:
        from fusedformer import _C  # noqa: F401
    except ImportError:
        from fusedformer._build_info import missing_extension_reason

        return missing_extension_reason()
    return None


def cuda_extension():
    """The compiled ``fusedformer._C`` module, or None."""
    if _cuda_extension_error() is not None:
        return None
    from fusedformer import _C

    return _C


def unavailable_reason(name, device):
    """Why backend ``name`` cannot run on ``device`` at all, or None if it can."""
    device = torch.device(device)
    if name in ("reference", "torch"):
        return None
    if name == "triton":
        err = _triton_import_error()
        if err:
            return err
        if device.type == "cuda" or (device.type == "cpu" and triton_interpreted()):
            return None
        if device.type == "cpu":
            return "inputs are on cpu and TRITON_INTERPRET=1 is not set"
        return f"triton does not run on {device.type}"
    if name == "cuda":
        err = _cuda_extension_error()
        if err:
            return err
        if device.type != "cuda":
            return f"inputs are on {device.type}, the cuda backend needs CUDA tensors"
        if not torch.cuda.is_available():
            return "no CUDA GPU is visible"
        from fusedformer._backends.cuda import _common as cuda_common  # imports this module

        return cuda_common.runtime_reason(device.index if device.index is not None else torch.cuda.current_device())
    raise ValueError(f"unknown backend {name!r}")


def unsupported_reason(name, family, device, args=None):
    """Why backend ``name`` cannot run op family ``family`` (its name) on these forward ``args``
    (on ``device`` at all, when ``args`` is None), or None."""
    reason = unavailable_reason(name, device) or (_triton_floor_reason(family) if name == "triton" else None)
    if reason:
        return reason
    impl, reason = FAMILIES[family].load(name)
    if reason:
        return reason
    return impl.unsupported(*args) if args is not None else None


# select()'s decisions. A decision that holds whatever the arguments (the backend runs every input
# and, for auto, every backend before it cannot run on the device at all: the torch backend's
# norms, softmax and linear_act on a CPU) is kept by (family, requested name, device): one tuple
# and one dict lookup. Any other by (family, requested name, device, _features(args)): working one
# out asks every backend in turn (availability, table, unsupported()), about 20k instructions; the
# key ~2-3k per tensor argument. The requested name is part of both keys, so a backend= argument,
# use_backend(...) or FUSEDFORMER_BACKEND of another value takes its own entry. Like availability,
# entries assume the backends themselves do not change within a process (tests that patch them
# call clear_selection_cache()). Scalar arguments that vary call by call (varlen's max_seqlen) make
# new keys: the cache starts over when it reaches _SELECTIONS_MAX.
_selections = {}
_SELECTIONS_MAX = 4096
# The ops' lean path (lean_choice): (family, requested name, None for a CPU tensor or else its
# device) -> the implementation whose lean entry answers that path's calls there, or None.
_lean_implementations = {}
_UNKNOWN = object()

# os.environ.get encodes the name and decodes the value on every call: ~8k instructions, a third
# of a small op's whole torch call. The mapping's own dict (what os.environ reads and writes, so
# always current) answers with one lookup; the value is decoded only when the variable is set.
_ENVIRONMENT = os.environ._data
_BACKEND_VARIABLE = os.environ.encodekey("FUSEDFORMER_BACKEND")


def environment_value(encoded_name):
    """The value of the environment variable ``os.environ.encodekey(name)``, or None: what
    os.environ.get(name) answers, for code that asks on every call."""
    value = _ENVIRONMENT.get(encoded_name)
    return os.environ.decodevalue(value) if value is not None else None
# module-level names: each saves lean_choice two attribute lookups per call. Dynamo still knows
# them for what they are (it recognizes the function objects, not the names).
_grad_enabled = torch.is_grad_enabled
_dynamo_compiling = torch.compiler.is_dynamo_compiling


def clear_selection_cache():
    """Forget select()'s decisions (for code that patches backends or their availability)."""
    _selections.clear()
    _lean_implementations.clear()


def _features(args):
    """What a backend's ``unsupported()`` may judge forward ``args`` on, the rest of the selection
    key: each tensor's dtype, number of dims, last dim and requires_grad, and every other
    argument's value. A backend judging on more (another dim, strides, alignment) must add it here."""
    return tuple([(a.dtype, a.ndim, a.shape[-1] if a.ndim else 1, a.requires_grad)
                  if isinstance(a, torch.Tensor) else a for a in args])


def select(family, device, args, backend=None):
    """The name of the backend that runs ``family`` on forward ``args`` (see module docstring);
    cached (see _selections) outside torch.compile and while nobody observes (fusedformer.explain
    sees every call)."""
    requested = requested_backend(backend)
    if observers or torch.compiler.is_compiling():  # compile: traced once per graph, no cache side effects
        return _select(family, torch.device(device), args, requested)
    name = _selections.get((family, requested, device))
    if name is not None:
        return name
    key = (family, requested, device, _features(args))
    name = _selections.get(key)
    if name is None:
        device = torch.device(device)
        name = _select(family, device, args, requested)
        if len(_selections) >= _SELECTIONS_MAX:
            _selections.clear()
        if _holds_for_any_arguments(family, device, requested, name):
            key = key[:3]
        _selections[key] = name
    return name


def lean_choice(family, x, backend=None):
    """The implementation whose lean entry (``<family>_lean``, see contract.lean) answers an op's
    lean path for tensor ``x``'s device, or None: the op then takes its full path. Not None only
    for an eager call with grad mode off, nobody observing, no FUSEDFORMER_BACKEND, when the
    backend asked for (``backend=``, use_backend, else ``auto``'s first available on the device)
    has a lean entry; anything that entry cannot answer, it refuses by raising. One function
    with one cached lookup: it runs on every such call, and on tiny tensors every Python call
    (~1k instructions) and tensor attribute (~0.5k) counts."""
    # is_dynamo_compiling, not is_compiling: dynamo reads both as True while tracing, and this one
    # is one Python call, not two (~0.7k instructions). is_compiling's other case, non-strict
    # export, traces FakeTensors, which every caller's `type(x) is torch.Tensor` already refuses.
    if _grad_enabled() or _dynamo_compiling():
        return None
    if backend is None:
        entries = _contexts.entries
        if entries:
            backend = entries[-1][0]
        elif _BACKEND_VARIABLE in _ENVIRONMENT:  # rare: the full path reads and checks it
            return None
        else:
            backend = "auto"
    elif type(backend) is not str:
        return None
    if observers:
        return None
    # x.is_cpu, not x.device, on a CPU: a torch.device is a new object per read and hashes slowly
    key = (family, backend, None if x.is_cpu else x.device)
    impl = _lean_implementations.get(key, _UNKNOWN)
    if impl is _UNKNOWN:
        impl = _lean_implementation(family, backend, x.device)
        if backend in BACKENDS or backend == "auto":  # only the valid names: the cache stays small
            _lean_implementations[key] = impl
    return impl


def _lean_implementation(family, requested, device):
    if requested == "auto":
        for name in AUTO_ORDER.get(device.type, ("reference",)):
            reason = unsupported_reason(name, family, device)
            if reason is None:
                break
            if device.type == "cuda":
                _report_pass_over(family, name, reason)
        else:  # no backend runs on the device: the full path says so
            return None
    elif requested in BACKENDS and unsupported_reason(requested, family, device) is None:
        name = requested
    else:
        return None
    impl, _ = FAMILIES[family].load(name)
    return impl if getattr(impl, f"{family}_lean") is not None else None


def _holds_for_any_arguments(family, device, requested, chosen):
    """Whether select() answers ``chosen`` whatever the forward arguments: it runs every input,
    and for ``auto`` each backend before it in the order cannot run on the device at all."""
    impl, _ = FAMILIES[family].load(chosen)
    if not runs_everything(impl):
        return False
    if requested != "auto":
        return True
    order = AUTO_ORDER.get(device.type, ("reference",))
    return all(unsupported_reason(name, family, device) is not None for name in order[:order.index(chosen)])


def _select(family, device, args, requested):
    if requested != "auto":
        chosen = requested if unsupported_reason(requested, family, device, args) is None else None
    else:
        chosen = None
        for name in AUTO_ORDER.get(device.type, ("reference",)):
            reason = unsupported_reason(name, family, device, args)
            if reason is None:
                chosen = name
                break
            if device.type == "cuda":
                _report_pass_over(family, name, reason)
    for observer in observers:
        observer(family, device, args, requested, chosen)
    if chosen is None:
        raise BackendUnavailableError(_explain(family, device, args, requested))
    return chosen


# Called as observer(family, device, args, requested, chosen or None) by every selection:
# fusedformer.explain records through it. Empty in normal runs.
observers = []
log = logging.getLogger("fusedformer")
_passed_over = set()


def _report_pass_over(family, name, reason):
    """On a GPU, ``auto`` skipping a backend is worth knowing (a slower path runs): said once per
    (op, backend, reason) on the ``fusedformer`` logger; not while torch.compile traces (a logging
    call would break the graph), where the eager call before has said it."""
    if not torch.compiler.is_compiling() and (family, name, reason) not in _passed_over:
        _passed_over.add((family, name, reason))
        log.warning("fusedformer: auto passed over the %s backend for %s: %s", name, family, reason)


def _explain(family, device, args, requested):
    lines = [f"fusedformer: backend {requested!r} cannot run {family} on {device.type} with these inputs"]
    for name in BACKENDS:
        reason = unsupported_reason(name, family, device, args)
        lines.append(f"  {name:<10} {'available' if reason is None else 'unavailable: ' + reason}")
    return "\n".join(lines)


def available_backends(device=None):
    """Names of the backends that can run on ``device`` (default: CUDA if present, else CPU)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return [name for name in BACKENDS if unavailable_reason(name, device) is None]


def backend_matrix(device=None):
    """{family: {backend: None or reason}}: what ``fusedformer info`` prints."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return {family: {b: unsupported_reason(b, family, device) for b in BACKENDS} for family in FAMILIES}

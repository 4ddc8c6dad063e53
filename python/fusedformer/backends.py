"""The backend registry: reference | triton | cuda, their availability, and backend selection.

Every backend implements one op table, forward and backward written out (reference.py has the
full contract in its docstrings):

    attention_forward(q, k, v, bias, causal, scale, dropout_p, seed, window, alibi_slopes)
        -> (out, lse)
    attention_backward(grad_out, q, k, v, bias, out, lse, causal, scale, dropout_p, seed, window,
                       alibi_slopes, bias_requires_grad) -> (dq, dk, dv, dbias)
    softmax_forward(x, dim) -> y                 softmax_backward(grad_y, y, dim) -> dx
    layer_norm_forward(x, weight, bias, eps, residual) -> (y, residual_out, mean, rstd)
    layer_norm_backward(grad_y, x, weight, bias, mean, rstd, grad_residual_out) -> (dx, dw, db)
    rms_norm_forward(x, weight, eps, residual) -> (y, residual_out, rstd)
    rms_norm_backward(grad_y, x, weight, rstd, grad_residual_out) -> (dx, dw)
    linear_act_forward(x, weight, bias, activation) -> (y, preact)
    linear_act_backward(grad_y, x, weight, bias, preact, activation) -> (dx, dw, db)

Inputs reaching a backend are already validated by ops/ (norms and linear_act see 2-D rows).
The reference backend is ``fusedformer.reference``. A kernel backend implements op family
``<family>`` in ``fusedformer._backends.<backend>.<family>``, with the two table functions and an
optional ``unsupported(*forward_args) -> str | None`` giving the reason it cannot run those
inputs (head dim, dtype, ...). A family whose module is missing is simply not offered.

Selection, first match wins: the ``backend=`` argument, the innermost ``use_backend(...)``
context, the FUSEDFORMER_BACKEND variable, then ``auto``: the first backend in ``AUTO_ORDER``
that is available for the device and supports the inputs (reference on CPU). A backend asked for
by name that cannot run the inputs raises ``BackendUnavailableError`` listing every backend and
why; ``auto`` falls through and never fails while the reference can run.
"""

import contextlib
import importlib
import os

import torch

BACKENDS = ("reference", "triton", "cuda")
FAMILIES = ("attention", "softmax", "layer_norm", "rms_norm", "linear_act", "varlen_attention")

# Preference of ``auto`` on a GPU, per family, fastest first. Until a committed GPU run in
# benchmarks/results/ says otherwise, the Triton kernels (verified in the interpreter) come before
# the CUDA ones (compiled here, never yet run): see the README's backend matrix.
AUTO_ORDER = {family: ("triton", "cuda", "reference") for family in FAMILIES}


class BackendUnavailableError(ValueError):
    """The requested backend cannot run this op on these inputs."""


_context_stack = []

# Availability and module lookups never change within a process: cached in plain dicts (not
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
    """Run the enclosed ops on backend ``name`` ('reference', 'triton', 'cuda' or 'auto')."""
    _check_name(name, "use_backend")
    _context_stack.append(name)
    try:
        yield name
    finally:
        _context_stack.pop()


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
    if _context_stack:
        return _context_stack[-1]
    env = os.environ.get("FUSEDFORMER_BACKEND")
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


def triton_interpreted():
    return os.environ.get("TRITON_INTERPRET") == "1"


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
    if name == "reference":
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


@_cached
def _family_module(name, family):
    """The module implementing ``family`` on backend ``name``, or the reason there is none."""
    if name == "reference":
        from fusedformer import reference

        return reference, None
    try:
        return importlib.import_module(f"fusedformer._backends.{name}.{family}"), None
    except ModuleNotFoundError as exc:
        if exc.name == f"fusedformer._backends.{name}.{family}":
            return None, f"{family} is not implemented on the {name} backend"
        return None, f"importing the {name} {family} module failed ({exc})"
    except Exception as exc:  # a broken kernel module must not break the other backends
        return None, f"importing the {name} {family} module failed ({exc.__class__.__name__}: {exc})"


def unsupported_reason(name, family, device, args=None):
    """Why backend ``name`` cannot run ``family`` on these forward ``args``, or None."""
    reason = unavailable_reason(name, device)
    if reason:
        return reason
    module, reason = _family_module(name, family)
    if reason:
        return reason
    check = getattr(module, "unsupported", None)
    if check is not None and args is not None:
        return check(*args)
    return None


def get_op(name, op):
    """The table function ``op`` (e.g. 'softmax_backward') of backend ``name``."""
    family = op.rsplit("_", 1)[0]
    module, reason = _family_module(name, family)
    if module is None:
        raise BackendUnavailableError(reason)
    return getattr(module, op)


def select(family, device, args, backend=None):
    """The name of the backend that runs ``family`` on forward ``args`` (see module docstring)."""
    requested = requested_backend(backend)
    device = torch.device(device)
    if requested != "auto":
        reason = unsupported_reason(requested, family, device, args)
        if reason is not None:
            raise BackendUnavailableError(_explain(family, device, args, requested))
        return requested
    order = AUTO_ORDER[family] if device.type == "cuda" else ("reference",)
    for name in order:
        if unsupported_reason(name, family, device, args) is None:
            return name
    raise BackendUnavailableError(_explain(family, device, args, "auto"))


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
    return {f: {b: unsupported_reason(b, f, device) for b in BACKENDS} for f in FAMILIES}

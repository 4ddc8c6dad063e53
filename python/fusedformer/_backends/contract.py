"""The contract between an op and its backends, and its check.

Each op family declares (in ``_backends/tables.py``) a ``Family``: the functions a backend module
must define, the ones it may define, each with its parameters, and the module every backend
implements the family in. ``Family.implementation(backend)`` imports that module the first time
it is asked for and checks it against the declaration: a missing function, or one whose
parameters are named or ordered otherwise, raises ``BackendContractError`` naming it. Optional
functions a module leaves out get the declared fallback, so an op calls every entry the same way.

Nothing here imports a backend module before it is needed: the triton and cuda modules (and
with them triton and fusedformer._C) load only when an op runs on them.
"""

import dataclasses
import importlib
import inspect
import types
from collections.abc import Callable


class BackendUnavailableError(ValueError):
    """The requested backend cannot run this op on these inputs."""


class BackendContractError(TypeError):
    """A backend module does not define what its op family's table declares."""


@dataclasses.dataclass(frozen=True)
class Function:
    """One entry of a family's table: ``name(params...) -> returns``. An optional entry has a
    ``fallback``: given the module's implementation, it builds the function the module left out."""

    name: str
    params: str  # "x, dim": the leading parameters, by name and in order
    returns: str
    fallback: Callable | None = None

    @property
    def param_names(self):
        return tuple(p.strip() for p in self.params.split(","))

    def mismatch(self, fn):
        """Why ``fn`` does not fit this entry, or None."""
        if not callable(fn):
            return f"{self.name} is not a function"
        params = list(inspect.signature(fn).parameters.values())
        if any(p.kind is p.VAR_POSITIONAL for p in params):
            return None  # fn(*args) takes any positional call
        names = tuple(p.name for p in params[:len(self.param_names)])
        if names != self.param_names:
            return f"{self.name}({', '.join(p.name for p in params)}) should take ({self.params})"
        extra = [p.name for p in params[len(self.param_names):] if p.default is p.empty and p.kind is not p.VAR_KEYWORD]
        if extra:
            return f"{self.name} has parameters without a default beyond ({self.params}): {', '.join(extra)}"
        return None


def _runs_everything(*forward_args):
    return None


def runs_everything(impl):
    """Whether a backend's checked family functions left ``unsupported`` out: it runs any input."""
    return impl.unsupported is _runs_everything


def unsupported(params):
    """The optional ``unsupported(*forward_args) -> str | None`` entry: why the backend cannot run
    these forward arguments (dtype, head dim, ...), None when it can. Left out: it runs them all."""
    return Function("unsupported", params, "str | None", fallback=lambda impl: _runs_everything)


def lean(name, params, returns):
    """An optional ``<family>_lean`` entry: the op's whole answer to an eager call with grad mode
    off, for the ops' lean path (``backends.lean_choice``). It takes what the op's lean path
    checked (the table says what, per family) and must raise, any exception, on every other call
    the op's full path would refuse or answer otherwise: the op then takes its full path, whose
    checks name the argument (and whose selection may pick another backend). So a backend
    defines it whose own checks are torch's (the torch backend), or that checks, before any
    launch, what its kernels would not refuse (the triton backend); left out, it is None and the
    op always takes its full path on that backend."""
    return Function(name, params, returns, fallback=lambda impl: None)


class Family:
    """An op family's backend table: its ``functions`` (those with a fallback are optional, the
    others required) and where each backend's module is (``modules``: backend -> dotted name)."""

    def __init__(self, name, functions, modules):
        self.name = name
        self.functions = tuple(functions)
        self.required = tuple(f for f in self.functions if f.fallback is None)
        self.optional = tuple(f for f in self.functions if f.fallback is not None)
        self.modules = dict(modules)
        # backend -> (implementation, None) or (None, why there is none); filled on first use
        self.loaded = {}

    def __repr__(self):
        return f"Family({self.name!r}, modules={self.modules})"

    def check(self, module):
        """The declared functions of ``module`` as one namespace (optional ones it lacks filled by
        their fallback); raises BackendContractError naming what is missing or misnamed."""
        defined = vars(module)
        functions = {}
        for entry in self.required:
            if entry.name not in defined:
                raise BackendContractError(f"{_name(module)} lacks {entry.name}({entry.params}), required by the "
                                           f"{self.name} table")
            functions[entry.name] = defined[entry.name]
        for entry in self.optional:
            if entry.name in defined:
                functions[entry.name] = defined[entry.name]
        for entry in self.required + self.optional:
            if entry.name in functions:
                why = entry.mismatch(functions[entry.name])
                if why:
                    raise BackendContractError(f"{_name(module)}: {why} (the {self.name} table)")
        impl = types.SimpleNamespace(**functions)
        for entry in self.optional:
            if entry.name not in functions:
                setattr(impl, entry.name, entry.fallback(impl))
        return impl

    def load(self, backend):
        """(implementation, None), or (None, the reason ``backend`` has none), cached."""
        if backend not in self.loaded:
            self.loaded[backend] = self._import(backend)
        return self.loaded[backend]

    def _import(self, backend):
        module_name = self.modules.get(backend)
        if module_name is None:
            return None, f"{self.name} is not implemented on the {backend} backend"
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:  # a broken kernel module must not break the other backends
            return None, f"importing {module_name} failed ({exc.__class__.__name__}: {exc})"
        return self.check(module), None

    def implementation(self, backend):
        """The checked functions of ``backend`` for this family; BackendUnavailableError if none."""
        impl, reason = self.loaded.get(backend) or self.load(backend)
        if impl is None:
            raise BackendUnavailableError(reason)
        return impl


def _name(module):
    return module.__name__ if isinstance(module, types.ModuleType) else type(module).__name__

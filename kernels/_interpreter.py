"""Triton's CPU interpreter (TRITON_INTERPRET=1) made faithful to the GPU and strict about memory.

``install()`` patches triton 3.6's interpreter once per process (importing fusedformer.kernels calls
it when triton runs interpreted, so before any kernel of the package can launch):

- bf16 ``tl.dot``: the interpreter holds bf16 as uint16 and multiplies those integers; the operands
  are widened to float32 (exact) first, as the tensor cores multiply them.
- fp32 -> bf16 casts: the interpreter truncates, the GPU rounds to nearest even; they go through
  torch's conversion instead.
- bounds checking, when on (``FUSEDFORMER_CHECK_BOUNDS=1`` or ``with checking_bounds():``): every
  enabled lane of every load, store and atomic must lie inside the storage of one of the launch's
  tensor arguments, or the launch fails with ``OutOfBoundsError`` naming the kernel, the access and
  the nearest argument. On a GPU such a read returns garbage or faults; here it is a test failure.
"""

import contextlib
import inspect
import os
from dataclasses import dataclass

import numpy as np
import torch

BOUNDS_ENV = "FUSEDFORMER_CHECK_BOUNDS"
_MARK = "_fusedformer_shim"  # set on every patched method, so install() patches each once

_bounds_override = None  # True/False inside checking_bounds(); None: the environment decides
_launch = None  # the _Launch of the kernel the interpreter is running now


class OutOfBoundsError(IndexError):
    """An interpreted kernel touched memory outside every tensor argument's storage."""


@dataclass(frozen=True)
class _Launch:
    kernel: str
    starts: np.ndarray  # uint64 start address of each argument storage, ascending
    ends: np.ndarray  # uint64 end address (exclusive), same order
    names: tuple  # the argument names sharing each storage, same order


def bounds_checking():
    """Whether interpreted loads and stores are bounds-checked now."""
    if _bounds_override is not None:
        return _bounds_override
    return os.environ.get(BOUNDS_ENV) == "1"


@contextlib.contextmanager
def checking_bounds(enabled=True):
    """Bounds-check (or, with ``enabled=False``, do not check) the interpreted launches inside."""
    global _bounds_override
    saved, _bounds_override = _bounds_override, enabled
    try:
        yield
    finally:
        _bounds_override = saved


def install():
    """Patch the interpreter (idempotent). Does nothing if triton's interpreter cannot be imported."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    builder = interpreter.InterpreterBuilder
    _patch(builder, "create_dot", _bf16_dot)
    _patch(builder, "cast_impl", _bf16_rounding_cast)
    _patch(builder, "create_masked_load", _checked("load", "ptrs", "mask"))
    _patch(builder, "create_masked_store", _checked("store", "ptrs", "mask"))
    _patch(builder, "create_atomic_rmw", _checked("atomic", "ptr", "mask"))
    _patch(builder, "create_atomic_cas", _checked("atomic", "ptr"))
    _patch(interpreter.GridExecutor, "_init_args_hst", _recording_launch)


def _patch(cls, name, make_wrapper):
    original = getattr(cls, name)
    if getattr(original, _MARK, False):
        return
    wrapper = make_wrapper(original)
    setattr(wrapper, _MARK, True)
    setattr(cls, name, wrapper)


# ---------------------------------------------------------------------------------------------
# bf16 arithmetic as the GPU does it
# ---------------------------------------------------------------------------------------------


def _bf16_dot(original):
    import triton.language as tl
    from triton.runtime.interpreter import TensorHandle

    def widen(handle):
        if handle.dtype.scalar != tl.bfloat16:
            return handle
        return TensorHandle((handle.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    return create_dot


def _bf16_rounding_cast(original):
    import triton.language as tl
    from triton.runtime.interpreter import TensorHandle

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar != tl.float32 or dst_type.scalar != tl.bfloat16:
            return original(self, src, dst_type)
        fp32 = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32))
        return TensorHandle(fp32.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16), tl.bfloat16)

    return cast_impl


# ---------------------------------------------------------------------------------------------
# bounds checking
# ---------------------------------------------------------------------------------------------


def _recording_launch(original):
    """Wrap GridExecutor._init_args_hst (called once per launch, before the grid runs) to record
    the storages of the launch's tensor arguments, the only memory its kernel may touch."""

    def init_args_hst(self, args_dev, kwargs):
        global _launch
        args_hst, kwargs_hst = original(self, args_dev, kwargs)
        named = list(zip(self.arg_names, args_hst)) + list(kwargs_hst.items())
        _launch = _describe_launch(self.fn.__name__, named)
        return args_hst, kwargs_hst

    return init_args_hst


def _unwrap_tensor(arg):
    """The tensor under a reinterpreting TensorWrapper (triton's own helper is newer than 3.1)."""
    from triton.runtime.jit import TensorWrapper

    return arg.base if isinstance(arg, TensorWrapper) else arg


def _describe_launch(kernel, named_args):
    from triton.runtime import interpreter

    # host tensor descriptors are newer than triton 3.1: before them no argument is one
    TensorDescriptor = getattr(interpreter, "TensorDescriptor", ())
    storages = {}  # start address -> [end address, argument names]

    def visit(name, arg):
        if isinstance(arg, tuple):
            for i, item in enumerate(arg):
                visit(f"{name}[{i}]", item)
        elif isinstance(arg, TensorDescriptor):
            visit(f"{name}.base", arg.base)
        elif hasattr(arg, "data_ptr"):
            storage = _unwrap_tensor(arg).untyped_storage()
            if storage.nbytes():
                start = storage.data_ptr()
                storages.setdefault(start, [start + storage.nbytes(), []])[1].append(name)

    for name, arg in named_args:
        visit(name, arg)
    starts = sorted(storages)
    return _Launch(kernel, np.array(starts, dtype=np.uint64),
                   np.array([storages[s][0] for s in starts], dtype=np.uint64),
                   tuple("/".join(storages[s][1]) for s in starts))


def _check(access, ptrs, mask):
    """Raise OutOfBoundsError if an enabled lane of ``ptrs`` (a pointer TensorHandle) falls
    outside every argument storage of the running launch."""
    if _launch is None or not bounds_checking():
        return
    addresses, enabled = np.broadcast_arrays(ptrs.data.astype(np.uint64), True if mask is None else mask.data)
    width = np.uint64(max(1, ptrs.get_element_ty().primitive_bitwidth // 8))
    owner = np.searchsorted(_launch.starts, addresses, side="right") - 1
    inside = (owner >= 0) & (addresses <= _launch.ends[np.maximum(owner, 0)] - width)
    outside = enabled & ~inside
    if not outside.any():
        return
    lane = tuple(int(i) for i in np.argwhere(outside)[0])
    width = int(width)
    raise OutOfBoundsError(f"{_launch.kernel}: {access} of {int(outside.sum())} enabled lane(s) outside every "
                           f"tensor argument's storage; lane {lane} reads {width} bytes at "
                           f"{_nearest(int(addresses[lane]), width)}")


def _nearest(address, width):
    """Where ``address`` lies relative to the closest argument storage, in words."""
    best = None
    for start, end, name in zip(_launch.starts.tolist(), _launch.ends.tolist(), _launch.names):
        distance = max(start - address, address + width - end)
        where = f"byte {address - start} of {name}'s storage ({end - start} bytes)"
        best = min(best or (distance, where), (distance, where))
    return best[1] if best else "in a launch without tensor arguments"


def _checked(access, pointer, mask=None):
    """A wrapper factory for the builder method whose ``pointer`` argument (enabled under its
    ``mask`` argument, if any) it bounds-checks before the call; arguments may come by position or
    by name."""

    def make_wrapper(original):
        names = list(inspect.signature(original).parameters)  # "self" first, as positional args come

        def checked(*args, **kwargs):
            given = dict(zip(names, args), **kwargs)
            _check(access, given[pointer], given.get(mask))
            return original(*args, **kwargs)

        return checked

    return make_wrapper

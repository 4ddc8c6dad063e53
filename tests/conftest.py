"""Test harness: the triton interpreter on CPU, its bf16 tl.dot shim, device and seed fixtures.

TRITON_INTERPRET must be set before triton is imported, so it is set here at collection time
whenever no GPU is visible.
"""

import os

import pytest
import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _shim_interpreter_bf16_dot():
    """triton 3.6's interpreter holds bf16 as uint16 and tl.dot multiplies those integers;
    widen bf16 operands to float32 (exactly) before the matmul."""
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter
    except Exception:
        return
    original = interpreter.InterpreterBuilder.create_dot
    if getattr(original, "_fusedformer_shim", False):
        return

    def widen(handle):
        if handle.dtype.scalar == tl.bfloat16:
            data = (handle.data.astype(np.uint32) << 16).view(np.float32)
            return interpreter.TensorHandle(data, tl.float32)
        return handle

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    create_dot._fusedformer_shim = True
    interpreter.InterpreterBuilder.create_dot = create_dot


def _shim_interpreter_bf16_rounding():
    """triton 3.6's interpreter truncates fp32 -> bf16 in x.to(tl.bfloat16) (the GPU rounds to
    nearest even), which adds up to 1 ulp to every bf16 output; convert through torch instead."""
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter
    except Exception:
        return
    original = interpreter.InterpreterBuilder.cast_impl
    if getattr(original, "_fusedformer_shim", False):
        return

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            data = np.ascontiguousarray(src.data, dtype=np.float32)
            bf16 = torch.from_numpy(data).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
            return interpreter.TensorHandle(bf16, tl.bfloat16)
        return original(self, src, dst_type)

    cast_impl._fusedformer_shim = True
    interpreter.InterpreterBuilder.cast_impl = cast_impl


if os.environ.get("TRITON_INTERPRET") == "1":
    _shim_interpreter_bf16_dot()
    _shim_interpreter_bf16_rounding()


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    return "cuda" if HAS_GPU else "cpu"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _fresh_backend_selection():
    """Tests patch backends and their availability: no test sees another's cached selections."""
    from fusedformer import backends

    backends.clear_selection_cache()

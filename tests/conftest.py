"""Test harness: the triton interpreter on CPU, bounds-checked, device and seed fixtures.

TRITON_INTERPRET must be set before triton is imported, so it is set here at collection time
whenever no GPU is visible. The package makes the interpreter compute bf16 as the GPU does
(kernels/_interpreter.py, installed by importing fusedformer.kernels); here every interpreted load
and store is also checked to stay inside the kernel's tensor arguments.
"""

import os

import pytest
import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    from fusedformer.kernels._interpreter import BOUNDS_ENV

    os.environ.setdefault(BOUNDS_ENV, "1")


# The test files of each Triton kernel family whose kernels import what an older triton lacks: not
# collected below the family's floor (make test-oldest), where the triton backend declines it too.
TRITON_FAMILY_TESTS = {
    "attention": ["test_triton_attention*.py", "test_triton_autotune.py", "test_triton_resources.py",
                  "test_kernel_report.py", "test_triton_lean.py"],  # the last imports every kernel module
    "linear_act": ["test_triton_linear_act.py", "test_triton_split_k.py", "test_kernel_report_gemm.py"],
}


def _below_triton_floor():
    try:
        import triton
    except ImportError:
        return []
    from fusedformer._backends.triton_floors import floor_reason

    return [glob for family, globs in TRITON_FAMILY_TESTS.items() if floor_reason(family, triton.__version__)
            for glob in globs]


collect_ignore_glob = _below_triton_floor()


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

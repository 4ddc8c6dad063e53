"""The kernel layer corrects the Triton interpreter by itself: a script that imports only a kernel
module (never the triton backend, never this suite's conftest) and runs it under TRITON_INTERPRET=1
gets bf16 as the GPU computes it; without TRITON_INTERPRET nothing of the interpreter is loaded."""

import os
import subprocess
import sys
import textwrap

import pytest
from _testing import skip_below_triton_floor

from conftest import HAS_GPU

pytestmark = pytest.mark.skipif(HAS_GPU, reason="checks the CPU interpreter")

# Run first in every script: what the kernel layer must not need, and its error measure.
_PRELUDE = """
import sys
import torch
from fusedformer import vocabulary

def backend_not_imported():
    loaded = [name for name in sys.modules if name.startswith("fusedformer._backends.triton")]
    assert not loaded, f"the script was to run without the triton backend, but loaded {loaded}"

def max_error(got, want):
    return float((got.double() - want).abs().max())
"""

_MATMUL = """
from fusedformer.kernels import matmul_act

torch.manual_seed(0)
M, K, N = 37, 45, 29
x = torch.randn(K, M).bfloat16().t()  # strided: the GEMM reads x through its strides
weight, bias = torch.randn(N, K).bfloat16(), torch.randn(N).bfloat16()
y, _ = matmul_act.matmul_act_forward(x, weight, bias, "identity", store_preact=False)
backend_not_imported()

want = x.double() @ weight.double().t() + bias.double()
torch_err = max_error(torch.nn.functional.linear(x, weight, bias), want)
bound = vocabulary.parity_bound(torch_err, torch.bfloat16, float(want.abs().max()))
err = max_error(y, want)
assert err <= bound, f"bf16 matmul_act: error {err:.3e} against float64, over the parity bound {bound:.3e}"
print("ok")
"""

# Every value the kernel stores in bf16 is its float32 result rounded to nearest: within half a bf16
# ulp of the float64 softmax (the float32 math's own error, ~1e-7 relative, is the slack). The
# interpreter's truncating cast loses up to a whole ulp, on about half of them.
_CAST = """
from fusedformer.kernels import softmax

torch.manual_seed(0)
x = torch.randn(7, 203).bfloat16()
y = softmax.softmax_fwd(x, torch.empty_like(x), 1)
backend_not_imported()

want = torch.softmax(x.double(), 1)
half_ulp = torch.ldexp(torch.ones_like(want), torch.frexp(want).exponent - 9)  # bf16: 8 significant bits
over = ((y.double() - want).abs() > half_ulp * (1 + 2**-8)).sum().item()
assert not over, f"bf16 softmax: {over} of {want.numel()} values not rounded to nearest (float32 -> bf16)"
print("ok")
"""

_NOT_INTERPRETED = """
import fusedformer.kernels
from fusedformer.kernels import layer_norm, matmul_act, softmax

loaded = [name for name in ("triton.runtime.interpreter", "fusedformer.kernels._interpreter") if name in sys.modules]
assert not loaded, f"no TRITON_INTERPRET, yet loaded {loaded}"
print("ok")
"""


def _run(script, interpret):
    """Run ``script`` after the prelude in a fresh Python, with TRITON_INTERPRET=1 or without it."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    source = textwrap.dedent(_PRELUDE) + textwrap.dedent(script)
    result = subprocess.run([sys.executable, "-c", source], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def test_bf16_gemm_from_the_kernel_module_alone_is_right():
    skip_below_triton_floor("triton", "linear_act")  # the GEMM module needs triton >= its floor to import
    _run(_MATMUL, interpret=True)


def test_bf16_store_from_the_kernel_module_alone_rounds_to_nearest():
    _run(_CAST, interpret=True)


def test_kernels_without_the_interpreter_load_none_of_it():
    skip_below_triton_floor("triton", "linear_act")  # the script imports the GEMM module
    _run(_NOT_INTERPRETED, interpret=False)

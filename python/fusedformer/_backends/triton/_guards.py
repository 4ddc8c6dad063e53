"""What more than one triton module checks: the bfloat16 GPU floor and the lean entries' refusal.

The lean entries (``<family>_lean``, see _backends/contract.py's ``lean``) run on every eager
no-grad call, so these cost a few attribute reads: the GPU's compute capability is read once
per device (kernels/_device.py), not per call.
"""

from fusedformer.kernels import _device


class Refused(Exception):
    """A lean entry declines the call; the op then takes its full path, whose checks name the
    argument and whose selection may pick another backend. Never seen by a caller."""


def before_sm80(t):
    """Whether tensor ``t`` is on a GPU older than sm_80, which has no bfloat16 tensor cores:
    the attention and GEMM kernels refuse bfloat16 there."""
    return t.is_cuda and _device.properties(t.device).major < 8

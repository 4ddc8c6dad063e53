"""What more than one triton module checks: the bfloat16 GPU floor and the lean entries' refusal.

The lean entries (``<family>_lean``, see _backends/contract.py's ``lean``) run on every eager
no-grad call, so these cost a few attribute reads: the GPU's compute capability is asked once
per device, not per call.
"""

import torch


class Refused(Exception):
    """A lean entry declines the call; the op then takes its full path, whose checks name the
    argument and whose selection may pick another backend. Never seen by a caller."""


# cuda device index -> compute capability major: torch.cuda.get_device_capability costs several
# thousand instructions a call, and a GPU's answer never changes
_capability_major = {}


def before_sm80(t):
    """Whether tensor ``t`` is on a GPU older than sm_80, which has no bfloat16 tensor cores:
    the attention and GEMM kernels refuse bfloat16 there."""
    if not t.is_cuda:
        return False
    index = t.get_device()
    major = _capability_major.get(index)
    if major is None:
        major = _capability_major[index] = torch.cuda.get_device_capability(index)[0]
    return major < 8

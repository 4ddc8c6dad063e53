"""The oldest triton each Triton kernel family runs on, and why: the triton backend declines a
family on an older triton with that reason (``fusedformer info`` lists it), instead of failing
inside a kernel.

Every family needs at least TRITON_OLDEST, the triton of torch 2.5 (the oldest torch the package
supports, checked by ``make test-oldest``); FAMILY_FLOORS raises the floor where a kernel uses
something newer.
"""

import re

TRITON_OLDEST = ((3, 1), "the oldest triton fusedformer's kernels are tested with (torch 2.5's)")
_AUTOTUNER = ((3, 4), "the attention kernels' autotuner keeps its results on disk (triton's Autotuner "
                      "cache_results, new in triton 3.4, which torch >= 2.8 ships)")
FAMILY_FLOORS = {
    "attention": _AUTOTUNER,
    "varlen_attention": _AUTOTUNER,
    "linear_act": ((3, 4), "the Triton GEMM builds host-side tensor descriptors (triton.tools.tensor_descriptor, "
                           "new in triton 3.4, which torch >= 2.8 ships) and is autotuned as attention is"),
}


def parse(version):
    """(major, minor) of a version string such as '3.4.0' or '3.1.0+git1234'."""
    found = re.match(r"(\d+)\.(\d+)", version)
    return (int(found.group(1)), int(found.group(2))) if found else (0, 0)


def floor_reason(family, version):
    """Why triton ``version`` cannot run ``family``'s kernels, or None."""
    for (need, why) in (TRITON_OLDEST, FAMILY_FLOORS.get(family, TRITON_OLDEST)):
        if parse(version) < need:
            return f"triton {version} is older than {need[0]}.{need[1]}: {why}"
    return None


def summary(version, families):
    """One line for ``fusedformer info``: the families whose floor ``version`` misses, or that it
    meets them all."""
    missed = [f"{family} ({reason})" for family in families if (reason := floor_reason(family, version))]
    if missed:
        return "too old for " + "; ".join(missed)
    floors = ", ".join(f"{family} >= {need[0]}.{need[1]}" for family, (need, _) in FAMILY_FLOORS.items())
    return f"meets every kernel family's floor (all >= {TRITON_OLDEST[0][0]}.{TRITON_OLDEST[0][1]}; {floors})"

"""Triton kernels, one op per file: the kernel and its launcher (installed as fusedformer.kernels).

Every kernel module imports this package first, so this is where triton's CPU interpreter is made
to compute bf16 as the GPU does (and able to bounds-check, see _interpreter.py): once, before any
kernel here can launch, whoever imports it. Triton reads TRITON_INTERPRET when a kernel is defined,
this package when it is first imported; without it nothing of the interpreter is loaded.
"""

import os


def interpreted():
    """Whether triton runs the kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


# Only as fusedformer.kernels: run from the repository root, this folder is also found as a top-level
# `kernels` (transformers imports that name to probe for Hugging Face's kernels package), and
# importing fusedformer from there, while transformers is half-imported, breaks its registration.
if interpreted() and __name__ == "fusedformer.kernels":
    from fusedformer.kernels import _interpreter

    _interpreter.install()

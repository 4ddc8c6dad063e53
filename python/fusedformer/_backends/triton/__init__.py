"""The triton backend: op table functions that allocate outputs and call kernels/ launchers.

Run interpreted (TRITON_INTERPRET=1, on a CPU), the backend first makes triton's interpreter
compute bf16 as the GPU does and able to bounds-check (see _interpreter.py).
"""

from fusedformer import backends

if backends.triton_interpreted():
    from fusedformer._backends.triton import _interpreter

    _interpreter.install()

"""The triton backend: op table functions that allocate outputs and call kernels/ launchers.

Run interpreted (TRITON_INTERPRET=1, on a CPU), the kernels it calls correct triton's interpreter
themselves: importing fusedformer.kernels installs the shim (kernels/_interpreter.py).
"""

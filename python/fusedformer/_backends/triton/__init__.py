"""The triton backend: op table functions that allocate outputs and call kernels/ launchers."""

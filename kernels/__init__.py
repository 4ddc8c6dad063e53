"""Triton kernels, one op per file: the kernel and its launcher (installed as fusedformer.kernels)."""

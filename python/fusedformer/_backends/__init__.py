"""Kernel backends: one module per op family, see fusedformer.backends."""

"""The version of fusedformer: the one place it is written (setup.py reads it for the package
metadata, ``fusedformer.__version__`` imports it)."""

__version__ = "0.1.0"

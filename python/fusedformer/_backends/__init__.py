"""The backends behind the ops: ``tables.py`` declares each op family's table (what a backend
module must and may define, and where each backend's module is), ``contract.py`` checks a module
against it when first loaded, and ``triton/`` and ``cuda/`` hold the kernel backends' modules (the
reference backend is ``fusedformer.reference``)."""

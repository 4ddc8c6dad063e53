"""Drop-in modules for torch.nn and the building blocks of a transformer, on fusedformer ops."""

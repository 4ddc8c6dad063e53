"""The cuda backend: op table functions that allocate outputs and call fusedformer._C."""

"""What every pytest run here shares (tests/ and benchmarks/ each add their own conftest.py):
without a GPU, tests marked ``gpu`` are skipped."""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

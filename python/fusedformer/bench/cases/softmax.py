"""Softmax over the last dim of x (M, N). Memory-bound: bytes moved, element size e:
fwd reads x and writes y (2 M N e); bwd reads y and dy, writes dx (3 M N e); fwd+bwd 5 M N e."""

import torch

import fusedformer as ff
from fusedformer.bench.cases import _rowwise
from fusedformer.bench.cases._rowwise import rows

SHAPES = _rowwise.shapes(cpu=rows((256, 1024), (1024, 4096)), quick=rows((64, 1024), (8192, 8192)),
                         full=rows((64, 1024), (4096, 4096), (16384, 8192), (4096, 32768)))
PRESET_PROVIDERS = _rowwise.PRESET_PROVIDERS
TRAFFIC = {"fwd": 2, "bwd": 3, "fwd+bwd": 5}


def work(shape, pass_, dtype):
    return None, TRAFFIC[pass_] * shape["M"] * shape["N"] * dtype.itemsize


def make(shape, dtype, device):
    return [torch.randn(shape["M"], shape["N"], device=device, dtype=dtype) * 3], {}, [0]


def eager(x):
    return torch.softmax(x, dim=-1)


def providers(device, shape):
    return _rowwise.providers(lambda x, backend: ff.softmax(x, -1, backend=backend), eager, device)

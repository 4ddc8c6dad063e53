"""Softmax over the last dim of x (M, N). Memory-bound: bytes moved, element size e:
fwd reads x and writes y (2 M N e); bwd reads y and dy, writes dx (3 M N e); fwd+bwd 5 M N e."""

import torch

import fusedformer as ff
from fusedformer.bench.providers import (
    ROWWISE_HEADLINE_PROVIDERS,
    ROWWISE_HEADLINE_SHAPES,
    compiled,
    fusedformer_providers,
)

SHAPES = {
    "tiny": [dict(M=8, N=100), dict(M=17, N=257)],
    "cpu": [dict(M=256, N=1024), dict(M=1024, N=4096)],
    "quick": [dict(M=64, N=1024), dict(M=8192, N=8192)],
    "full": [dict(M=64, N=1024), dict(M=4096, N=4096), dict(M=16384, N=8192), dict(M=4096, N=32768)],
    "headline": ROWWISE_HEADLINE_SHAPES,
}
PRESET_PROVIDERS = {"headline": ROWWISE_HEADLINE_PROVIDERS}
TRAFFIC = {"fwd": 2, "bwd": 3, "fwd+bwd": 5}


def work(shape, pass_, dtype):
    return None, TRAFFIC[pass_] * shape["M"] * shape["N"] * dtype.itemsize


def make(shape, dtype, device):
    return [torch.randn(shape["M"], shape["N"], device=device, dtype=dtype) * 3], {}, [0]


def eager(x):
    return torch.softmax(x, dim=-1)


def providers(device, shape):
    out = fusedformer_providers(lambda x, backend: ff.softmax(x, -1, backend=backend), device)
    out["torch-eager"] = eager
    out["torch-compile"] = compiled(eager, device)
    return out

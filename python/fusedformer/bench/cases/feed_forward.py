"""The transformer MLP, act(x @ W1^T + b1) @ W2^T + b2: x (M, d), W1 (F, d) — (2F, d) gated —,
W2 (d, F). Compute-bound: FLOPs 2 M d F1 + 2 M F d for the two GEMMs (F1 = W1's rows); the
backward does two GEMMs per GEMM: 2x that; fwd+bwd 3x. Compared against the fraction of the
bf16 matmul ceiling."""

import torch
import torch.nn.functional as F

import fusedformer as ff
from fusedformer.bench.cases import linear_act
from fusedformer.bench.cases.linear_act import liger_act, mlp_shapes
from fusedformer.bench.providers import compiled, fusedformer_providers
from fusedformer.vocabulary import ACTIVATIONS

SHAPES = mlp_shapes("d", "F", tiny=[(12, 32, 64, "gelu"), (7, 24, 40, "swiglu")],
                    cpu=[(256, 512, 2048, "gelu"), (256, 512, 1408, "swiglu")],
                    full=[(64, 768, 3072, "gelu"), (8192, 2048, 8192, "gelu"), (64, 4096, 11008, "swiglu"),
                          (8192, 4096, 11008, "swiglu")])
PRESET_PROVIDERS = linear_act.PRESET_PROVIDERS
PASS_FACTOR = {"fwd": 1, "bwd": 2, "fwd+bwd": 3}


def _w1_rows(shape):
    return 2 * shape["F"] if ACTIVATIONS[shape["activation"]].gated else shape["F"]


def work(shape, pass_, dtype):
    M, d, F_ = shape["M"], shape["d"], shape["F"]
    return PASS_FACTOR[pass_] * (2 * M * d * _w1_rows(shape) + 2 * M * F_ * d), None


def make(shape, dtype, device):
    M, d, F_, F1 = shape["M"], shape["d"], shape["F"], _w1_rows(shape)
    x = torch.randn(M, d, device=device, dtype=dtype)
    w1 = torch.randn(F1, d, device=device, dtype=dtype) / d**0.5
    b1 = 0.1 * torch.randn(F1, device=device, dtype=dtype)
    w2 = torch.randn(d, F_, device=device, dtype=dtype) / F_**0.5
    b2 = 0.1 * torch.randn(d, device=device, dtype=dtype)
    return [x, w1, b1, w2, b2], {"activation": shape["activation"]}, [0, 1, 2, 3, 4]


def eager(x, w1, b1, w2, b2, activation):
    return F.linear(ACTIVATIONS[activation].torch_forward(F.linear(x, w1, b1)), w2, b2)


def bare_matmuls(x, w1, b1, w2, b2, activation):
    """The two GEMMs alone (a gated W1's first half feeds W2): the fused block's ceiling."""
    return (x @ w1.t())[..., :w2.shape[1]] @ w2.t()


def providers(device, shape):
    out = fusedformer_providers(lambda x, w1, b1, w2, b2, activation, backend: ff.feed_forward(
        x, w1, b1, w2, b2, activation, backend=backend), device)
    out["torch-eager"] = eager
    out["torch-compile"] = compiled(eager, device)
    out["torch-matmul"] = bare_matmuls
    la = liger_act(device, shape["activation"])
    out["liger"] = la if isinstance(la, str) else (
        lambda x, w1, b1, w2, b2, activation: F.linear(la(F.linear(x, w1, b1)), w2, b2))
    return out

"""act(x @ W^T + b): x (M, K), W (N, K) — (2N, K) for the gated swiglu/geglu, whose output is
act(gate) * up, N wide. Compute-bound: FLOPs 2 M K Nw for the GEMM (Nw = W's rows), the
activation ignored; the backward does the two GEMMs for dx and dW: 4 M K Nw; fwd+bwd 6 M K Nw.
Compared against the fraction of the bf16 matmul ceiling."""

import torch
import torch.nn.functional as F

import fusedformer as ff
from fusedformer.bench.providers import compiled, fusedformer_providers, liger_function
from fusedformer.vocabulary import ACTIVATIONS


def mlp_shapes(width, hidden, tiny, cpu, full):
    """SHAPES of a GEMM + activation case from (M, width, hidden, activation) rows, ``width`` and
    ``hidden`` naming the op's two sizes. Common to all: ``quick``, BERT-base's MLP (768, 3072) at
    64 tokens and LLaMA-7B's (4096, 11008) at 8192, and the GPU check's ``headline``, LLaMA-7B's
    MLP over 8192 tokens and a decode-sized batch (64), gelu and swiglu."""
    quick = [(64, 768, 3072, "gelu"), (8192, 4096, 11008, "swiglu")]
    headline = [(M, 4096, 11008, a) for M in (64, 8192) for a in ("gelu", "swiglu")]
    return {preset: [dict(M=M, **{width: w, hidden: h}, activation=a) for M, w, h, a in sizes]
            for preset, sizes in dict(tiny=tiny, cpu=cpu, quick=quick, full=full, headline=headline).items()}


SHAPES = mlp_shapes("K", "N", tiny=[(16, 32, 48, "gelu"), (9, 24, 20, "swiglu")],
                    cpu=[(256, 512, 2048, "gelu"), (256, 512, 1024, "swiglu")],
                    full=[(64, 768, 3072, "gelu"), (8192, 4096, 16384, "gelu"), (64, 4096, 11008, "swiglu"),
                          (8192, 4096, 11008, "swiglu")])
# the headline: against eager and the bare GEMM (torch-matmul), the fused op's ceiling
PRESET_PROVIDERS = {"headline": ("fusedformer-triton", "fusedformer-cuda", "torch-eager", "torch-matmul")}
PASS_FACTOR = {"fwd": 2, "bwd": 4, "fwd+bwd": 6}


def weight_rows(shape):
    return 2 * shape["N"] if ACTIVATIONS[shape["activation"]].gated else shape["N"]


def work(shape, pass_, dtype):
    return PASS_FACTOR[pass_] * shape["M"] * shape["K"] * weight_rows(shape), None


def make(shape, dtype, device):
    M, K, Nw = shape["M"], shape["K"], weight_rows(shape)
    x = torch.randn(M, K, device=device, dtype=dtype)
    w = torch.randn(Nw, K, device=device, dtype=dtype) / K**0.5
    b = 0.1 * torch.randn(Nw, device=device, dtype=dtype)
    return [x, w, b], {"activation": shape["activation"]}, [0, 1, 2]


def eager(x, w, b, activation):
    return ACTIVATIONS[activation].torch_forward(F.linear(x, w, b))


def bare_matmul(x, w, b, activation):
    """The GEMM alone, no bias or activation: what a fused epilogue should cost nothing over."""
    return x @ w.t()


def liger_act(device, activation):
    """Liger fuses only the gated product: cuBLAS GEMM, then its SiLU/GELU-mul kernel."""
    if not ACTIVATIONS[activation].gated:
        return f"liger has no fused {activation} epilogue"
    cls = ("swiglu", "LigerSiLUMulFunction") if activation == "swiglu" else ("geglu", "LigerGELUMulFunction")
    fn = liger_function(*cls, device)
    if isinstance(fn, str):
        return fn

    def run(h):
        gate, up = h.chunk(2, dim=-1)
        return fn(gate, up)

    return run


def providers(device, shape):
    out = fusedformer_providers(lambda x, w, b, activation, backend: ff.linear_act(x, w, b, activation,
                                                                                   backend=backend), device)
    out["torch-eager"] = eager
    out["torch-compile"] = compiled(eager, device)
    out["torch-matmul"] = bare_matmul
    la = liger_act(device, shape["activation"])
    out["liger"] = la if isinstance(la, str) else (lambda x, w, b, activation: la(F.linear(x, w, b)))
    return out

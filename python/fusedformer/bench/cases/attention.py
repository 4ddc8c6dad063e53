"""Attention: q (B, H, Lq, D), k and v (B, H, Lk, D), causal or not.

FLOPs: forward 4 * B * H * Lq * Lk * D (QK^T and PV, 2 FLOPs per multiply-add), x0.5 when
causal; the backward counts 2.5x the forward (five matmuls for two), so fwd+bwd is 3.5x, as
FlashAttention counts. Compared against the fraction of the bf16 matmul ceiling.
"""

import math

import torch
import torch.nn.functional as F

import fusedformer as ff
from fusedformer.bench.providers import compiled, fusedformer_providers, optional_module, raise_recompile_limit

SHAPES = {
    "tiny": [dict(B=1, H=2, Lq=16, Lk=16, D=16, causal=False), dict(B=1, H=2, Lq=24, Lk=24, D=16, causal=True)],
    "cpu": [dict(B=1, H=4, Lq=128, Lk=128, D=64, causal=False), dict(B=2, H=8, Lq=256, Lk=256, D=64, causal=True)],
    "quick": [dict(B=1, H=16, Lq=128, Lk=128, D=64, causal=False), dict(B=4, H=16, Lq=1024, Lk=1024, D=64, causal=True),
              dict(B=2, H=16, Lq=4096, Lk=4096, D=128, causal=False)],
    "full": [dict(B=1, H=16, Lq=128, Lk=128, D=64, causal=False), dict(B=8, H=16, Lq=512, Lk=512, D=64, causal=True),
             dict(B=4, H=16, Lq=2048, Lk=2048, D=128, causal=False),
             dict(B=4, H=16, Lq=2048, Lk=2048, D=128, causal=True),
             dict(B=2, H=16, Lq=8192, Lk=8192, D=128, causal=True)],
    # FlashAttention's benchmark convention: 16k tokens per batch (B = 16384 / L), model width 2048 (H = 2048 / D)
    "headline": [dict(B=16384 // L, H=2048 // D, Lq=L, Lk=L, D=D, causal=causal)
                 for D in (64, 128) for L in (1024, 4096, 16384) for causal in (False, True)],
}
# the GPU check's headline: every torch SDPA backend (and flash-attn when installed); eager, compile
# and FlexAttention only in the full sweep (their compiles would eat the headline's budget)
PRESET_PROVIDERS = {"headline": ("fusedformer-triton", "fusedformer-cuda", "torch-sdpa-flash", "torch-sdpa-efficient",
                                 "torch-sdpa-cudnn", "torch-sdpa-math", "flash-attn")}
PASS_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
SDPA = {"torch-sdpa-flash": "FLASH_ATTENTION", "torch-sdpa-efficient": "EFFICIENT_ATTENTION",
        "torch-sdpa-cudnn": "CUDNN_ATTENTION", "torch-sdpa-math": "MATH"}
MATH_MAX_SCORES = 2**31  # eager/math materialise B*H*Lq*Lk scores (x3 with softmax and grads)


def work(shape, pass_, dtype):
    s = shape
    flops = 4.0 * s["B"] * s["H"] * s["Lq"] * s["Lk"] * s["D"] * (0.5 if s["causal"] else 1.0)
    return flops * PASS_FACTOR[pass_], None


def make(shape, dtype, device):
    s = shape
    q = torch.randn(s["B"], s["H"], s["Lq"], s["D"], device=device, dtype=dtype)
    k = torch.randn(s["B"], s["H"], s["Lk"], s["D"], device=device, dtype=dtype)
    v = torch.randn(s["B"], s["H"], s["Lk"], s["D"], device=device, dtype=dtype)
    return [q, k, v], {"causal": s["causal"]}, [0, 1, 2]


def eager(q, k, v, causal):
    """softmax(QK^T * scale [+ causal -inf]) V, every intermediate materialised."""
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    if causal:
        keep = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def _sdpa(backend_name):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name)

    def fn(q, k, v, causal):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return fn


def _flex(device, shape):
    if torch.device(device).type != "cuda":
        return "FlexAttention is timed on CUDA only"
    mod = optional_module("torch.nn.attention.flex_attention", "torch.nn.attention.flex_attention")
    if isinstance(mod, str):
        return mod
    raise_recompile_limit()
    flex = torch.compile(mod.flex_attention, dynamic=False)
    block_mask = None
    if shape["causal"]:
        block_mask = mod.create_block_mask(lambda b, h, i, j: j <= i, None, None, shape["Lq"], shape["Lk"],
                                           device=device)
    return lambda q, k, v, causal: flex(q, k, v, block_mask=block_mask)


def _flash_attn(device):
    if torch.device(device).type != "cuda":
        return "flash-attn runs on CUDA only"
    mod = optional_module("flash_attn", "flash-attn")
    if isinstance(mod, str):
        return mod
    # flash_attn_func takes (B, L, H, D): transposed views, no copy
    return lambda q, k, v, causal: mod.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                       causal=causal).transpose(1, 2)


def providers(device, shape):
    out = fusedformer_providers(
        lambda q, k, v, causal, backend: ff.scaled_dot_product_attention(q, k, v, is_causal=causal, backend=backend),
        device)
    big = shape["B"] * shape["H"] * shape["Lq"] * shape["Lk"] > MATH_MAX_SCORES
    out["torch-eager"] = "B*H*Lq*Lk scores too large to materialise" if big else eager
    out["torch-compile"] = compiled(eager, device)
    cpu = torch.device(device).type == "cpu"
    for name, backend_name in SDPA.items():
        if cpu and name in ("torch-sdpa-efficient", "torch-sdpa-cudnn"):
            out[name] = f"{name} runs on CUDA only"
        elif big and name == "torch-sdpa-math":
            out[name] = "B*H*Lq*Lk scores too large to materialise"
        else:
            out[name] = _sdpa(backend_name)
    out["flex-attention"] = _flex(device, shape)
    out["flash-attn"] = _flash_attn(device)
    return out

"""Providers shared by the op files: fusedformer through its public API with ``backend=`` each
backend, torch.compile of torch's eager composition, and the optional libraries (Liger-Kernel,
FlashAttention). A provider is a callable ``fn(*inputs, **static)``, or a str: the reason it
cannot run on this device at all."""

import importlib

import torch

from fusedformer import backends

# Every provider name the results format (benchmarks/results/README.md) allows, in the order the reports list them.
# torch-matmul: the op's GEMMs alone (no bias, no activation), the ceiling a fused GEMM op aims at.
PROVIDERS = ("fusedformer-triton", "fusedformer-cuda", "fusedformer-reference", "fusedformer-torch", "torch-eager",
             "torch-compile", "torch-matmul", "torch-sdpa-flash", "torch-sdpa-efficient", "torch-sdpa-cudnn",
             "torch-sdpa-math", "flex-attention", "liger", "flash-attn")

# The GPU check's headline for the row-wise ops (softmax, layer / RMS norm): hidden 1024 / 4096 /
# 16384 over 8192 rows, and one decode-sized batch (launch overhead shows there), against eager,
# torch.compile and Liger.
ROWWISE_HEADLINE_SHAPES = [dict(M=64, N=4096), dict(M=8192, N=1024), dict(M=8192, N=4096), dict(M=8192, N=16384)]
ROWWISE_HEADLINE_PROVIDERS = ("fusedformer-triton", "fusedformer-cuda", "torch-eager", "torch-compile", "liger")


def fusedformer_providers(call, device):
    """{"fusedformer-<b>": fn} for every backend; ``call(*inputs, backend=b, **static)`` is the
    public-API call. Triton on a CPU runs interpreted: correct, but not a timing."""
    out = {}
    for name in backends.BACKENDS:
        reason = backends.unavailable_reason(name, device)
        if reason is None and name == "triton" and torch.device(device).type == "cpu":
            reason = "triton on a CPU runs in the interpreter (TRITON_INTERPRET=1): not timed"
        out[f"fusedformer-{name}"] = reason or (lambda *a, _b=name, **k: call(*a, backend=_b, **k))
    return out


def raise_recompile_limit(limit=256):
    """Dynamo keeps one cache per code object: a sweep compiling the same function for every
    shape, with and without grad, passes the default limit (8), after which torch.compile
    silently runs eager and the 'torch-compile' row would time eager."""
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # the name changed in torch 2.6
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), limit))
    if hasattr(config, "accumulated_recompile_limit"):
        config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4 * limit)


def compiled(fn, device):
    """torch.compile of ``fn``, static shapes (dynamic=False: each shape gets its own graph)."""
    if torch.device(device).type != "cuda":
        return "torch.compile is timed on CUDA only (on a CPU it measures the C++ codegen toolchain)"
    raise_recompile_limit()
    return torch.compile(fn, dynamic=False)


def optional_module(module, pip_name):
    """The module, or the reason it is missing."""
    try:
        return importlib.import_module(module)
    except Exception as exc:
        return f"{pip_name} is not importable ({exc.__class__.__name__})"


def liger_function(module, cls, device):
    """A Liger-Kernel autograd Function's ``apply``, or why there is none."""
    if torch.device(device).type != "cuda":
        return "liger-kernel runs on CUDA only"
    mod = optional_module(f"liger_kernel.ops.{module}", "liger-kernel")
    if isinstance(mod, str):
        return mod
    fn = getattr(mod, cls, None)
    return fn.apply if fn is not None else f"liger_kernel.ops.{module} has no {cls}"

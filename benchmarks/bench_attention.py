"""Attention benchmark (pytest-benchmark, GPU only): fusedformer's triton kernels against every
torch SDPA backend (flash, efficient, cudnn, math) and FlexAttention, side by side.

    pytest benchmarks/bench_attention.py --benchmark-only [-k "causal and 4096"]

FLOPs counted: forward 4 * B * H * Lq * Lk * D (two matmuls, 2 FLOPs per multiply-add), halved
when causal; the backward counts 2.5x the forward (five matmuls instead of two, as
FlashAttention counts), so fwd+bwd is 3.5x. Shapes keep B * L = 16k tokens and H * D = 2048
(a 2k-wide model), seq 512..16k, head dims 64 and 128, causal and not, plus a key-padding mask
case and a float per-head bias case. Times are CUDA-event medians (triton.testing.do_bench);
every row is also written, in the results format (docs/results-format.md), to
benchmarks/results/attention-<gpu>-<date>.json when the session ends.
"""

import pathlib

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("pytest_benchmark")
if not torch.cuda.is_available():
    pytest.skip("the attention benchmarks need a CUDA GPU", allow_module_level=True)

import fusedformer as ff  # noqa: E402
import triton  # noqa: E402
from fusedformer.bench.report import save_suite  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

pytestmark = pytest.mark.gpu

TOKENS, WIDTH = 16384, 2048
SEQS = [512, 1024, 2048, 4096, 8192, 16384]
HEAD_DIMS = [64, 128]
PASSES = ["fwd", "fwd+bwd"]
PROVIDERS = ["fusedformer-triton", "torch-sdpa-flash", "torch-sdpa-efficient", "torch-sdpa-cudnn", "torch-sdpa-math",
             "flex-attention"]
SDPA = {"torch-sdpa-flash": SDPBackend.FLASH_ATTENTION, "torch-sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
        "torch-sdpa-cudnn": SDPBackend.CUDNN_ATTENTION, "torch-sdpa-math": SDPBackend.MATH}
MATH_MAX_SEQ = 4096  # the math backend materialises B*H*L*L scores: beyond this it only measures OOM
ROWS = []


def flops(B, H, Lq, Lk, D, causal, pass_):
    f = 4.0 * B * H * Lq * Lk * D * (0.5 if causal else 1.0)
    return f * {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[pass_]


def _flex(q, k, v, causal, mask_kind, bias):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    B, H, L, _ = q.shape
    pad = L - L // 8  # the key-padding case: the last eighth of the keys is padding
    if causal or mask_kind == "pad":
        def keep(b, h, i, j):
            return (j <= i) if causal else (j < pad)

        block_mask = create_block_mask(keep, None, None, L, L, device=q.device)
    else:
        block_mask = None
    score_mod = None
    if bias is not None:
        def score_mod(score, b, h, i, j):
            return score + bias[0, h, i, j]
    compiled = torch.compile(flex_attention, dynamic=False)
    return lambda: compiled(q, k, v, score_mod=score_mod, block_mask=block_mask)


def _make(provider, B, H, L, D, dtype, causal, mask_kind, pass_):
    """The timed closure, or None when the provider cannot run this case."""
    grad = pass_ != "fwd"
    q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=dtype, requires_grad=grad) for _ in range(3))
    mask = bias = None
    if mask_kind == "pad":
        mask = torch.ones(B, 1, 1, L, device="cuda", dtype=torch.bool)
        mask[..., L - L // 8:] = False
    elif mask_kind == "bias":
        bias = torch.randn(1, H, L, L, device="cuda", dtype=dtype, requires_grad=grad)
        mask = bias
    if causal and mask is not None:
        raise ValueError("the masked cases are not causal: torch SDPA takes a mask or is_causal, not both")
    if provider == "fusedformer-triton":
        run = lambda: ff.scaled_dot_product_attention(q, k, v, mask, is_causal=causal, backend="triton")  # noqa: E731
    elif provider == "flex-attention":
        run = _flex(q, k, v, causal, mask_kind, bias)
    else:
        if provider == "torch-sdpa-math" and L > MATH_MAX_SEQ:
            return None

        def run():
            with sdpa_kernel(SDPA[provider]):
                return F.scaled_dot_product_attention(q, k, v, mask, is_causal=causal)
    try:
        out = run()
        if grad:
            out.backward(torch.randn_like(out))
        torch.cuda.synchronize()
    except (RuntimeError, NotImplementedError, ValueError) as exc:  # the backend cannot run this case
        return pytest.skip(f"{provider}: {str(exc).splitlines()[0][:200]}")
    if not grad:
        return run
    do = torch.randn(B, H, L, D, device="cuda", dtype=dtype)
    leaves = [t for t in (q, k, v, bias) if t is not None]

    def fwd_bwd():
        for t in leaves:
            t.grad = None
        run().backward(do)

    return fwd_bwd


def _bench(benchmark, provider, L, D, dtype, causal, mask_kind, pass_):
    B, H = max(1, TOKENS // L), WIDTH // D
    torch.manual_seed(0)
    fn = _make(provider, B, H, L, D, dtype, causal, mask_kind, pass_)
    if fn is None:
        pytest.skip(f"{provider} is not run at L={L}")
    ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    tflops = flops(B, H, L, L, D, causal, pass_) / (ms * 1e-3) / 1e12
    shape = {"B": B, "H": H, "Lq": L, "Lk": L, "D": D, "causal": causal, "mask": mask_kind}
    row = {"op": "attention", "provider": provider, "dtype": str(dtype).replace("torch.", ""), "pass": pass_,
           "shape": shape, "ms": ms, "tflops": tflops, "gbps": None, "frac_of_ceiling": None}
    ROWS.append(row)
    benchmark.extra_info.update(row)
    benchmark.pedantic(lambda: (fn(), torch.cuda.synchronize()), rounds=5, warmup_rounds=1)


@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("L", SEQS)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_attention(benchmark, provider, L, D, causal, pass_):
    _bench(benchmark, provider, L, D, torch.bfloat16, causal, None, pass_)


@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("mask_kind", ["pad", "bias"])
@pytest.mark.parametrize("L", [1024, 4096])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_attention_masked(benchmark, provider, L, mask_kind, pass_):
    _bench(benchmark, provider, L, 128, torch.bfloat16, False, mask_kind, pass_)


@pytest.mark.parametrize("Lk", [4096, 32768])
@pytest.mark.parametrize("provider", ["fusedformer-triton", "torch-sdpa-flash", "torch-sdpa-efficient",
                                      "torch-sdpa-cudnn", "flex-attention"])
def test_decode(benchmark, provider, Lk):
    """One new token per sequence against a KV cache, GQA 32/8 heads of 128: the split-K path."""
    B, H, Hkv, D = 8, 32, 8, 128
    q = torch.randn(B, H, 1, D, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(B, Hkv, Lk, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    if provider == "fusedformer-triton":
        fn = lambda: ff.scaled_dot_product_attention(q, k, v, enable_gqa=True, backend="triton")  # noqa: E731
    elif provider == "flex-attention":
        from torch.nn.attention.flex_attention import flex_attention

        compiled = torch.compile(flex_attention, dynamic=False)
        fn = lambda: compiled(q, k, v, enable_gqa=True)  # noqa: E731
    else:
        def fn():
            with sdpa_kernel(SDPA[provider]):
                return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    try:
        fn()
        torch.cuda.synchronize()
    except (RuntimeError, NotImplementedError, ValueError) as exc:
        pytest.skip(f"{provider}: {str(exc).splitlines()[0][:200]}")
    ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    # decode is bandwidth-bound: it reads the whole cache once
    gbps = 2 * B * Hkv * Lk * D * 2 / (ms * 1e-3) / 1e9
    row = {"op": "attention-decode", "provider": provider, "dtype": "bfloat16", "pass": "fwd",
           "shape": {"B": B, "H": H, "Hkv": Hkv, "Lq": 1, "Lk": Lk, "D": D, "causal": False}, "ms": ms,
           "tflops": flops(B, H, 1, Lk, D, False, "fwd") / (ms * 1e-3) / 1e12, "gbps": gbps, "frac_of_ceiling": None}
    ROWS.append(row)
    benchmark.extra_info.update(row)
    benchmark.pedantic(lambda: (fn(), torch.cuda.synchronize()), rounds=5, warmup_rounds=1)


def _ceilings():
    """A large device-to-device copy (GB/s) and a large bf16 matmul (TFLOP/s), measured now."""
    x = torch.empty(1 << 28, device="cuda", dtype=torch.uint8)
    y = torch.empty_like(x)
    copy_ms = triton.testing.do_bench(lambda: y.copy_(x), return_mode="median")
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm_ms = triton.testing.do_bench(lambda: a @ a, return_mode="median")
    return {"copy_gbps": 2 * x.numel() / (copy_ms * 1e-3) / 1e9,
            "matmul_bf16_tflops": 2 * 8192**3 / (mm_ms * 1e-3) / 1e12}


@pytest.fixture(scope="session", autouse=True)
def _write_results():
    yield
    if ROWS:
        save_suite("attention", ROWS, _ceilings(), pathlib.Path(__file__).parent / "results")


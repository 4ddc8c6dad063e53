"""GPU benchmark suite: softmax, layer_norm and rms_norm, forward and backward, fusedformer's
Triton kernels beside torch eager, torch.compile and Liger-Kernel (when importable).

    pip install -e .[bench,triton]
    pytest benchmarks/bench_norms.py --benchmark-json=bench_norms.json

Timing: triton.testing.do_bench (CUDA events, median, after warm-up) on fresh inputs per shape;
the same number goes into the row stored in pytest-benchmark's extra_info (the row fields of
docs/results-format.md: op, provider, dtype, pass, shape, ms, gbps, frac_of_ceiling). pytest-benchmark's own
wall-clock stats come from a synchronized closure and include the CPU launch cost.

Bytes counted (the algorithmic minimum, the same for every provider), e = element size:
    softmax     fwd: read x, write y                    2*M*N*e
                bwd: read y, dy, write dx               3*M*N*e
    layer_norm  fwd: read x, w, b, write y              2*M*N*e + 2*N*e
                bwd: read x, dy, w, write dx, dw, db    3*M*N*e + 3*N*e
    rms_norm    fwd: read x, w, write y                 2*M*N*e + N*e
                bwd: read x, dy, w, write dx, dw        3*M*N*e + 2*N*e
GB/s = bytes / time; frac_of_ceiling = GB/s / the device-to-device copy GB/s measured in the same
session (a 1 GiB copy_, counted as read + write).
"""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("pytest_benchmark")

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DTYPE = torch.bfloat16
OPS = ("softmax", "layer_norm", "rms_norm")
# the sweep (4k rows x hidden), plus small shapes where launch cost dominates
SHAPES = [(4096, 768), (4096, 1024), (4096, 4096), (4096, 8192), (64, 768), (256, 4096)]
PROVIDERS = ("fusedformer-triton", "torch-eager", "torch-compile", "liger")
PASSES = ("fwd", "bwd")
EPS = {"layer_norm": 1e-5, "rms_norm": 1e-6}


def _liger(op):
    """Liger-Kernel's autograd function for ``op``, or None when it is not importable."""
    try:
        if op == "softmax":
            from liger_kernel.ops.softmax import LigerSoftmaxFunction

            return lambda x, w, b: LigerSoftmaxFunction.apply(x)
        if op == "layer_norm":
            from liger_kernel.ops.layer_norm import LigerLayerNormFunction

            return lambda x, w, b: LigerLayerNormFunction.apply(x, w, b, EPS[op])
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction

        # in_place=False: Liger's default writes dx over dy, which repeated timing reuses
        return lambda x, w, b: LigerRMSNormFunction.apply(x, w, EPS[op], 0.0, "llama", False)
    except ImportError:
        return None


def _torch_fn(op, N):
    if op == "softmax":
        return lambda x, w, b: torch.softmax(x, -1)
    if op == "layer_norm":
        return lambda x, w, b: F.layer_norm(x, (N,), w, b, EPS[op])
    return lambda x, w, b: F.rms_norm(x, (N,), w, EPS[op])


def _ours(op, N):
    import fusedformer as ff

    if op == "softmax":
        return lambda x, w, b: ff.softmax(x, -1, backend="triton")
    if op == "layer_norm":
        return lambda x, w, b: ff.layer_norm(x, (N,), w, b, EPS[op], backend="triton")
    return lambda x, w, b: ff.rms_norm(x, (N,), w, EPS[op], backend="triton")


def provider_fn(op, provider, N):
    """f(x, w, b) -> y for one provider, or None when that provider is not installed."""
    if provider == "fusedformer-triton":
        return _ours(op, N)
    if provider == "torch-eager":
        return _torch_fn(op, N)
    if provider == "torch-compile":
        return torch.compile(_torch_fn(op, N))
    if provider == "liger":
        return _liger(op)
    raise ValueError(f"unknown provider {provider!r}")


def bytes_moved(op, pass_, M, N, e):
    """The byte counts of the module docstring."""
    rows = 2 if pass_ == "fwd" else 3
    params = {("softmax", "fwd"): 0, ("softmax", "bwd"): 0, ("layer_norm", "fwd"): 2, ("layer_norm", "bwd"): 3,
              ("rms_norm", "fwd"): 1, ("rms_norm", "bwd"): 2}[(op, pass_)]
    return rows * M * N * e + params * N * e


def make_inputs(op, M, N, requires_grad):
    gen = torch.Generator(device="cuda").manual_seed(M * 100003 + N)
    x = torch.randn(M, N, device="cuda", dtype=DTYPE, generator=gen)
    w = (1 + 0.1 * torch.randn(N, device="cuda", dtype=DTYPE, generator=gen)) if op != "softmax" else None
    b = 0.1 * torch.randn(N, device="cuda", dtype=DTYPE, generator=gen) if op == "layer_norm" else None
    leaves = [t for t in (x, w, b) if t is not None]
    for t in leaves:
        t.requires_grad_(requires_grad)
    return x, w, b, leaves


def timed_closure(fn, op, M, N, pass_):
    """The closure do_bench times: the forward call (no graph), or one backward through a kept
    graph with a fixed upstream gradient."""
    x, w, b, leaves = make_inputs(op, M, N, pass_ == "bwd")
    if pass_ == "fwd":
        return lambda: fn(x, w, b)
    y = fn(x, w, b)
    dy = torch.randn_like(y)
    return lambda: torch.autograd.grad(y, leaves, dy, retain_graph=True)


@pytest.fixture(scope="session")
def copy_gbps():
    import triton

    n = 1 << 29  # 1 GiB of bf16
    src = torch.empty(n, dtype=DTYPE, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return 2 * n * src.element_size() / ms / 1e6


@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("M,N", SHAPES, ids=[f"{m}x{n}" for m, n in SHAPES])
@pytest.mark.parametrize("op", OPS)
def test_bench(benchmark, copy_gbps, op, M, N, provider, pass_):
    import triton

    fn = provider_fn(op, provider, N)
    if fn is None:
        pytest.skip(f"{provider} is not importable")
    torch.manual_seed(0)
    run = timed_closure(fn, op, M, N, pass_)
    run()  # compile / autotune outside the timed region
    torch.cuda.synchronize()
    ms = triton.testing.do_bench(run, warmup=25, rep=100, return_mode="median")
    gbps = bytes_moved(op, pass_, M, N, torch.finfo(DTYPE).bits // 8) / ms / 1e6
    benchmark.group = f"{op}-{pass_}-{M}x{N}"
    benchmark.extra_info.update({
        "op": op, "provider": provider, "dtype": str(DTYPE).replace("torch.", ""), "pass": pass_,
        "shape": {"M": M, "N": N}, "ms": ms, "tflops": None, "gbps": gbps, "frac_of_ceiling": gbps / copy_gbps,
        "ceilings": {"copy_gbps": copy_gbps}, "device": torch.cuda.get_device_name(),
    })

    def synced():
        run()
        torch.cuda.synchronize()

    benchmark.pedantic(synced, rounds=20, iterations=5, warmup_rounds=2)


@pytest.mark.parametrize("M,N", SHAPES, ids=[f"{m}x{n}" for m, n in SHAPES])
@pytest.mark.parametrize("op", OPS)
def test_benchmarked_outputs_agree(op, M, N):
    """What the suite times computes the right thing: fusedformer-triton vs torch eager on the
    benchmark inputs, forward and every gradient, within bf16 rounding."""
    x, w, b, leaves = make_inputs(op, M, N, True)
    ref_leaves = [t.detach().float().requires_grad_(True) for t in leaves]
    ours = _ours(op, N)(x, w, b)
    rx, rw, rb = (ref_leaves + [None, None])[:3]
    want = _torch_fn(op, N)(rx, rw, rb)
    torch.testing.assert_close(ours.float(), want, atol=2e-2, rtol=2e-2)
    dy = torch.randn_like(ours)
    got = torch.autograd.grad(ours, leaves, dy)
    ref = torch.autograd.grad(want, ref_leaves, dy.float())
    for g, r in zip(got, ref):
        scale = max(1.0, float(r.abs().max()))
        torch.testing.assert_close(g.float(), r, atol=2e-2 * scale, rtol=2e-2)

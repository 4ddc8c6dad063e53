"""pytest-benchmark helpers for the suites in this directory (bench_*.py).

pytest-benchmark times with the host clock, so a CUDA call must be synchronized inside the timed
function or the number is the launch time only. ``cuda_timed(fn)`` wraps ``fn`` that way (and is
the identity on a CPU); the ``gpu_benchmark`` fixture runs ``benchmark.pedantic`` with warm-up
rounds on such a wrapped function and records the CUDA-event median of
fusedformer.bench.timing.time_gpu (L2 flushed) in ``benchmark.extra_info["cuda_ms"]``, which is
the figure to quote. Run: ``pytest benchmarks --benchmark-only``.
"""

import os

import pytest
import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    # as in tests/: triton kernels run interpreted on a CPU (checks only, never timings)
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")


def cuda_timed(fn):
    """``fn`` followed by torch.cuda.synchronize() when a GPU is present, so a host clock sees the
    device work."""
    if not HAS_GPU:
        return fn

    def synced(*args, **kwargs):
        out = fn(*args, **kwargs)
        torch.cuda.synchronize()
        return out

    return synced


@pytest.fixture
def gpu_benchmark(benchmark):
    """benchmark.pedantic(fn) with warm-up on a synchronized ``fn``, plus the CUDA-event median."""

    def run(fn, rounds=20, warmup_rounds=5):
        if HAS_GPU:
            from fusedformer.bench.timing import time_gpu

            benchmark.extra_info["cuda_ms"] = time_gpu(fn)
        return benchmark.pedantic(cuda_timed(fn), rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)

    return run

"""Timers. GPU: CUDA-event medians from triton.testing.do_bench (warm-up, L2 flushed before each
rep), or the same loop written out when triton is missing. CPU: time.perf_counter medians.
Host overhead: wall time per call of a launch loop with the synchronize outside the clock."""

import statistics
import time

import torch

L2_FLUSH_BYTES = 256 * 1024 * 1024  # larger than any current GPU's L2


def _event_loop(fn, warmup_ms, rep_ms):
    """triton.testing.do_bench's method: warm up, flush L2 by zeroing a large buffer, time one
    call between CUDA events, take the median."""
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device="cuda")
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate = max(start.elapsed_time(end) / 5, 1e-3)
    for _ in range(max(1, int(warmup_ms / estimate))):
        fn()
    times = []
    for _ in range(max(5, int(rep_ms / estimate))):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        times.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in times)


def time_gpu(fn, warmup_ms=25, rep_ms=100):
    """Median milliseconds of ``fn()`` on the current CUDA device."""
    try:
        from triton.testing import do_bench
    except ImportError:
        return _event_loop(fn, warmup_ms, rep_ms)
    return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def time_cpu(fn, min_reps=3, max_reps=50, budget_s=0.5):
    """Median milliseconds of ``fn()`` on the CPU: two warm-up calls, then repetitions until
    ``budget_s`` is spent (at least ``min_reps``)."""
    fn()
    fn()
    times = []
    t_end = time.perf_counter() + budget_s
    while len(times) < min_reps or (len(times) < max_reps and time.perf_counter() < t_end):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def host_us_per_call(fn, calls=20, repeats=3):
    """CPU time per call in microseconds, the device work excluded: ``calls`` calls are queued back
    to back and the clock stops before the synchronize (CUDA launches are asynchronous, so this is
    dispatch + launch overhead). Meaningful on CUDA only."""
    fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - t0) / calls * 1e6)
        torch.cuda.synchronize()
    return statistics.median(samples)


def peak_mb(fn):
    """Peak CUDA memory of one ``fn()`` call above what was allocated before it, in MiB."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20

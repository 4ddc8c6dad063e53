"""Timers; each gives the median, the interquartile range and the number of timed samples (a
median means little without its spread). GPU: CUDA events around single calls, after a
warm-up, with L2 flushed before each (triton.testing.do_bench's method, written out so every
triton version gives the samples). CPU: torch.utils.benchmark's blocked_autorange. Host
overhead: wall time per call of a launch loop with the synchronize outside the clock."""

import dataclasses
import statistics
import time

import torch

L2_FLUSH_BYTES = 256 * 1024 * 1024  # larger than any current GPU's L2


@dataclasses.dataclass(frozen=True)
class Timing:
    """``median_ms`` and ``iqr_ms`` (75th - 25th percentile, interpolated as numpy and
    torch.utils.benchmark do) of ``reps`` timed samples."""

    median_ms: float
    iqr_ms: float
    reps: int

    @classmethod
    def of(cls, samples_ms):
        if len(samples_ms) == 1:
            return cls(samples_ms[0], 0.0, 1)
        q1, _, q3 = statistics.quantiles(samples_ms, n=4, method="inclusive")
        return cls(statistics.median(samples_ms), q3 - q1, len(samples_ms))


def gpu_timing(fn, warmup_ms=25, rep_ms=100):
    """``fn()`` on the current CUDA device: warm up, then time single calls between CUDA events,
    each after zeroing a buffer larger than L2, for about ``rep_ms`` (at least 5 samples)."""
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
    events = []
    for _ in range(max(5, int(rep_ms / estimate))):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    return Timing.of([s.elapsed_time(e) for s, e in events])


def cpu_timing(fn, budget_s=0.5):
    """``fn()`` on the CPU through torch.utils.benchmark.Timer.blocked_autorange: blocks of calls
    sized to the timer's resolution for about ``budget_s``; each sample is a block's time per call."""
    from torch.utils import benchmark

    fn()  # warm-up: first-call allocations and lazy initialisation stay out of the samples
    measured = benchmark.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=budget_s)
    return Timing.of([t * 1e3 for t in measured.times])


def timing(device, fn, cpu_budget_s=0.5):
    """gpu_timing on a CUDA device, cpu_timing elsewhere."""
    return gpu_timing(fn) if torch.device(device).type == "cuda" else cpu_timing(fn, cpu_budget_s)


def time_gpu(fn, warmup_ms=25, rep_ms=100):
    """Median milliseconds of ``fn()`` on the current CUDA device (gpu_timing's median)."""
    return gpu_timing(fn, warmup_ms, rep_ms).median_ms


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

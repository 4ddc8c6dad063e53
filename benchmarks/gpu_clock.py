"""Host and device time of a loop of op calls on a GPU, apart (bench_overhead.py's GPU mode)."""

import time

import torch


class GpuClock:
    """Host and device time of ``fn(calls)`` on a GPU (see the module docstring): a sleep kernel
    holds the GPU for three times the loop's host time (measured once per candidate beforehand),
    so the host never waits on it; the device time is None when the loop outlasted the sleep
    anyway (the kernels then waited for the host, and the events would time the host)."""

    def __init__(self, fns, calls):
        self.calls = calls
        self.cycles_per_s = self._calibrate()
        self.host_estimate = {}
        for key, fn in fns.items():
            fn(3)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn(calls)
            self.host_estimate[key] = time.perf_counter() - t0
            torch.cuda.synchronize()

    @staticmethod
    def _calibrate():
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        cycles = 10_000_000
        torch.cuda._sleep(cycles)  # the first launch loads the kernel
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        end.synchronize()
        return cycles / (start.elapsed_time(end) / 1e3)

    def time(self, key, fn):
        sleep_s = max(3 * self.host_estimate[key], 1e-3)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        torch.cuda._sleep(int(sleep_s * self.cycles_per_s))
        start.record()
        t0 = time.perf_counter()
        fn(self.calls)
        host_s = time.perf_counter() - t0
        end.record()
        end.synchronize()
        return host_s, start.elapsed_time(end) / 1e3 if host_s < sleep_s else None

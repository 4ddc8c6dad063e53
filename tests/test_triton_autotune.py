"""kernels/_autotune.py: the on-disk tuning cache works for configs that carry a pre_hook (the
GEMM's TMA block shapes), and nothing is tuned under CUDA graph capture."""

import pytest
import torch

triton = pytest.importorskip("triton")

import triton.language as tl  # noqa: E402
from fusedformer.kernels import _autotune, matmul_act  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import autotuner  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402


def _store_block(Out, n, BLOCK: tl.constexpr):
    """Writes its BLOCK: which config ran is visible in the output."""
    offs = tl.arange(0, BLOCK)
    tl.store(Out + offs, offs * 0 + BLOCK, mask=offs < n)


def _hook(nargs):
    nargs["Out"].hooked = nargs["BLOCK"]


CONFIGS = [triton.Config({"BLOCK": 16}, pre_hook=_hook), triton.Config({"BLOCK": 32}, pre_hook=_hook)]


def _keep_all(configs, named_args, **meta):
    return configs


class _Target:
    """triton's driver, as far as the disk cache asks it (there is no GPU here)."""

    @staticmethod
    def get_current_target():
        return GPUTarget("cuda", 90, 32)


def test_disk_cache_is_read_back_for_configs_with_a_pre_hook(tmp_path, monkeypatch):
    """A second tuner (a new process, as far as the cache knows) reads the first one's timings from
    disk instead of benchmarking, and runs the hooked config object of its own list."""
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(autotuner, "driver", type("Driver", (), {"active": _Target}))
    fn = JITFunction(_store_block)  # a compiled-kernel object: the cache key hashes its source
    benches = []

    def tuner_and_bench():
        tuner = _autotune.Autotuner(fn, CONFIGS, ["n"], _keep_all, _autotune.smallest)

        def bench():  # what Autotuner.run's benchmark() leaves behind: BLOCK 32 won
            benches.append(1)
            tuner.configs_timings = {CONFIGS[0]: [2.0, 2.0, 2.0], CONFIGS[1]: [1.0, 1.0, 1.0]}
            tuner.cache[key] = CONFIGS[1]

        return tuner, bench

    key = (1000, "torch.float32")
    first, bench = tuner_and_bench()
    assert not first.check_disk_cache(key, CONFIGS, bench)
    second, bench = tuner_and_bench()
    assert second.check_disk_cache(key, CONFIGS, bench)
    assert len(benches) == 1 and second.cache[key] is CONFIGS[1] and second.cache[key].pre_hook is _hook


def test_the_gemm_tunes_through_the_disk_cached_autotuner():
    assert isinstance(matmul_act._tuned_kernel, _autotune.Autotuner)
    assert all(c.pre_hook is not None for c in matmul_act._tuned_kernel.configs)  # the case triton skipped


def test_no_tuning_under_graph_capture(monkeypatch):
    """Under capture an untuned key runs the fallback config without benchmarking (and without
    caching it); a key tuned before runs its tuned config."""
    kernel = triton.jit(_store_block)
    tuner = _autotune.Autotuner(kernel, CONFIGS, ["n"], _keep_all, lambda pruned: pruned[1])
    monkeypatch.setattr(_autotune, "capturing", lambda: True)
    monkeypatch.setattr(type(tuner), "do_bench", property(lambda self: pytest.fail("benchmarked under capture")))
    out = torch.zeros(40, dtype=torch.int32)
    tuner[(1,)](out, 40)
    assert (out[:32] == 32).all() and out.hooked == 32 and not tuner.cache
    tuner.cache[tuner.tuning_key((out, 40), {})] = CONFIGS[0]
    tuner[(1,)](out, 40)
    assert (out[:16] == 16).all() and out.hooked == 16

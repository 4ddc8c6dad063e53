"""triton.autotune with two guarantees that triton 3.6's Autotuner lacks, and the device limits
the kernels' prune rules fit their tiles into.

1. The on-disk cache (``cache_results``) works for configs that carry a ``pre_hook``. Triton skips
   its disk cache whenever any config has one (a hook cannot be serialized), so every process
   retuned. Our hooks only derive launch state from the config's own kwargs (e.g. TMA block
   shapes), so a config's kwargs identify it: timings are written without the hook and read back
   onto the hooked config.
2. Nothing is tuned during CUDA graph capture: benchmarking launches the kernel many times and
   synchronizes, which breaks stream capture. Under capture a key tuned before runs its tuned
   config; an untuned key runs the kernel family's ``fallback`` (a config that fits every shape
   the prune rule lets through), without caching it, so the first call outside capture still tunes.
   Warm the shapes up before capturing to get tuned configs in the graph.
"""


import torch
import triton
from fusedformer.kernels import _device
from triton.runtime import autotuner

SMEM_SM90 = 227 * 1024  # opt-in shared memory per block: what the prune rules fit tiles into
SMEM_SM80 = 163 * 1024


def smem_limit(device):
    """Opt-in shared memory per block of ``device`` (sm_90's when it is not a CUDA device)."""
    if device.type != "cuda":
        return SMEM_SM90
    return _device.properties(device).shared_memory_per_block_optin


def capturing():
    """True while the current CUDA stream is being captured into a graph."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _unhooked(config):
    return triton.Config(dict(config.kwargs), num_warps=config.num_warps, num_stages=config.num_stages,
                         num_ctas=config.num_ctas, maxnreg=config.maxnreg, ir_override=config.ir_override)


class Autotuner(autotuner.Autotuner):
    def __init__(self, fn, configs, key, prune, fallback, cache_results=True):
        super().__init__(fn, fn.arg_names, configs, key, reset_to_zero=None, restore_value=None,
                         prune_configs_by={"early_config_prune": prune}, cache_results=cache_results)
        self.prune = prune
        self.fallback = fallback

    def tuning_key(self, args, kwargs):
        """The cache key triton's Autotuner.run builds: the key arguments, then every tensor's dtype."""
        named = {k: v for k, v in {**dict(zip(self.arg_names, args)), **kwargs}.items() if k in self.arg_names}
        key = [named[k] for k in self.keys if k in named]
        key += [str(a.dtype) for a in named.values() if hasattr(a, "dtype")]
        return tuple(key)

    def run(self, *args, **kwargs):
        if len(self.configs) == 1 or not capturing():
            return super().run(*args, **kwargs)
        self.nargs = dict(zip(self.arg_names, args))
        config = self.cache.get(self.tuning_key(args, kwargs)) or self.fallback(self.prune_configs(kwargs))
        if config.pre_hook is not None:
            config.pre_hook({**self.nargs, **kwargs, **config.all_kwargs()})
        self.nargs = None
        return self.fn.run(*args, **kwargs, **config.all_kwargs())

    def check_disk_cache(self, tuning_key, configs, bench_fn):
        bare = {config: _unhooked(config) for config in configs}
        hooked = {str(b): config for config, b in bare.items()}  # str(Config) leaves the hook out

        def bench_then_unhook():
            bench_fn()
            self.configs_timings = {bare[c]: t for c, t in self.configs_timings.items()}

        hit = super().check_disk_cache(tuning_key, list(bare.values()), bench_then_unhook)
        self.configs_timings = {hooked[str(c)]: t for c, t in self.configs_timings.items()}
        self.cache[tuning_key] = hooked[str(self.cache[tuning_key])]
        return hit


def smallest(configs):
    """The config with the smallest BLOCK_M x BLOCK_N tile: the fallback that fits every shape its
    family's prune rule lets through."""
    return min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])


def autotune(configs, key, prune, fallback, cache_results=True):
    """Decorator: ``Autotuner`` over a jitted kernel. ``prune(configs, named_args, **meta)`` is the
    kernel family's early_config_prune rule; ``fallback(pruned)`` picks the config to run untuned
    under graph capture."""
    return lambda fn: Autotuner(fn, configs, key, prune, fallback, cache_results)

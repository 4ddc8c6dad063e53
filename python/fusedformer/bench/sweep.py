"""The sweep: ops x shapes x providers x dtypes x passes, every competitor timed in the same run
beside the device's ceilings. A provider that cannot run a shape (unsupported, out of memory,
an exception) becomes a skipped row with the reason; the sweep goes on."""

import datetime
import platform
import sys
import time

import torch

import fusedformer as ff
from fusedformer.bench import ceilings as ceilings_mod
from fusedformer.bench.cases import OPS
from fusedformer.bench.providers import PROVIDERS
from fusedformer.bench.timing import host_us_per_call, peak_mb, timing

PASSES = ("fwd", "bwd", "fwd+bwd")
# preset -> (shape list per device kind, passes). "headline" is the GPU check's priority sweep:
# the shapes and competitors the README's performance table quotes (each op file's
# PRESET_PROVIDERS narrows the providers, so it fits the check's time budget).
PRESETS = {
    "tiny": ({"cuda": "tiny", "cpu": "tiny"}, ("fwd", "fwd+bwd")),
    "quick": ({"cuda": "quick", "cpu": "cpu"}, ("fwd", "fwd+bwd")),
    "headline": ({"cuda": "headline", "cpu": "cpu"}, ("fwd", "fwd+bwd")),
    "full": ({"cuda": "full", "cpu": "cpu"}, PASSES),
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class Progress:
    """tqdm when importable, else a one-line bar on stderr."""

    def __init__(self, total, enabled=True):
        self.total, self.n, self.enabled, self.bar = total, 0, enabled, None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="case", file=sys.stderr, dynamic_ncols=True)
            except ImportError:
                self.bar = None

    def update(self, label):
        self.n += 1
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_description(label[:60])
            self.bar.update(1)
            return
        width = 30
        done = width * self.n // max(self.total, 1)
        sys.stderr.write(f"\r[{'#' * done}{'.' * (width - done)}] {self.n}/{self.total} {label[:60]:<60}")
        if self.n == self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    def close(self):
        if self.bar is not None:
            self.bar.close()


def device_name(device):
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu ({platform.processor() or platform.machine()}) — CPU figures, torch.utils.benchmark medians"


def versions():
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    return {"torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
            "fusedformer": ff.__version__}


def _short(exc):
    text = str(exc).strip().splitlines()
    return f"{exc.__class__.__name__}: {text[0][:200] if text else ''}".rstrip(": ")


def _reason_from_unavailable(exc, provider):
    """fusedformer's BackendUnavailableError lists every backend: keep the requested one's line."""
    backend = provider.split("-", 1)[1]
    lines = [ln.strip() for ln in str(exc).splitlines()]
    mine = [ln for ln in lines[1:] if ln.startswith(backend + " ")]
    return mine[0] if mine else _short(exc)


def _callables(fn, inputs, static, diff, pass_):
    """The zero-argument callable timed for ``pass_``: fwd runs without autograd (inference);
    bwd differentiates a stored forward (retain_graph); fwd+bwd does both."""
    if pass_ == "fwd":
        def call():
            with torch.no_grad():
                return fn(*inputs, **static)
        return call
    leaves = [t.detach().requires_grad_(i in diff) for i, t in enumerate(inputs)]
    wrt = [leaves[i] for i in diff]
    out = fn(*leaves, **static)
    grad_out = torch.randn_like(out)
    if pass_ == "bwd":
        return lambda: torch.autograd.grad(out, wrt, grad_out, retain_graph=True)
    return lambda: torch.autograd.grad(fn(*leaves, **static), wrt, grad_out)


def measure(op, provider, fn, shape, dtype, pass_, device, ceilings, cpu_budget_s=0.5):
    """One result row (timed), or raise: the caller turns the exception into a skipped row."""
    mod = OPS[op]
    inputs, static, diff = mod.make(shape, dtype, device)
    call = _callables(fn, inputs, static, diff, pass_)
    cuda = torch.device(device).type == "cuda"
    measured = timing(device, call, cpu_budget_s)
    ms = measured.median_ms
    flops, nbytes = mod.work(shape, pass_, dtype)
    row = _row(op, provider, dtype, pass_, shape)
    row.update(ms=ms, iqr_ms=measured.iqr_ms, reps=measured.reps)
    if flops is not None:
        row["tflops"] = flops / ms / 1e9
        ceiling = ceilings.get("matmul_bf16_tflops")
        row["frac_of_ceiling"] = row["tflops"] / ceiling if ceiling else None
    else:
        row["gbps"] = nbytes / ms / 1e6
        ceiling = ceilings.get("copy_gbps")
        row["frac_of_ceiling"] = row["gbps"] / ceiling if ceiling else None
    if cuda:
        row["host_us"] = host_us_per_call(call)
        row["peak_mb"] = peak_mb(call)
    return row


def _row(op, provider, dtype, pass_, shape):
    return {"op": op, "provider": provider, "dtype": str(dtype).replace("torch.", ""), "pass": pass_,
            "shape": dict(shape), "ms": None, "iqr_ms": None, "reps": None, "tflops": None, "gbps": None,
            "frac_of_ceiling": None,
            "host_us": None, "peak_mb": None, "skipped": None}


def run(ops=None, preset="quick", dtypes=None, device=None, providers=None, passes=None, max_seconds=None,
        progress=True, extra_providers=None, cpu_budget_s=None, ceilings=None, on_row=None):
    """The sweep as a results document (docs/results-format.md, kind "bench").

    ``providers`` limits the providers by name; ``extra_providers`` {op: {name: fn}} adds
    callables (tests use it to inject a broken one). ``max_seconds`` bounds the run, shared fairly
    between the ops: what is left when it runs out becomes skipped rows saying so.
    ``cpu_budget_s``: seconds of repetitions per CPU timing (default 0.5, 0.02 for tiny).
    ``ceilings``: already measured on this device (else measured here); ``on_row(row)`` sees each
    row as soon as it exists (the GPU check streams them to disk, so a kill loses nothing done)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    kind = torch.device(device).type
    if preset not in PRESETS:
        raise ValueError(f"bench: unknown preset {preset!r}; choose one of {tuple(PRESETS)}")
    shape_key, preset_passes = PRESETS[preset]
    shape_key = shape_key["cuda" if kind == "cuda" else "cpu"]
    passes = tuple(passes or preset_passes)
    for p in passes:
        if p not in PASSES:
            raise ValueError(f"bench: unknown pass {p!r}; choose from {PASSES}")
    dtypes = tuple(dtypes or (("bfloat16",) if kind == "cuda" else ("float32",)))
    for d in dtypes:
        if d not in DTYPES:
            raise ValueError(f"bench: unknown dtype {d!r}; choose from {tuple(DTYPES)}")
    ops = tuple(ops or OPS)
    for op in ops:
        if op not in OPS:
            raise ValueError(f"bench: unknown op {op!r}; choose from {tuple(OPS)}")
    if providers:
        for p in providers:
            if p not in PROVIDERS:
                raise ValueError(f"bench: unknown provider {p!r}; choose from {PROVIDERS}")

    cpu_budget = cpu_budget_s if cpu_budget_s is not None else (0.02 if preset == "tiny" else 0.5)
    ceilings = ceilings if ceilings is not None else ceilings_mod.measure(device)
    plan, skipped_providers = [], {}
    for op in ops:
        mod = OPS[op]
        preset_providers = getattr(mod, "PRESET_PROVIDERS", {}).get(preset)
        for shape in mod.SHAPES[shape_key]:
            provs = mod.providers(device, shape)
            provs.update((extra_providers or {}).get(op, {}))
            for name, fn in provs.items():
                if (providers and name not in providers) or (preset_providers and name not in preset_providers):
                    continue
                if isinstance(fn, str):  # cannot run on this device at all: listed once, not per row
                    skipped_providers.setdefault(op, {})[name] = fn
                    continue
                for dtype in dtypes:
                    for pass_ in passes:
                        plan.append((op, name, fn, shape, DTYPES[dtype], pass_))

    rows, bar = [], Progress(len(plan), progress)
    # the budget is shared by the cases planned: each op may use the time left times its share of the
    # cases left, so one slow op (attention compiling) cannot starve the others, and an op with many
    # cases is not squeezed into an op with few's time; what an op leaves unused carries over
    t_start, t_end, current_op = time.monotonic(), None, None
    for i, (op, name, fn, shape, dtype, pass_) in enumerate(plan):
        bar.update(f"{op} {name} {pass_}")
        if max_seconds is not None and op != current_op:
            current_op = op
            mine = sum(p[0] == op for p in plan[i:])
            now = time.monotonic()
            t_end = now + max(0.0, t_start + max_seconds - now) * mine / (len(plan) - i)
        if t_end is not None and time.monotonic() >= t_end:
            row = _row(op, name, dtype, pass_, shape)
            row["skipped"] = f"time budget exhausted (--max-seconds {max_seconds})"
        else:
            try:
                row = measure(op, name, fn, shape, dtype, pass_, device, ceilings, cpu_budget)
            except Exception as exc:  # unsupported shape, OOM, a library's own error: a skipped row
                row = _row(op, name, dtype, pass_, shape)
                if isinstance(exc, ff.BackendUnavailableError):
                    row["skipped"] = _reason_from_unavailable(exc, name)
                elif isinstance(exc, torch.cuda.OutOfMemoryError):
                    row["skipped"] = "out of memory"
                else:
                    row["skipped"] = _short(exc)
            finally:
                if kind == "cuda":
                    torch.cuda.empty_cache()
        rows.append(row)
        if on_row is not None:
            on_row(row)
    bar.close()
    return {"kind": "bench", "device": device_name(device), "date": datetime.date.today().isoformat(),
            "versions": versions(), "ceilings": ceilings, "preset": preset,
            "skipped_providers": skipped_providers, "rows": rows}

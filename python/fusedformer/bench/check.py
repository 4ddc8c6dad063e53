"""The GPU check's measuring steps (benchmarks/gpu_check.py runs each as its own process and kills it
at its cap). Each step appends JSON lines to ``--out`` as it goes, so a kill loses only the case in
flight, and stops by itself when ``--seconds`` run out, listing what it did not reach:

    python -m fusedformer.bench.check parity --out F.jsonl [--seconds S] [--op OP]...
    python -m fusedformer.bench.check bench --preset headline --out F.jsonl [--seconds S] [--op OP]...
    python -m fusedformer.bench.check e2e --script benchmarks/bench_e2e.py --out F.jsonl [--seconds S]

Lines: {"header": {device, versions, ceilings?, preset?}}, then {"parity": row}, {"agreement": row},
{"bench": row} and {"skipped_providers": {op: {provider: reason}}}.

Under the Triton interpreter (a CPU) the kernel layer corrects the interpreter's own bf16 bugs
itself (fusedformer.kernels._interpreter), so the parity rows judge the kernels.
"""

import argparse
import importlib.util
import json
import sys
import time

import torch

from fusedformer import backends
from fusedformer import parity as harness
from fusedformer.bench import ceilings as ceilings_mod
from fusedformer.bench import sweep

# the reference too: on a GPU its low-precision rows check torch's own ops there, and it anchors the
# cross-backend agreement
PARITY_BACKENDS = backends.BACKENDS
PARITY_DTYPES = ("float32", "float16", "bfloat16")
E2E_OP, E2E_PROVIDERS = "e2e-gpt2-train", ("torch-eager", "fusedformer-triton", "fusedformer-cuda")
OUT_OF_TIME = "not run: the check's time for this step ran out"


class Lines:
    """An append-only JSON-lines file, flushed per line."""

    def __init__(self, path):
        self.file = open(path, "a")  # noqa: SIM115 (open for the life of the step)

    def write(self, key, value):
        self.file.write(json.dumps({key: value}) + "\n")
        self.file.flush()


def breadth_first(cases):
    """The cases reordered so every op comes once before any op comes twice: a step cut short still
    covers every op."""
    by_op = {}
    for case in cases:
        by_op.setdefault(case.op, []).append(case)
    rounds = max(map(len, by_op.values()), default=0)
    return [group[i] for i in range(rounds) for group in by_op.values() if i < len(group)]


def parity(out, seconds, ops=None):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cases = [c for c in breadth_first(harness.default_cases(quick=True)) if not ops or c.op in ops]
    header = harness.envelope([], device)
    out.write("header", {k: header[k] for k in ("device", "versions")})
    t_end, failed = time.monotonic() + seconds, 0
    for case in cases:
        if time.monotonic() >= t_end:
            rows = [r for b in PARITY_BACKENDS for d in PARITY_DTYPES
                    for r in harness._skipped_rows(case, b, harness.DTYPES[d], OUT_OF_TIME)]
            agreement = []
        else:
            result = harness.run_full(backends=PARITY_BACKENDS, dtypes=PARITY_DTYPES, device=device, cases=[case])
            rows, agreement = result["rows"], result["agreement"]
        failed += len(harness.failures(rows))
        doc = harness.envelope(rows, device, agreement)  # JSON-clean copies: inf / NaN become null
        for row in doc["rows"]:
            out.write("parity", row)
        for row in doc["agreement"]:
            out.write("agreement", row)
    return 1 if failed else 0  # as `fusedformer parity`: a row outside the 2x rule fails the step


def _header(device, ceilings, preset):
    return {"device": sweep.device_name(device), "versions": sweep.versions(), "ceilings": ceilings, "preset": preset}


def bench(out, seconds, preset, ops=None):
    t_start = time.monotonic()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ceilings = ceilings_mod.measure(device)
    out.write("header", _header(device, ceilings, preset))
    # the last measurement may start just before the end: leave it a tenth of the step
    left = max(0.0, 0.9 * seconds - (time.monotonic() - t_start))
    doc = sweep.run(ops=ops, preset=preset, device=device, max_seconds=left, progress=False, ceilings=ceilings,
                    on_row=lambda row: out.write("bench", row))
    out.write("skipped_providers", doc["skipped_providers"])
    return 0


def e2e(out, seconds, script, providers=E2E_PROVIDERS, tiny=False):
    """One patched Hugging Face model (bench_e2e.py's GPT-2-small training step, bf16, 8 x 1024
    tokens) against HF eager, its rows in the results format. ``tiny``: a 2-layer model on 2 x 16
    tokens in float32 (a CPU check of this code, nothing measured)."""
    mod = load_module("bench_e2e", script)
    t_end = time.monotonic() + 0.9 * seconds
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype, batch, seq = (torch.float32, 2, 16) if tiny else (torch.bfloat16, 8, 1024)
    ceilings = ceilings_mod.measure(device)
    out.write("header", _header(device, ceilings, "e2e"))
    for provider in providers:
        row = sweep._row(E2E_OP, provider, dtype, "fwd+bwd", {"B": batch, "L": seq})
        if time.monotonic() >= t_end:
            row["skipped"] = OUT_OF_TIME
        else:
            try:
                measured = mod.run_one(E2E_OP, provider, device, dtype, batch, seq, tiny=tiny, warmup=3, iters=10)
                peak_gb = measured.pop("peak_mem_gb")
                row.update(measured, peak_mb=peak_gb * 1024 if peak_gb is not None else None,
                           frac_of_ceiling=measured["tflops"] / ceilings["matmul_bf16_tflops"])
            except Exception as exc:  # a provider that cannot run the model is a skipped row, with why
                row["skipped"] = sweep._short(exc)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        out.write("bench", row)
    return 0


def load_module(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m fusedformer.bench.check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", choices=("parity", "bench", "e2e"))
    p.add_argument("--out", required=True, help="JSON-lines file to append to")
    p.add_argument("--seconds", type=float, default=3600.0, help="stop by itself after this long")
    p.add_argument("--op", action="append", help="only these ops (repeatable)")
    p.add_argument("--preset", default="headline", choices=tuple(sweep.PRESETS), help="bench: the sweep preset")
    p.add_argument("--script", help="e2e: the path of benchmarks/bench_e2e.py")
    args = p.parse_args(argv)
    out = Lines(args.out)
    if args.step == "parity":
        return parity(out, args.seconds, args.op)
    if args.step == "bench":
        return bench(out, args.seconds, args.preset, args.op)
    if not args.script:
        p.error("e2e needs --script")
    return e2e(out, args.seconds, args.script)


if __name__ == "__main__":
    sys.exit(main())

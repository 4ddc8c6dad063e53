"""Results files: the JSON of docs/results-format.md, its validator, Markdown tables (one per
op, dtype and pass: shapes down, providers across, each cell ms, throughput, fraction of the
ceiling and speed-up over torch eager) and PNG plots (matplotlib when importable)."""

import io
import json
import math
import os
import re

from fusedformer import backends
from fusedformer._files import write_atomic
from fusedformer.bench.providers import PROVIDERS

# "check": the GPU check's one file (benchmarks/gpu_check.py), bench rows in "rows" and parity rows
# in "parity_rows"
KINDS = ("bench", "parity", "check")
PASSES = ("fwd", "bwd", "fwd+bwd")
DTYPE_NAMES = ("float32", "float16", "bfloat16", "float64")
# the end-to-end model benchmarks (benchmarks/bench_e2e.py) beside the ops
E2E_OPS = ("e2e-gpt2-train", "e2e-bert-infer")
OP_NAMES = ("attention", "softmax", "layer_norm", "rms_norm", "linear_act", "feed_forward", *E2E_OPS)
BACKEND_NAMES = backends.BACKENDS


def _is_num(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _num_or_none(x):
    return x is None or _is_num(x)


def validate_results(doc):
    """Check ``doc`` (a dict, or a path to a JSON file) against docs/results-format.md; return
    the dict, or raise ValueError listing every problem."""
    if isinstance(doc, (str, os.PathLike)):
        with open(doc) as f:
            doc = json.load(f)
    problems = []
    if not isinstance(doc, dict):
        raise ValueError(f"results: expected a JSON object, got {type(doc).__name__}")
    kind = doc.get("kind")
    if kind not in KINDS:
        problems.append(f"kind is {kind!r}, expected one of {KINDS}")
    if not isinstance(doc.get("device"), str) or not doc.get("device"):
        problems.append("device must be a non-empty string")
    if not isinstance(doc.get("date"), str) or not re.fullmatch(r"\d{4}-\d{2}-\d{2}", doc.get("date", "")):
        problems.append(f"date must be YYYY-MM-DD, got {doc.get('date')!r}")
    vers = doc.get("versions")
    if not isinstance(vers, dict) or not all(k in vers for k in ("torch", "triton", "cuda")):
        problems.append("versions must be an object with torch, triton and cuda")
    if kind in ("bench", "check"):
        ceil = doc.get("ceilings")
        if not isinstance(ceil, dict) or not all(_num_or_none(ceil.get(k, "missing")) for k in
                                                 ("copy_gbps", "matmul_bf16_tflops")):
            problems.append("ceilings must hold copy_gbps and matmul_bf16_tflops (numbers)")
    row_lists = {"bench": {"rows": _bench_row_problems}, "parity": {"rows": _parity_row_problems},
                 "check": {"rows": _bench_row_problems, "parity_rows": _parity_row_problems}}
    for key, row_problems in row_lists.get(kind, {"rows": lambda r, where, skipped: []}).items():
        problems += _rows_problems(doc.get(key), key, row_problems)
    if problems:
        raise ValueError("results do not match docs/results-format.md:\n  " + "\n  ".join(problems))
    return doc


def _rows_problems(rows, key, row_problems):
    if not isinstance(rows, list):
        return [f"{key} must be a list"]
    problems = []
    for i, r in enumerate(rows):
        where = f"{key}[{i}]"
        if not isinstance(r, dict):
            problems.append(f"{where} is not an object")
            continue
        if r.get("op") not in OP_NAMES:
            problems.append(f"{where}.op {r.get('op')!r} is not one of {OP_NAMES}")
        if r.get("dtype") not in DTYPE_NAMES:
            problems.append(f"{where}.dtype {r.get('dtype')!r} is not one of {DTYPE_NAMES}")
        if not isinstance(r.get("shape"), dict):
            problems.append(f"{where}.shape must be an object")
        skipped = r.get("skipped")
        if skipped is not None and not isinstance(skipped, str):
            problems.append(f"{where}.skipped must be a reason string or null")
        problems += row_problems(r, where, skipped)
    return problems


def _bench_row_problems(r, where, skipped):
    out = []
    if r.get("provider") not in PROVIDERS:
        out.append(f"{where}.provider {r.get('provider')!r} is not one of {PROVIDERS}")
    if r.get("pass") not in PASSES:
        out.append(f"{where}.pass {r.get('pass')!r} is not one of {PASSES}")
    for key in ("ms", "tflops", "gbps", "frac_of_ceiling"):
        if key not in r:
            out.append(f"{where} has no {key}")
        elif not _num_or_none(r[key]):
            out.append(f"{where}.{key} must be a finite number or null")
    for key in ("iqr_ms", "reps"):  # the spread beside the median (optional: e2e rows have none)
        if not _num_or_none(r.get(key)):
            out.append(f"{where}.{key} must be a finite number or null")
    if skipped is None:
        if not (_is_num(r.get("ms")) and r["ms"] > 0):
            out.append(f"{where}.ms must be > 0 for a row that ran")
        if (r.get("tflops") is None) == (r.get("gbps") is None):
            out.append(f"{where} must give exactly one of tflops and gbps")
    elif r.get("ms") is not None:
        out.append(f"{where} is skipped but has a time")
    return out


def _parity_row_problems(r, where, skipped):
    out = []
    if r.get("backend") not in BACKEND_NAMES:
        out.append(f"{where}.backend {r.get('backend')!r} is not one of {BACKEND_NAMES}")
    for key in ("err", "torch_err", "ratio", "ok"):
        if key not in r:
            out.append(f"{where} has no {key}")
    if skipped is None:
        if not isinstance(r.get("ok"), bool):
            out.append(f"{where}.ok must be true or false")
        if not _num_or_none(r.get("torch_err")) or r.get("torch_err") is None:
            out.append(f"{where}.torch_err must be a finite number")
        if not _num_or_none(r.get("err")) and r.get("ok") is not False:
            out.append(f"{where}.err is not finite but the row passes")
    elif r.get("ok") is not None:
        out.append(f"{where} is skipped but has ok={r.get('ok')!r}")
    return out


# --------------------------------------------------------------------------------------------
# Markdown and plots
# --------------------------------------------------------------------------------------------


def shape_label(shape):
    return " ".join(f"{k}={v}" for k, v in shape.items())


def _groups(rows):
    """{(op, dtype, pass): rows}, in first-seen order."""
    groups = {}
    for r in rows:
        groups.setdefault((r["op"], r["dtype"], r["pass"]), []).append(r)
    return groups


ABOVE_CEILING = "⚠"
ABOVE_CEILING_NOTE = (f"{ABOVE_CEILING} above 100% of the ceiling measured in this run: not a speed the device can "
                      "reach, so the ceiling, the case's FLOP/byte count or the timing is wrong for it (e.g. data "
                      "served from cache); do not quote it.")


def above_ceiling(r):
    return r.get("frac_of_ceiling") is not None and r["frac_of_ceiling"] > 1.0


def _cell(r, eager_ms):
    if r["skipped"]:
        return "skipped"
    thr = f"{r['tflops']:.3g} TFLOP/s" if r["tflops"] is not None else f"{r['gbps']:.3g} GB/s"
    spread = f" (IQR {r['iqr_ms']:.2g}, n={r['reps']})" if r.get("iqr_ms") is not None else ""
    parts = [f"{r['ms']:.4g} ms{spread}", thr]
    if r["frac_of_ceiling"] is not None:
        parts.append(f"{100 * r['frac_of_ceiling']:.3g}%" + (f" {ABOVE_CEILING}" if above_ceiling(r) else ""))
    if eager_ms:
        parts.append(f"{eager_ms / r['ms']:.2f}x")
    return " · ".join(parts)


def markdown(doc):
    """The results as Markdown: header (device, versions, ceilings), then per op/dtype/pass a
    table of shapes x providers, host time per call, and the skipped list with reasons."""
    cpu = doc["device"].startswith("cpu")
    c = doc["ceilings"]
    lines = [f"# fusedformer bench — {doc['device']} — {doc['date']}", ""]
    if cpu:
        lines += ["**CPU figures**: no CUDA GPU was visible; times are `torch.utils.benchmark` medians of the "
                  "reference backend and torch eager on the CPU, not GPU kernel timings.", ""]
    lines.append("Versions: " + ", ".join(f"{k} {v}" for k, v in doc["versions"].items()))
    lines.append("")
    lines.append(f"Ceilings measured in this run: copy {c['copy_gbps']:.4g} GB/s (device-to-device copy of a "
                 f"large tensor), matmul {c['matmul_bf16_tflops']:.4g} TFLOP/s (bf16 through torch).")
    lines.append("")
    lines.append("Each cell: median time (interquartile range, timed samples) · throughput · fraction of the "
                 "ceiling (copy for memory-bound ops, matmul for compute-bound) · speed-up over torch-eager "
                 "(>1 is faster).")
    if any(above_ceiling(r) for r in doc["rows"]):
        lines += ["", ABOVE_CEILING_NOTE]
    skipped = []
    for (op, dtype, pass_), rows in _groups(doc["rows"]).items():
        provs = [p for p in PROVIDERS if any(r["provider"] == p for r in rows)]
        shapes = []
        for r in rows:
            if r["shape"] not in shapes:
                shapes.append(r["shape"])
        lines += ["", f"## {op} · {dtype} · {pass_}", ""]
        lines.append("| shape | " + " | ".join(provs) + " |")
        lines.append("|---" * (len(provs) + 1) + "|")
        host = []
        for shape in shapes:
            by = {r["provider"]: r for r in rows if r["shape"] == shape}
            eager = by.get("torch-eager")
            eager_ms = eager["ms"] if eager and not eager["skipped"] else None
            lines.append(f"| {shape_label(shape)} | " + " | ".join(
                _cell(by[p], eager_ms) if p in by else "" for p in provs) + " |")
            if any(by[p]["host_us"] is not None for p in by):
                host.append(f"| {shape_label(shape)} | " + " | ".join(
                    f"{by[p]['host_us']:.3g}" if p in by and by[p]["host_us"] is not None else "" for p in provs)
                    + " |")
            skipped += [(op, dtype, pass_, shape, p, by[p]["skipped"]) for p in provs if p in by and by[p]["skipped"]]
        if host:
            lines += ["", "Host (CPU) time per call, µs, synchronize excluded:", "",
                      "| shape | " + " | ".join(provs) + " |", "|---" * (len(provs) + 1) + "|", *host]
    if doc.get("skipped_providers"):
        lines += ["", "## Providers not run on this device", ""]
        for op, provs in doc["skipped_providers"].items():
            for p, why in provs.items():
                lines.append(f"- {op} / {p}: {why}")
    if skipped:
        lines += ["", "## Skipped cases", ""]
        for op, dtype, pass_, shape, p, why in skipped:
            lines.append(f"- {op} · {dtype} · {pass_} · {shape_label(shape)} / {p}: {why}")
    return "\n".join(lines) + "\n"


def plots(doc, out_dir):
    """One PNG per op/dtype/pass (``figure``). Returns the files written, or a str saying why none
    were (matplotlib missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not importable: no plots"
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for (op, dtype, pass_), rows in _groups(doc["rows"]).items():
        fig = figure(doc, rows)
        path = os.path.join(out_dir, f"{op}-{dtype}-{pass_.replace('+', '_')}.png")
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=110)
        plt.close(fig)
        write_atomic(path, png.getvalue())
        written.append(path)
    return written


def figure(doc, rows):
    """The plot of one op/dtype/pass's ``rows``: throughput per shape as grouped bars, one bar per
    provider (shapes are categories, not points on an axis), the ceiling as a line, bars above it
    hatched."""
    import matplotlib.pyplot as plt

    op, dtype, pass_ = rows[0]["op"], rows[0]["dtype"], rows[0]["pass"]
    shapes = []
    for r in rows:
        if r["shape"] not in shapes:
            shapes.append(r["shape"])
    compute = any(r["tflops"] is not None for r in rows)
    provs = [p for p in PROVIDERS if any(r["provider"] == p and not r["skipped"] for r in rows)]
    width = 0.8 / max(len(provs), 1)
    fig, ax = plt.subplots(figsize=(max(6, 0.5 + len(shapes) * (0.4 + 0.25 * len(provs))), 4.5))
    for i, p in enumerate(provs):
        ran = [r for r in rows if r["provider"] == p and not r["skipped"]]
        xs = [shapes.index(r["shape"]) - 0.4 + (i + 0.5) * width for r in ran]
        bars = ax.bar(xs, [r["tflops"] if compute else r["gbps"] for r in ran], width, label=p)
        for bar, r in zip(bars, ran):
            if above_ceiling(r):
                bar.set_hatch("//")
    ax.set_xticks(range(len(shapes)))
    ax.set_xticklabels([shape_label(s).replace(" ", "\n") for s in shapes], fontsize=7)
    ax.set_ylabel("TFLOP/s" if compute else "GB/s")
    ceiling = doc["ceilings"]["matmul_bf16_tflops" if compute else "copy_gbps"]
    if ceiling:
        ax.axhline(ceiling, color="grey", linestyle="--", linewidth=1, label="ceiling (this run)")
    ax.set_yscale("log")  # small shapes sit decades below large ones; both matter
    ax.set_title(f"{op} · {dtype} · {pass_} — {doc['device'].split(' — ')[0]} — {doc['date']}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def write(doc, out_dir, stem="bench"):
    """``out_dir``/<stem>.json, <stem>.md and plots/*.png. Returns the paths (and the plot note)."""
    validate_results(doc)
    os.makedirs(out_dir, exist_ok=True)
    json_path, md_path = os.path.join(out_dir, f"{stem}.json"), os.path.join(out_dir, f"{stem}.md")
    write_atomic(json_path, json.dumps(doc, indent=1))
    write_atomic(md_path, markdown(doc))
    return {"json": json_path, "markdown": md_path, "plots": plots(doc, os.path.join(out_dir, "plots"))}


def results_name(doc):
    """benchmarks/results/ naming: <gpu-slug>-<date>, e.g. nvidia-h100-80gb-hbm3-2026-11-21."""
    device = doc["device"].split(" — ")[0]
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
    return f"{slug}-{doc['date']}"


def save_suite(suite, rows, ceilings, out_dir, markdown_fn=None):
    """A pytest-benchmark suite's rows as ``out_dir``/<suite>-<gpu>-<date>.json (and .md with
    ``markdown_fn``): docs/results-format.md's envelope, each row's fraction of the ceiling it is measured
    against (GB/s of the copy, else TFLOP/s of the bf16 matmul). Returns the document."""
    import datetime

    import torch

    from fusedformer.bench.sweep import device_name, versions

    for row in rows:
        if row.get("gbps") is not None:
            row["frac_of_ceiling"] = row["gbps"] / ceilings["copy_gbps"]
        elif row.get("tflops") is not None:
            row["frac_of_ceiling"] = row["tflops"] / ceilings["matmul_bf16_tflops"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    doc = {"kind": "bench", "device": device_name(device), "date": datetime.date.today().isoformat(),
           "versions": versions(), "ceilings": ceilings, "rows": rows}
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"{suite}-{results_name(doc)}")
    write_atomic(stem + ".json", json.dumps(doc, indent=1))
    if markdown_fn is not None:
        write_atomic(stem + ".md", markdown_fn(doc))
    return doc

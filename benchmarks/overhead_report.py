"""bench_overhead.py's summaries and reports: medians and ratios to the torch op, the results
file's Markdown, and the README's CPU table (``python benchmarks/bench_overhead.py --readme``)."""

import json
import pathlib
import statistics

ROOT = pathlib.Path(__file__).resolve().parent.parent
README_START, README_END = "<!-- cpu-table:start -->", "<!-- cpu-table:end -->"


def summary(values):
    values = [v for v in values if v == v]  # NaN: a GPU repetition without a valid device time
    if not values:
        return {"median": None, "p25": None, "p75": None, "n": 0}
    q1, median, q3 = statistics.quantiles(values, n=4) if len(values) > 1 else (values[0],) * 3
    return {"median": median, "p25": q1, "p75": q3, "n": len(values)}


def ratio_rows(samples, unit):
    """One row per (op, grad, provider) with the median and its ratio to the torch row's."""
    rows = []
    for (op, grad, provider), values in samples.items():
        s = summary(values) if isinstance(values, list) else {"median": values}
        base = samples[(op, grad, "torch")]
        base = summary(base)["median"] if isinstance(base, list) else base
        rows.append({"op": op, "grad": grad, "provider": provider, unit: s, "ratio_to_torch": s["median"] / base})
    return rows


def median_ratios(rows, provider):
    return statistics.median(r["ratio_to_torch"] for r in rows if r["provider"] == provider and not r["grad"])


def markdown(doc):
    lines = [f"# Host overhead, {doc['device']}, {doc['date']}", "", doc["method"], ""]
    wall = {(r["op"], r["grad"], r["provider"]): r for r in doc.get("ops", [])}
    cg = {(r["op"], r["grad"], r["provider"]): r for r in doc.get("callgrind", [])}
    keys = [k for k in dict.fromkeys([*wall, *cg]) if k[2] != "torch"]
    if keys:
        lines += ["| op | grad | provider | us/call (median, p25-p75) | x torch | instructions/call | x torch |",
                  "|---|---|---|---|---|---|---|"]
        for key in keys:
            t, c = wall.get(key), cg.get(key)
            us = f"{_span(t['us_per_call'])} | {t['ratio_to_torch']:.2f}" if t else "- | -"
            ins = f"{c['instructions_per_call']['median']:,.0f} | {c['ratio_to_torch']:.2f}" if c else "- | -"
            lines.append(f"| {key[0]} | {'yes' if key[1] else 'no'} | {key[2]} | {us} | {ins} |")
        lines += ["", "Median over ops of the x-torch ratio, no grad: " + "; ".join(
            f"{measure} {provider} {ratio:.2f}" for measure, by_provider in doc["summary"].items()
            for provider, ratio in by_provider.items()), ""]
    if any("device_us_per_call" in r for r in doc.get("ops", [])):
        lines += ["Per call on the GPU: host time (the CPU's work, the GPU held busy) beside device time (the "
                  "queued kernels back to back); host above device: host-bound.", "",
                  "| op | grad | provider | host us/call | device us/call |", "|---|---|---|---|---|"]
        for r in doc["ops"]:
            lines.append(f"| {r['op']} | {'yes' if r['grad'] else 'no'} | {r['provider']} | "
                         f"{_span(r['us_per_call'])} | {_span(r['device_us_per_call'])} |")
        lines.append("")
    if doc.get("models"):
        lines += ["| model | pass | provider | ms/step (median, p25-p75) | x unpatched |", "|---|---|---|---|---|"]
        for r in doc["models"]:
            t = r["ms_per_step"]
            lines.append(f"| {r['model']} | {r['pass']} | {r['provider']} | {t['median']:.1f} ({t['p25']:.1f}-"
                         f"{t['p75']:.1f}) | {r['ratio_to_torch']:.2f} |")
        lines.append("")
    if doc.get("memory"):
        lines += ["| attention fwd+bwd, B=1 H=8 D=64 | provider | peak MB above baseline | x torch |",
                  "|---|---|---|---|"]
        for r in doc["memory"]:
            lines.append(f"| L={r['L']} | {r['provider']} | {r['peak_mb']:.1f} | {r['ratio_to_torch']:.2f} |")
    return "\n".join(lines) + "\n"


def readme_table(doc, name):
    """The README's CPU table: per-call ratios to the torch op (no grad), patched models against
    unpatched, attention memory, from results file ``name``."""
    providers = [p for p in dict.fromkeys(r["provider"] for r in doc.get("callgrind", doc["ops"])) if p != "torch"]
    lines = [f"From `benchmarks/results/{name}` ({doc['method']}), written by `python "
             "benchmarks/bench_overhead.py --readme`. Per call, tiny tensors, no grad, x the torch op it "
             "replaces: instructions under callgrind (repeatable), wall time beside it (on a shared machine "
             "noisy: the results file has each figure's p25-p75 span):", "",
             "| op | " + " | ".join(f"{p} instructions | {p} wall" for p in providers) + " |",
             "|---|" + "---|---|" * len(providers)]
    by_key = {part: {(r["op"], r["grad"], r["provider"]): r for r in doc.get(part, [])}
              for part in ("callgrind", "ops")}
    for op in dict.fromkeys(r["op"] for r in doc["ops"]):
        cells = [f"{by_key[part][(op, False, p)]['ratio_to_torch']:.2f}" if (op, False, p) in by_key[part] else "-"
                 for p in providers for part in ("callgrind", "ops")]
        lines.append(f"| {op} | " + " | ".join(cells) + " |")
    lines.append("| **median** | " + " | ".join(
        f"**{doc['summary'][m][p]:.2f}**" if p in doc["summary"].get(m, {}) else "-"
        for p in providers for m in ("instructions", "wall")) + " |")
    if doc.get("models"):
        model_providers = [p for p in dict.fromkeys(r["provider"] for r in doc["models"]) if p != "unpatched"]
        lines += ["", "Patched Hugging Face models, x the unpatched model's time (median of interleaved steps):", "",
                  "| model | pass | " + " | ".join(model_providers) + " |", "|---|---|" + "---|" * len(model_providers)]
        ratio = {(r["model"], r["pass"], r["provider"]): r["ratio_to_torch"] for r in doc["models"]}
        for model, pass_ in dict.fromkeys((r["model"], r["pass"]) for r in doc["models"]):
            lines.append(f"| {model} | {pass_} | " + " | ".join(f"{ratio[(model, pass_, p)]:.2f}"
                                                             for p in model_providers) + " |")
    if doc.get("memory"):
        lines += ["", "Attention forward + backward peak memory, x torch's (B=1, H=8, D=64): " + "; ".join(
            f"L={r['L']} {r['provider']} {r['ratio_to_torch']:.2f}" for r in doc["memory"] if r["provider"] != "torch")
            + "."]
    return "\n".join(lines)


def write_readme(results=None, readme=ROOT / "README.md"):
    """Replace the README's CPU table with the one from ``results`` (default: the newest
    benchmarks/results/cpu-*-overhead.json)."""
    path = pathlib.Path(results) if results else max((ROOT / "benchmarks" / "results").glob("cpu-*-overhead.json"))
    text = pathlib.Path(readme).read_text()
    head, rest = text.split(README_START)
    _, tail = rest.split(README_END)
    table = readme_table(json.loads(path.read_text()), path.name)
    pathlib.Path(readme).write_text(f"{head}{README_START}\n{table}\n{README_END}{tail}")


def _span(summary):
    if summary["median"] is None:
        return "- (the loop outlasted the sleep)"
    return f"{summary['median']:.1f} ({summary['p25']:.1f}-{summary['p75']:.1f})"

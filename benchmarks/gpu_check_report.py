"""What the GPU check (gpu_check.py) writes under OUT, rewritten after every step so a kill leaves
them current: results.json, junit.xml and summary.md (check.log is the steps' own output).

This file is also the test steps' pytest plugin (`-p gpu_check_report`): each test's outcome is
appended to $GPU_CHECK_TESTLOG as it happens, so a pytest killed at its cap still leaves its
results, from which junit.xml is written. Standard library only: it must work when nothing of
fusedformer imports.
"""

import importlib.util
import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path


def _load_files_module():
    """fusedformer/_files.py (standard library only) loaded by path, not through the package:
    the check writes its files atomically even when fusedformer does not import."""
    path = Path(__file__).resolve().parents[1] / "python" / "fusedformer" / "_files.py"
    spec = importlib.util.spec_from_file_location("fusedformer_files", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


write_atomic = _load_files_module().write_atomic

TESTLOG_ENV = "GPU_CHECK_TESTLOG"
TEST_STEPS = ("tests-gpu", "tests-rest")
BENCH_STEPS = {"bench-headline": "headline", "bench-sweep": "full"}


# --------------------------------------------------------------------------------------------
# the test steps: plugin hooks, and junit.xml from what they logged
# --------------------------------------------------------------------------------------------


def _log_test_event(event):
    path = os.environ.get(TESTLOG_ENV)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(event) + "\n")


def pytest_runtest_logstart(nodeid, location):
    _log_test_event({"nodeid": nodeid, "when": "start"})


def pytest_runtest_logreport(report):
    if report.when == "call" or report.outcome != "passed":
        longrepr = report.longrepr
        message = str(longrepr[2]) if isinstance(longrepr, tuple) else report.longreprtext[-4000:]
        _log_test_event({"nodeid": report.nodeid, "when": report.when, "outcome": report.outcome,
                         "seconds": report.duration, "message": message})


def read_jsonl(path):
    """The complete lines of a JSON-lines file (a line cut off by a kill is dropped)."""
    rows = []
    if Path(path).exists():
        for line in Path(path).read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return rows


def test_outcomes(events, killed):
    """{nodeid: (outcome, seconds, message)}: outcome is passed, skipped, failure or error; a test
    that started and never reported was running when its step was killed (``killed``) or crashed."""
    tests = {}
    for e in events:
        outcome, seconds, message = tests.get(e["nodeid"], (None, 0.0, ""))
        if e["when"] != "start":
            seconds += e["seconds"]
            new = {"passed": "passed", "skipped": "skipped"}.get(e["outcome"],
                                                                   "failure" if e["when"] == "call" else "error")
            rank = ("passed", "skipped", "failure", "error")
            if outcome is None or rank.index(new) > rank.index(outcome):
                outcome, message = new, e["message"]
        tests[e["nodeid"]] = (outcome, seconds, message)
    why = "killed at the step's cap while this test ran" if killed else "no outcome: the test process died"
    return {k: (o or "error", s, m if o else why) for k, (o, s, m) in tests.items()}


def junit(suites):
    """junit.xml text from {suite name: test_outcomes(...)}."""
    root = ET.Element("testsuites")
    for name, tests in suites.items():
        count = {o: sum(t[0] == o for t in tests.values()) for o in ("failure", "error", "skipped")}
        suite = ET.SubElement(root, "testsuite", name=name, tests=str(len(tests)), failures=str(count["failure"]),
                              errors=str(count["error"]), skipped=str(count["skipped"]),
                              time=f"{sum(t[1] for t in tests.values()):.3f}")
        for nodeid, (outcome, seconds, message) in tests.items():
            path, _, rest = nodeid.partition("::")
            parts = rest.split("::")
            classname = ".".join([path.removesuffix(".py").replace("/", "."), *parts[:-1]])
            case = ET.SubElement(suite, "testcase", classname=classname, name=parts[-1], time=f"{seconds:.3f}")
            if outcome != "passed":
                ET.SubElement(case, outcome, message=(message.strip().splitlines() or [""])[-1][:500]).text = message
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


# --------------------------------------------------------------------------------------------
# the files under OUT
# --------------------------------------------------------------------------------------------


def results(check, date):
    """The results document (kind "check"): the bench and parity rows the workers streamed, the
    probe and the step table."""
    env = check.probe
    doc = {"kind": "check", "device": env.get("device") or "unknown (the probe did not finish)", "date": date,
           "versions": {k: env.get(k) for k in ("torch", "triton", "cuda", "fusedformer")},
           "ceilings": {"copy_gbps": None, "matmul_bf16_tflops": None}, "preset": None, "skipped_providers": {},
           "rows": [], "parity_rows": [], "agreement": [], "environment": env,
           "budget_s": check.args.seconds, "steps": check.steps}
    presets, measured = [], False
    for name in ("parity", "bench-headline", "bench-e2e", "bench-sweep"):  # the steps' order
        for line in read_jsonl(check.scratch / f"{name}.jsonl"):
            (key, value), = line.items()
            if key == "header":
                doc["versions"] = value["versions"]  # the worker's own, fusedformer's version included
                if "ceilings" in value and not measured:  # the first bench step's device label and ceilings
                    doc.update(device=value["device"], ceilings=value["ceilings"])
                    measured = True
                presets.append(value.get("preset"))
            elif key == "skipped_providers":
                for op, reasons in value.items():
                    doc["skipped_providers"].setdefault(op, {}).update(reasons)
            else:
                doc[{"bench": "rows", "parity": "parity_rows", "agreement": "agreement"}[key]].append(value)
    doc["preset"] = "+".join(p for p in presets if p) or None
    return doc


def test_suites(check):
    statuses = {s["name"]: s["status"] for s in check.steps}
    return {name: test_outcomes(read_jsonl(check.scratch / f"{name}.tests.jsonl"), statuses.get(name) == "timeout")
            for name in TEST_STEPS if (check.scratch / f"{name}.tests.jsonl").exists()}


def summary(check, doc, suites, elapsed):
    import perf_table  # beside this file

    env, a = check.probe, check.args
    cut = [s for s in check.steps if s["status"] in ("cut", "timeout")]
    lines = [f"# fusedformer GPU check — {doc['device']} — {doc['date']}", "",
             f"Budget {a.seconds:.0f} s, used {elapsed:.0f} s. "
             + ("Cut: " + ", ".join(f"{s['name']} ({s['status']}: {s['note']})" for s in cut) + "."
                if cut else "No step was cut."), "",
             "| step | status | seconds | cap | note |", "|---|---|---|---|---|"]
    lines += [f"| {s['name']} | {s['status']} | {s['seconds']:.0f} | {s['cap'] or ''} | {s['note']} |"
              for s in check.steps]
    lines += ["", "## Environment", ""] + [f"- {k}: {v}" for k, v in env.items()]
    rows = doc["parity_rows"]
    failed = [r for r in rows if r["ok"] is False]
    lines += ["", "## Parity", "", f"{sum(r['ok'] is True for r in rows)} passed, {len(failed)} failed, "
              f"{sum(r['ok'] is None for r in rows)} skipped (rows: op x backend x dtype x output)."]
    lines += [f"- FAILED {r['op']} {r['backend']} {r['dtype']} {r['output']}: err {r['err']} vs torch "
              f"{r['torch_err']} at {r['shape']}" for r in failed]
    lines += ["", "## Tests", ""]
    for name, tests in suites.items():
        count = {o: sum(t[0] == o for t in tests.values()) for o in ("passed", "failure", "error", "skipped")}
        lines.append(f"{name}: " + ", ".join(f"{n} {o}" for o, n in count.items()))
        lines += [f"- {o.upper()} {k}: {(m.strip().splitlines() or [''])[-1][:200]}"
                  for k, (o, _, m) in tests.items() if o in ("failure", "error")]
    lines += ["", "## Benchmarks", "", perf_table.tables(doc) if doc["rows"] else "No benchmark rows."]
    lines += ["", "## Next", "",
              "- rerun what failed: `python3 benchmarks/gpu_check.py --out \"$OUT\" --only STEP[,STEP] "
              "[--tests PATTERN] [--op OP] --seconds N`",
              "- keep the results: `python benchmarks/perf_table.py --add results.json` (copies it to "
              "benchmarks/results/ named by GPU and date, and regenerates the README's table)"]
    return "\n".join(lines) + "\n"


def write_files(check, out, date, elapsed):
    doc = results(check, date)
    suites = test_suites(check)
    write_atomic(out / "results.json", json.dumps(doc, indent=1))
    write_atomic(out / "junit.xml", junit(suites))
    write_atomic(out / "summary.md", summary(check, doc, suites, elapsed))

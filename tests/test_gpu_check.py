"""The GPU check (benchmarks/gpu_check.py) run on a CPU the way the device machine runs it: inside
its budget, its four files, GPU steps skipped and cut steps said; a step over its cap is killed with
its children; the test log becomes junit.xml; the step workers' rows validate; and the README's
performance table comes from perf_table.py (synthetic results, made here, never committed)."""

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
from fusedformer import backends
from fusedformer.bench import validate_results

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402
import gpu_check_report  # noqa: E402
import perf_table  # noqa: E402

DRY_RUN_SECONDS = 40


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """The check as typed on the device machine, on this CPU (no GPU visible even where there is
    one), with a small budget and the installed fusedformer."""
    out = tmp_path_factory.mktemp("gpu-check")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "GPU_CHECK_SECONDS": str(DRY_RUN_SECONDS)}
    env.pop("TRITON_INTERPRET", None)  # the check decides that itself from its probe
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--out", str(out), "--skip-build"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=DRY_RUN_SECONDS + 60)
    return out, proc, time.monotonic() - t0


def test_dry_run_ends_inside_its_budget_with_its_files(dry_run):
    out, proc, seconds = dry_run
    assert seconds <= DRY_RUN_SECONDS + 1.5, proc.stderr  # process start-up is all the slack
    names = sorted(os.listdir(out))
    assert names == sorted(gpu_check.OUT_FILES) and len(names) <= 6
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", n) for n in names)
    doc = validate_results(str(out / "results.json"))
    assert doc["kind"] == "check" and doc["budget_s"] == DRY_RUN_SECONDS
    steps = {s["name"]: s for s in doc["steps"]}
    assert list(steps) == list(gpu_check.STEP_NAMES)
    assert steps["probe"]["status"] == "ok" and doc["environment"]["gpu"] is False
    assert steps["build"] == {**steps["build"], "status": "skipped", "note": "--skip-build"}
    for step in gpu_check.STEPS:
        if step.needs_gpu:
            assert steps[step.name]["status"] == "skipped" and "no CUDA GPU" in steps[step.name]["note"]
        assert steps[step.name]["cap"] is None or steps[step.name]["seconds"] <= steps[step.name]["cap"] + 1
    assert proc.returncode == gpu_check.exit_status(doc["steps"])
    assert "no CUDA GPU visible" in doc["device"]


def test_dry_run_says_which_steps_it_cut(dry_run):
    out, _, _ = dry_run
    doc = json.loads((out / "results.json").read_text())
    cut = [s["name"] for s in doc["steps"] if s["status"] in ("cut", "timeout")]
    # whether a 40 s budget holds every step depends on the machine's speed; cut steps are named
    first_lines = (out / "summary.md").read_text().split("\n## ")[0]
    assert ("Cut: " in first_lines) == bool(cut) and all(f"{name} (" in first_lines for name in cut)
    rows = doc["parity_rows"]  # what it reached before the cap, streamed as it went
    assert rows and {r["backend"] for r in rows} <= set(backends.BACKENDS)
    assert not [r for r in rows if r["ok"] is False], "the interpreter shims are applied as in the tests"
    log = (out / "check.log").read_text()
    assert "== parity (cap" in log
    if "parity" in cut:
        assert "== parity: timeout" in log


def test_dry_run_junit(dry_run):
    out, _, _ = dry_run
    root = ET.parse(out / "junit.xml").getroot()
    assert root.tag == "testsuites"
    for suite in root:
        cases = suite.findall("testcase")
        assert int(suite.get("tests")) == len(cases)
        assert int(suite.get("skipped")) == sum(c.find("skipped") is not None for c in cases)


def _write_pids(tmp_path):
    """A step that starts a child and both sleep far past the cap; their pids land in a file."""
    pids = tmp_path / "pids"
    child = "import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; " \
            "time.sleep(60)']); open(sys.argv[1], 'w').write(f'{p.pid}'); time.sleep(60)"
    return [sys.executable, "-c", child, str(pids)], pids


def _alive(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a killed orphan may wait as a zombie for its reaper


def _dies_within(pid, seconds=1.0):
    """SIGKILL is delivered asynchronously: the child may run on for a moment after kill()."""
    deadline = time.monotonic() + seconds
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return not _alive(pid)


def test_a_step_over_its_cap_is_killed_with_its_children(tmp_path):
    cmd, pids = _write_pids(tmp_path)
    t0 = time.monotonic()
    with open(tmp_path / "log", "w") as log:
        status, note = gpu_check.run_step([cmd], 2.0, log, dict(os.environ))
    assert time.monotonic() - t0 < 4.0
    assert status == "timeout" and "2 s cap" in note
    assert pids.exists() and _dies_within(int(pids.read_text()))


def test_every_step_hanging_still_ends_inside_the_budget(tmp_path, monkeypatch):
    """Each step (GPU ones included) hangs: each is killed at its share, the rest cut, and the
    whole check ends inside its budget with its files saying so."""
    monkeypatch.setattr(gpu_check, "STEPS", tuple(dataclasses.replace(s, min_s=1.0) for s in gpu_check.STEPS))
    monkeypatch.setattr(gpu_check, "load_probe", lambda path: {"gpu": True, "device": "a hanging GPU"})
    hang = [sys.executable, "-c", "import time; time.sleep(60)"]
    monkeypatch.setattr(gpu_check.Check, "commands", lambda self, name, cap: ([hang], (0,)))
    handler = signal.getsignal(signal.SIGTERM)
    t0 = time.monotonic()
    try:
        rc = gpu_check.main(["--out", str(tmp_path), "--seconds", "10"])
    finally:
        signal.signal(signal.SIGTERM, handler)
    assert time.monotonic() - t0 <= 10
    doc = json.loads((tmp_path / "results.json").read_text())
    statuses = {s["name"]: s["status"] for s in doc["steps"]}
    assert statuses["probe"] == "timeout" and set(statuses.values()) <= {"timeout", "cut"} and rc == 1
    first_lines = (tmp_path / "summary.md").read_text().split("\n## ")[0]
    assert all(f"{name} (" in first_lines for name in statuses)


def test_failing_step_and_pytest_nothing_collected():
    with open(os.devnull, "w") as log:
        assert gpu_check.run_step([[sys.executable, "-c", "raise SystemExit(3)"]], 30, log, dict(os.environ))[0] == \
            "failed"
        assert gpu_check.run_step([[sys.executable, "-c", "raise SystemExit(5)"]], 30, log, dict(os.environ),
                                  ok_codes=(0, 5)) == ("ok", "")


def test_fair_cap():
    step, later = gpu_check.Step("a", 0.2, 10, False), [gpu_check.Step("a", 0.2, 10, False),
                                                         gpu_check.Step("b", 0.6, 10, False)]
    assert gpu_check.fair_cap(step, 400, later) == pytest.approx(100)  # 0.2 of 0.8
    assert gpu_check.fair_cap(step, 30, later) == 10  # at least its minimum
    assert gpu_check.fair_cap(step, 9, later) is None  # not even that: cut
    assert gpu_check.fair_cap(step, 400, later[:1]) == 400  # the last step takes what is left


def test_only_names_known_steps():
    assert gpu_check.step_list("parity, tests-gpu") == ["parity", "tests-gpu"]
    with pytest.raises(Exception, match="unknown step"):
        gpu_check.step_list("parity,bench")


def test_junit_from_the_test_log():
    events = [{"nodeid": "tests/test_a.py::test_ok", "when": "start"},
              {"nodeid": "tests/test_a.py::test_ok", "when": "call", "outcome": "passed", "seconds": 0.5,
               "message": ""},
              {"nodeid": "tests/test_a.py::K::test_bad[1]", "when": "start"},
              {"nodeid": "tests/test_a.py::K::test_bad[1]", "when": "call", "outcome": "failed", "seconds": 1.0,
               "message": "assert 1 == 2\ntests/test_a.py:9: AssertionError"},
              {"nodeid": "tests/test_a.py::test_skip", "when": "start"},
              {"nodeid": "tests/test_a.py::test_skip", "when": "setup", "outcome": "skipped", "seconds": 0.0,
               "message": "needs a CUDA GPU"},
              {"nodeid": "tests/test_a.py::test_hang", "when": "start"}]
    tests = gpu_check_report.test_outcomes(events, killed=True)
    assert [t[0] for t in tests.values()] == ["passed", "failure", "skipped", "error"]
    assert "killed at the step's cap" in tests["tests/test_a.py::test_hang"][2]
    suite = ET.fromstring(gpu_check_report.junit({"tests-gpu": tests})).find("testsuite")
    assert [suite.get(k) for k in ("tests", "failures", "errors", "skipped")] == ["4", "1", "1", "1"]
    bad = suite.findall("testcase")[1]
    assert (bad.get("classname"), bad.get("name")) == ("tests.test_a.K", "test_bad[1]")
    assert bad.find("failure").get("message") == "tests/test_a.py:9: AssertionError"


def test_e2e_worker_rows_validate(tmp_path):
    from fusedformer.bench import check

    lines = tmp_path / "e2e.jsonl"
    check.e2e(check.Lines(lines), 120, ROOT / "benchmarks" / "bench_e2e.py",
              providers=("torch-eager", "fusedformer-reference"), tiny=True)
    found = [json.loads(line) for line in lines.read_text().splitlines()]
    rows = [x["bench"] for x in found if "bench" in x]
    assert [r["provider"] for r in rows] == ["torch-eager", "fusedformer-reference"]
    assert all(r["ms"] > 0 and r["tflops"] > 0 and r["skipped"] is None for r in rows)
    header = found[0]["header"]
    validate_results({"kind": "bench", "device": header["device"], "date": "2026-01-01",
                      "versions": header["versions"], "ceilings": header["ceilings"], "rows": rows})


def test_validator_checks_a_check_documents_parity_rows():
    doc = {"kind": "check", "device": "x", "date": "2026-01-01", "versions": {"torch": "2", "triton": None,
                                                                             "cuda": None},
           "ceilings": {"copy_gbps": None, "matmul_bf16_tflops": None}, "rows": [],
           "parity_rows": [{"op": "softmax", "backend": "triton", "dtype": "float32", "shape": {}, "output": "out",
                            "err": 1e-7, "torch_err": 1e-7, "ratio": 1.0, "ok": True}]}
    validate_results(doc)
    doc["parity_rows"][0]["backend"] = "fast"
    with pytest.raises(ValueError, match=r"parity_rows\[0\].backend"):
        validate_results(doc)
    del doc["parity_rows"]
    with pytest.raises(ValueError, match="parity_rows must be a list"):
        validate_results(doc)


def test_headline_preset_covers_the_issue():
    from fusedformer.bench.cases import OPS

    att = OPS["attention"].SHAPES["headline"]
    assert {(s["D"], s["Lq"], s["causal"]) for s in att} == {(d, n, c) for d in (64, 128)
                                                              for n in (1024, 4096, 16384) for c in (False, True)}
    assert {p for p in OPS["attention"].PRESET_PROVIDERS["headline"] if p.startswith("torch-sdpa")} == \
        {"torch-sdpa-flash", "torch-sdpa-efficient", "torch-sdpa-cudnn", "torch-sdpa-math"}
    for op in ("softmax", "layer_norm", "rms_norm"):
        assert {1024, 4096, 16384} <= {s["N"] for s in OPS[op].SHAPES["headline"]}
        assert {"torch-eager", "torch-compile"} <= set(OPS[op].PRESET_PROVIDERS["headline"])
    assert {s["activation"] for s in OPS["feed_forward"].SHAPES["headline"]} == {"gelu", "swiglu"}


def test_headline_sweep_keeps_its_providers_and_times_the_bare_matmul():
    import fusedformer.bench as bench
    from fusedformer.bench.cases import feed_forward

    doc = bench.run(ops=["feed_forward"], preset="headline", passes=["fwd"], progress=False, cpu_budget_s=0.0)
    assert {r["provider"] for r in doc["rows"]} <= set(feed_forward.PRESET_PROVIDERS["headline"])
    assert any(r["provider"] == "torch-matmul" and r["ms"] > 0 for r in doc["rows"])
    x, w1, b1, w2, b2 = feed_forward.make(dict(M=5, d=8, F=6, activation="swiglu"), torch.float64, "cpu")[0]
    torch.testing.assert_close(feed_forward.bare_matmuls(x, w1, b1, w2, b2, "swiglu"), (x @ w1.T)[:, :6] @ w2.T)


def _results(device="NVIDIA H200", date="2026-11-21"):
    """A synthetic GPU check results document (made here, never committed)."""
    def row(op, provider, shape, ms, frac=None, skipped=None, **throughput):
        return {"op": op, "provider": provider, "dtype": "bfloat16", "pass": "fwd", "shape": shape, "ms": ms,
                "tflops": throughput.get("tflops"), "gbps": throughput.get("gbps"), "frac_of_ceiling": frac,
                "host_us": None, "peak_mb": None, "skipped": skipped}

    small = dict(B=16, H=32, Lq=1024, Lk=1024, D=64, causal=False)
    large = dict(B=1, H=32, Lq=16384, Lk=16384, D=64, causal=False)
    rows = [row("attention", "fusedformer-triton", large, 4.0, 0.5, tflops=400.0),
            row("attention", "torch-sdpa-flash", large, 5.0, 0.4, tflops=320.0),
            row("attention", "torch-sdpa-math", large, None, skipped="B*H*Lq*Lk scores too large to materialise"),
            row("attention", "fusedformer-triton", small, 1.0, 0.125, tflops=100.0),
            row("attention", "torch-sdpa-flash", small, 0.5, 0.25, tflops=200.0),
            row("softmax", "fusedformer-cuda", dict(M=8192, N=4096), 0.1, 0.3, gbps=1300.0),
            row("softmax", "torch-eager", dict(M=8192, N=4096), 0.2, 0.15, gbps=650.0)]
    return {"kind": "check", "device": device, "date": date,
            "versions": {"torch": "2.11", "triton": "3.6.0", "cuda": "13.0", "fusedformer": "0.1.0"},
            "ceilings": {"copy_gbps": 4000.0, "matmul_bf16_tflops": 800.0}, "rows": rows, "parity_rows": []}


def test_perf_table_ratios_ceilings_and_small_beside_large():
    lines = perf_table.tables(_results()).splitlines()
    assert "| shape | backend | ms | throughput | of ceiling | vs torch-sdpa-flash | vs torch-sdpa-math |" in lines
    att = [ln for ln in lines if ln.startswith("| B=")]
    assert att == ["| B=16 H=32 Lq=1024 Lk=1024 D=64 causal=False | triton | 1 | 100 TFLOP/s | 12% | 0.50x | — |",
                   "| B=1 H=32 Lq=16384 Lk=16384 D=64 causal=False | triton | 4 | 400 TFLOP/s | 50% | 1.25x | — |"]
    assert "| M=8192 N=4096 | cuda | 0.1 | 1.3e+03 GB/s | 30% | 2.00x |" in lines


def test_perf_table_uses_the_newest_gpu_file_and_never_a_cpu_one(tmp_path):
    cpu = _results(device="cpu (x86_64) — CPU figures, time.perf_counter medians", date="2026-12-01")
    (tmp_path / "cpu-x86-64-2026-12-01.json").write_text(json.dumps(cpu))
    assert perf_table.newest(tmp_path) == (None, None)
    assert perf_table.section(None, None) == perf_table.NO_RESULTS
    for date in ("2026-11-21", "2026-11-25"):
        (tmp_path / f"nvidia-h200-{date}.json").write_text(json.dumps(_results(date=date)))
    path, doc = perf_table.newest(tmp_path)
    assert path.name == "nvidia-h200-2026-11-25.json"
    text = perf_table.section(path, doc)
    assert text.startswith("From `benchmarks/results/nvidia-h200-2026-11-25.json`: NVIDIA H200, 2026-11-25")
    assert "copy 4000 GB/s, bf16 matmul 800 TFLOP/s" in text


def test_perf_table_rewrites_only_between_the_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nbefore\n{perf_table.START}\nold table\n{perf_table.END}\nafter\n")
    perf_table.update_readme(readme, "new table")
    assert readme.read_text() == f"# x\n\nbefore\n{perf_table.START}\nnew table\n{perf_table.END}\nafter\n"
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="perf-table"):
        perf_table.update_readme(readme, "t")


def test_readme_table_is_the_generated_one():
    readme = (ROOT / "README.md").read_text()
    inside = readme.split(perf_table.START)[1].split(perf_table.END)[0].strip()
    assert inside == perf_table.section(*perf_table.newest()).strip()


def test_perf_table_add_names_by_gpu_and_date_and_refuses_cpu_runs(tmp_path):
    src = tmp_path / "results.json"
    src.write_text(json.dumps(_results()))
    assert perf_table.add(src, tmp_path).name == "nvidia-h200-2026-11-21.json"
    assert perf_table.add(src, tmp_path).name == "nvidia-h200-2026-11-21-2.json"
    src.write_text(json.dumps(_results(device="cpu (x86_64) — no CUDA GPU visible")))
    with pytest.raises(ValueError, match="only GPU runs"):
        perf_table.add(src, tmp_path)


def test_sweep_shares_its_time_by_cases_planned(monkeypatch):
    """The headline gives attention most of its cases: an op's share of --max-seconds follows its
    case count, so softmax (4 cases) gets 4 of 6 seconds, not half of them."""
    import types

    import fusedformer.bench as bench
    from fusedformer.bench import sweep

    clock = [0.0]

    def measure(op, provider, fn, shape, dtype, pass_, device, ceilings, cpu_budget_s):
        clock[0] += 1.0  # every case takes one (fake) second
        return {**sweep._row(op, provider, dtype, pass_, shape), "ms": 1.0, "gbps": 1.0}

    monkeypatch.setattr(sweep, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    monkeypatch.setattr(sweep, "measure", measure)
    doc = bench.run(ops=["softmax", "rms_norm"], preset="tiny", passes=["fwd"], providers=["torch-eager", "liger"],
                    extra_providers={"softmax": {"liger": torch.softmax}}, max_seconds=6, ceilings={},
                    progress=False)
    assert [(r["op"], r["skipped"]) for r in doc["rows"]] == [("softmax", None)] * 4 + [("rms_norm", None)] * 2


def test_parity_worker_fails_its_step_on_a_row_outside_the_rule(tmp_path, monkeypatch):
    import types

    from fusedformer import backends, reference
    from fusedformer._backends.tables import SOFTMAX
    from fusedformer.bench import check

    wrong = types.SimpleNamespace(softmax_forward=lambda x, dim: reference.softmax_forward(x, dim) * 1.001,
                                  softmax_backward=lambda grad_y, y, dim: reference.softmax_backward(grad_y, y, dim))
    monkeypatch.setattr(backends, "unavailable_reason", lambda name, device: None if name != "cuda" else "off")
    monkeypatch.setitem(SOFTMAX.loaded, "triton", (SOFTMAX.check(wrong), None))
    lines = tmp_path / "parity.jsonl"
    assert check.parity(check.Lines(lines), 60, ops=["softmax"]) == 1
    rows = [x["parity"] for x in map(json.loads, lines.read_text().splitlines()) if "parity" in x]
    assert {r["backend"] for r in rows if r["ok"] is False} == {"triton"}
    assert all(r["ok"] for r in rows if r["backend"] == "reference")

"""``fusedformer info | parity | bench | demo``: exit codes and files."""

import os
import subprocess
import sys
import types

import pytest
import torch
from fusedformer import backends, reference
from fusedformer._backends.tables import SOFTMAX
from fusedformer.bench import validate_results
from fusedformer.cli import main

HAS_GPU = torch.cuda.is_available()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_info_exit_code_in_a_fresh_process():
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "python")}
    proc = subprocess.run([sys.executable, "-m", "fusedformer", "info"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "backends on" in proc.stdout and "reference" in proc.stdout


def test_parity_passes_and_writes_json(tmp_path, capsys):
    out = tmp_path / "parity.json"
    assert main(["parity", "--op", "softmax", "--backend", "reference", "--dtype", "float32", "--out", str(out)]) == 0
    doc = validate_results(str(out))
    assert doc["kind"] == "parity" and all(r["ok"] for r in doc["rows"])
    assert "passed, 0 failed" in capsys.readouterr().out


def test_parity_exit_code_on_failure(monkeypatch, capsys):
    wrong = types.SimpleNamespace(softmax_forward=lambda x, dim: reference.softmax_forward(x, dim) * 1.001,
                                  softmax_backward=reference.softmax_backward)
    monkeypatch.setattr(backends, "unavailable_reason", lambda name, device: None if name != "cuda" else "off")
    monkeypatch.setitem(SOFTMAX.loaded, "triton", (SOFTMAX.check(wrong), None))
    assert main(["parity", "--op", "softmax", "--backend", "triton", "--dtype", "float32"]) == 1
    assert "parity FAILED" in capsys.readouterr().err


def test_bench_tiny_writes_results(tmp_path, capsys):
    rc = main(["bench", "--tiny", "--op", "rms_norm", "--pass", "fwd", "--no-progress", "--out", str(tmp_path)])
    assert rc == 0
    doc = validate_results(str(tmp_path / "bench.json"))
    assert doc["kind"] == "bench" and doc["preset"] == "tiny"
    assert (tmp_path / "bench.md").read_text().startswith("# fusedformer bench")
    assert "benchmarks/results/" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["bench", "--op", "conv"], ["bench", "--quick", "--full"],
                                  ["parity", "--backend", "fast"], ["nothing"]])
def test_bad_arguments_exit_2(argv):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2


def test_demo_runs_and_says_which_backend(capsys):
    assert main(["demo", "--seconds", "2"]) == 0
    out = capsys.readouterr().out
    assert "ran: attention=" in out and "tokens/s" in out and "loss" in out
    if HAS_GPU:
        assert "[fused (auto)]" in out and "[reference]" in out
    else:
        assert "everything below runs on the REFERENCE backend" in out


def test_demo_text_ships_with_the_package():
    from fusedformer import demo

    data = demo.load_text()
    assert data.numel() > 4000 and int(data.max()) < 256
    assert demo.decode(data[:40]).startswith("The Keeper of the Northern Light")

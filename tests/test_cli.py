"""``fusedformer info | parity | bench | demo``: exit codes and files."""

import os
import subprocess
import sys
import types

import fusedformer
import pytest
import torch
from fusedformer import backends, reference
from fusedformer._backends.tables import SOFTMAX
from fusedformer._files import write_atomic
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
                                  ["parity", "--backend", "fast"], ["parity", "--op", "nosuchop"],
                                  ["parity", "--quick", "--full"], ["nothing"]])
def test_bad_arguments_exit_2(argv):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"fusedformer {fusedformer.__version__}"


@pytest.mark.skipif(HAS_GPU, reason="the cuda backend must be unable to run")
def test_parity_of_a_backend_that_ran_nothing_fails(capsys):
    assert main(["parity", "--quick", "--op", "softmax", "--backend", "cuda", "--dtype", "float32"]) == 1
    assert "backend 'cuda' ran no case" in capsys.readouterr().err


@pytest.mark.parametrize("argv, kind", [(["parity", "--op", "softmax"], "dir"), (["bench", "--tiny"], "file")])
def test_unusable_out_is_refused_before_any_work(argv, kind, tmp_path, monkeypatch, capsys):
    from fusedformer import bench, parity

    def no_work(*args, **kwargs):
        raise AssertionError("ran before checking --out")

    monkeypatch.setattr(parity, "run_full", no_work)
    monkeypatch.setattr(bench, "run", no_work)
    out = tmp_path / "taken"
    out.mkdir() if kind == "dir" else out.write_text("")
    with pytest.raises(SystemExit) as info:
        main([*argv, "--out", str(out)])
    assert info.value.code == 2
    assert "--out" in capsys.readouterr().err


def test_results_are_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    target = tmp_path / "results.json"
    write_atomic(target, "old")
    write_atomic(target, b"new")
    assert target.read_text() == "new"

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        write_atomic(target, "half")
    assert target.read_text() == "new" and os.listdir(tmp_path) == ["results.json"]


def test_demo_runs_and_says_which_backend(capsys):
    assert main(["demo", "--seconds", "2"]) == 0
    out = capsys.readouterr().out
    assert "ran: attention=" in out and "tokens/s over steps 2-" in out
    assert "held-out loss" in out and "never trained on" in out and "drawn at temperature" in out
    if HAS_GPU:
        assert "[fused (auto)]" in out and "[reference]" in out
    else:
        assert "NO CUDA GPU" in out and "[auto]" in out


def test_demo_held_out_loss_is_fixed_batches_of_text_never_trained_on():
    from fusedformer import demo

    data = demo.load_text()
    train, held = demo.split(data)
    assert train.numel() + held.numel() == data.numel() and held.numel() >= data.numel() // 10
    assert torch.equal(torch.cat([train, held]), data)  # disjoint: the held-out tenth follows the training text
    model = demo.build("bert", "cpu", small=True)
    first = demo.held_out_loss("bert", model, held, "cpu", 2, 16)
    assert demo.held_out_loss("bert", model, held, "cpu", 2, 16) == first and model.training


def test_demo_text_ships_with_the_package():
    from fusedformer import demo

    data = demo.load_text()
    assert data.numel() > 4000 and int(data.max()) < 256
    assert demo.decode(data[:40]).startswith("The Keeper of the Northern Light")

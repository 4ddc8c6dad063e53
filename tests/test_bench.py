"""The benchmark harness on tiny presets: the sweep, its results format and validator, the FLOP
and byte formulas, skipped providers, the time budget, the reports."""

import json
import sys

import fusedformer.bench as bench
import pytest
import torch
from fusedformer.bench.cases import OPS, attention, feed_forward, layer_norm, linear_act, softmax
from fusedformer.bench.timing import Timing, cpu_timing

HAS_GPU = torch.cuda.is_available()


@pytest.fixture(scope="module")
def doc():
    return bench.run(ops=["softmax", "attention", "linear_act"], preset="tiny", progress=False)


def test_sweep_rows_validate(doc):
    assert bench.validate_results(doc) is doc
    assert doc["kind"] == "bench"
    ran = [r for r in doc["rows"] if not r["skipped"]]
    assert {r["provider"] for r in ran} >= {"fusedformer-reference", "torch-eager"}
    assert {r["op"] for r in ran} == {"softmax", "attention", "linear_act"}
    assert {r["pass"] for r in ran} == {"fwd", "fwd+bwd"}
    for r in ran:
        assert r["ms"] > 0 and r["reps"] >= 1 and r["iqr_ms"] >= 0
        if r["op"] == "softmax":  # memory-bound: GB/s against the copy ceiling
            assert r["tflops"] is None
            assert r["frac_of_ceiling"] == pytest.approx(r["gbps"] / doc["ceilings"]["copy_gbps"])
        else:  # compute-bound: TFLOP/s against the matmul ceiling
            assert r["gbps"] is None
            assert r["frac_of_ceiling"] == pytest.approx(r["tflops"] / doc["ceilings"]["matmul_bf16_tflops"])
    assert doc["ceilings"]["copy_gbps"] > 0 and doc["ceilings"]["matmul_bf16_tflops"] > 0


@pytest.mark.skipif(HAS_GPU, reason="the CPU labelling")
def test_cpu_run_is_labelled_and_lists_gpu_only_providers(doc):
    assert "CPU figures" in doc["device"]
    assert "fusedformer-cuda" in doc["skipped_providers"]["softmax"]
    assert "CUDA" in doc["skipped_providers"]["attention"]["torch-sdpa-cudnn"]
    assert "CPU figures" in bench.markdown(doc)


def test_write_json_markdown(doc, tmp_path):
    paths = bench.write(doc, str(tmp_path))
    again = bench.validate_results(paths["json"])
    assert again["rows"] == json.loads(json.dumps(doc["rows"]))
    md = open(paths["markdown"]).read()
    assert "## softmax · float32 · fwd" in md or "## softmax · bfloat16 · fwd" in md
    assert "| shape | fusedformer-reference |" in md or "| shape | fusedformer-triton |" in md
    assert "1.00x" in md  # torch-eager against itself
    plots = paths["plots"]
    if isinstance(plots, str):
        assert "matplotlib" in plots
    else:
        assert plots and all(p.endswith(".png") for p in plots)


def test_broken_provider_becomes_a_skipped_row():
    def boom(x):
        raise RuntimeError("deliberately broken")

    doc = bench.run(ops=["softmax"], preset="tiny", progress=False, providers=["torch-eager", "liger"],
                    passes=["fwd"], extra_providers={"softmax": {"liger": boom}}, cpu_budget_s=0.0)
    bench.validate_results(doc)
    broken = [r for r in doc["rows"] if r["provider"] == "liger"]
    assert len(broken) == len(softmax.SHAPES["tiny"])
    assert all(r["skipped"] == "RuntimeError: deliberately broken" and r["ms"] is None for r in broken)
    assert all(r["ms"] > 0 for r in doc["rows"] if r["provider"] == "torch-eager")
    assert "deliberately broken" in bench.markdown(doc)


def test_time_budget_skips_the_rest():
    doc = bench.run(ops=["rms_norm"], preset="tiny", progress=False, providers=["torch-eager"], max_seconds=0)
    bench.validate_results(doc)
    assert doc["rows"] and all("time budget" in r["skipped"] for r in doc["rows"])


@pytest.mark.skipif(HAS_GPU, reason="needs a backend that cannot run on this device")
def test_backend_refusal_reason_names_the_backend():
    """fusedformer's BackendUnavailableError lists every backend; the skipped row keeps the
    requested backend's line."""
    import fusedformer as ff
    from fusedformer.bench.sweep import _reason_from_unavailable

    with pytest.raises(ff.BackendUnavailableError) as info:
        ff.softmax(torch.randn(3, 5), backend="cuda")
    reason = _reason_from_unavailable(info.value, "fusedformer-cuda")
    assert reason.startswith("cuda") and "unavailable" in reason


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown op"):
        bench.run(ops=["conv"], preset="tiny", progress=False)
    with pytest.raises(ValueError, match="unknown preset"):
        bench.run(preset="huge", progress=False)
    with pytest.raises(ValueError, match="unknown provider"):
        bench.run(ops=["softmax"], preset="tiny", providers=["cudnn"], progress=False)
    with pytest.raises(ValueError, match="unknown dtype"):
        bench.run(ops=["softmax"], preset="tiny", dtypes=["int8"], progress=False)


def test_formulas():
    s = dict(B=2, H=3, Lq=5, Lk=7, D=11, causal=False)
    fwd = 4 * 2 * 3 * 5 * 7 * 11
    assert attention.work(s, "fwd", torch.bfloat16) == (fwd, None)
    assert attention.work({**s, "causal": True}, "fwd", torch.bfloat16)[0] == fwd / 2
    assert attention.work(s, "bwd", torch.bfloat16)[0] == 2.5 * fwd
    assert attention.work(s, "fwd+bwd", torch.bfloat16)[0] == 3.5 * fwd
    assert softmax.work(dict(M=3, N=5), "fwd", torch.float16) == (None, 2 * 15 * 2)
    assert softmax.work(dict(M=3, N=5), "fwd+bwd", torch.float32) == (None, 5 * 15 * 4)
    assert layer_norm.work(dict(M=3, N=5), "fwd", torch.float32)[1] == 2 * 15 * 4 + 2 * 5 * 4 + 8 * 3
    plain = linear_act.work(dict(M=3, K=5, N=7, activation="gelu"), "fwd", torch.float32)[0]
    assert plain == 2 * 3 * 5 * 7
    assert linear_act.work(dict(M=3, K=5, N=7, activation="swiglu"), "fwd", torch.float32)[0] == 2 * plain
    assert feed_forward.work(dict(M=3, d=5, F=7, activation="gelu"), "fwd+bwd", torch.float32)[0] == 3 * 4 * 3 * 5 * 7


@pytest.mark.parametrize("op", list(OPS))
def test_every_op_has_presets_and_providers(op):
    mod = OPS[op]
    for preset in ("tiny", "cpu", "quick", "full"):
        assert mod.SHAPES[preset]
    shape = mod.SHAPES["tiny"][0]
    provs = mod.providers("cpu", shape)
    assert {"fusedformer-reference", "torch-eager", "torch-compile"} <= set(provs)
    assert set(provs) <= set(bench.PROVIDERS)
    inputs, static, diff = mod.make(shape, torch.float32, "cpu")
    want = provs["torch-eager"](*inputs, **static)
    got = provs["fusedformer-reference"](*inputs, **static)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)  # the providers compute the same thing
    assert all(0 <= i < len(inputs) for i in diff)


def _valid_bench():
    return {"kind": "bench", "device": "x", "date": "2026-11-21",
            "versions": {"torch": "2", "triton": None, "cuda": None},
            "ceilings": {"copy_gbps": 10.0, "matmul_bf16_tflops": 1.0},
            "rows": [{"op": "softmax", "provider": "torch-eager", "dtype": "float32", "pass": "fwd", "shape": {"M": 1},
                      "ms": 1.0, "tflops": None, "gbps": 2.0, "frac_of_ceiling": 0.2}]}


@pytest.mark.parametrize("breakage, message", [
    (lambda d: d.pop("kind"), "kind"),
    (lambda d: d.update(date="21/11/2026"), "date"),
    (lambda d: d["versions"].pop("triton"), "versions"),
    (lambda d: d.pop("ceilings"), "ceilings"),
    (lambda d: d["rows"][0].update(provider="torch-fast"), "provider"),
    (lambda d: d["rows"][0].update(ms=-1.0), "ms"),
    (lambda d: d["rows"][0].update(tflops=3.0), "exactly one of tflops and gbps"),
    (lambda d: d["rows"][0].update(skipped="why"), "skipped but has a time"),
    (lambda d: d["rows"][0].update(gbps=float("nan")), "gbps"),
    (lambda d: d["rows"][0].update(**{"pass": "forward"}), "pass"),
    (lambda d: d["rows"][0].pop("frac_of_ceiling"), "frac_of_ceiling"),
])
def test_validator_rejects(breakage, message):
    d = _valid_bench()
    bench.validate_results(d)
    breakage(d)
    with pytest.raises(ValueError, match=message):
        bench.validate_results(d)


def test_results_name():
    assert bench.results_name({"device": "NVIDIA H100 80GB HBM3", "date": "2026-11-21"}) == \
        "nvidia-h100-80gb-hbm3-2026-11-21"


def test_progress_without_tqdm(monkeypatch, capsys):
    from fusedformer.bench.sweep import Progress

    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm now raises ImportError
    bar = Progress(2)
    bar.update("a")
    bar.update("b")
    bar.close()
    err = capsys.readouterr().err
    assert "2/2" in err and "#" in err


def test_cpu_timing_is_torch_benchmark_with_its_spread(monkeypatch):
    from torch.utils import benchmark

    blocks = []
    real = benchmark.Timer.blocked_autorange

    def spy(self, *args, **kwargs):
        blocks.append(real(self, *args, **kwargs))
        return blocks[-1]

    monkeypatch.setattr(benchmark.Timer, "blocked_autorange", spy)
    x = torch.randn(64, 64)
    measured = cpu_timing(lambda: x @ x, budget_s=0.05)
    (m,) = blocks
    assert measured.median_ms == pytest.approx(m.median * 1e3) and measured.iqr_ms == pytest.approx(m.iqr * 1e3)
    assert measured.reps == len(m.times) >= 1 and measured.median_ms > 0


def test_timing_spread_of_known_samples():
    # quartiles interpolated as numpy's default: 2 and 4
    assert Timing.of([5.0, 1.0, 4.0, 2.0, 3.0]) == Timing(median_ms=3.0, iqr_ms=2.0, reps=5)
    assert Timing.of([2.0]) == Timing(2.0, 0.0, 1)


def _above_ceiling_doc(doc):
    rows = [dict(r) for r in doc["rows"] if not r["skipped"] and r["gbps"] is not None][:2]
    rows[0]["frac_of_ceiling"], rows[1]["frac_of_ceiling"] = 1.25, 0.5
    return {**doc, "rows": rows}


def test_figures_above_the_ceiling_are_flagged(doc):
    md = bench.markdown(_above_ceiling_doc(doc))
    assert "125% ⚠" in md and "50%" in md and "50% ⚠" not in md
    assert "above 100% of the ceiling measured in this run" in md
    assert "⚠" not in bench.markdown({**doc, "rows": _above_ceiling_doc(doc)["rows"][1:]})


def test_plot_has_shapes_as_categories_and_one_bar_per_provider(doc):
    pytest.importorskip("matplotlib")
    from fusedformer.bench.report import figure

    rows = [r for r in doc["rows"] if r["op"] == "softmax" and r["pass"] == "fwd"]
    fig = figure(doc, rows)
    ax = fig.axes[0]
    shapes = list(dict.fromkeys(bench.report.shape_label(r["shape"]) for r in rows))
    assert [t.get_text().replace("\n", " ") for t in ax.get_xticklabels()] == shapes
    ran = [r for r in rows if not r["skipped"]]
    bars = [p for p in ax.patches if p.get_width() > 0]
    assert len(bars) == len(ran)
    # every bar sits inside its shape's category, providers side by side
    for bar in bars:
        assert round(bar.get_x() + bar.get_width() / 2) in range(len(shapes))
    assert len({round(b.get_x(), 6) for b in bars}) == len(bars)


@pytest.mark.gpu
def test_gpu_sweep_times_every_competitor():
    doc = bench.run(ops=["attention", "rms_norm"], preset="tiny", progress=False, dtypes=["bfloat16"])
    bench.validate_results(doc)
    ran = {r["provider"] for r in doc["rows"] if not r["skipped"]}
    assert {"torch-eager", "torch-sdpa-math", "torch-compile", "fusedformer-reference"} <= ran
    assert all(r["host_us"] > 0 and r["peak_mb"] is not None for r in doc["rows"] if not r["skipped"])
    assert "CPU figures" not in doc["device"]


def test_save_suite_writes_a_valid_results_file(tmp_path):
    from fusedformer.bench.report import save_suite

    rows = [{"op": "attention", "provider": "fusedformer-triton", "dtype": "bfloat16", "pass": "fwd",
             "shape": {"B": 1, "H": 2, "Lq": 8, "Lk": 8, "D": 64, "causal": False},
             "ms": 1.0, "tflops": 2.0, "gbps": None, "frac_of_ceiling": None},
            {"op": "softmax", "provider": "torch-eager", "dtype": "bfloat16", "pass": "fwd",
             "shape": {"M": 8, "N": 8}, "ms": 1.0, "tflops": None, "gbps": 100.0, "frac_of_ceiling": None}]
    doc = save_suite("suite", rows, {"copy_gbps": 1000.0, "matmul_bf16_tflops": 500.0}, tmp_path, lambda d: "# t\n")
    assert [r["frac_of_ceiling"] for r in doc["rows"]] == [2.0 / 500.0, 100.0 / 1000.0]
    written = sorted(p.name for p in tmp_path.iterdir())
    assert len(written) == 2 and all(name.startswith("suite-") for name in written)
    bench.validate_results(json.loads((tmp_path / written[0]).read_text()))

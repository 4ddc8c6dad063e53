"""Which backend runs an op and why: ff.which_backend / ff.explain, and the one-time log line when
``auto`` passes over a backend on a GPU (faked here: the selection sees a "cuda" device)."""

import logging
import types

import fusedformer as ff
import pytest
import torch
from fusedformer import backends, reference
from fusedformer._backends.tables import SOFTMAX


def test_which_backend_chooses_without_running(monkeypatch):
    x = torch.randn(4, 7)

    def must_not_run(*args):
        raise AssertionError("which_backend ran the op")

    monkeypatch.setattr(reference, "softmax_forward", must_not_run)
    chosen = ff.which_backend(ff.softmax, x, backend="reference")
    assert chosen.backend == "reference" and chosen.requested == "reference" and chosen.op == "softmax"
    assert set(chosen.reasons) == set(backends.BACKENDS)
    assert "needs CUDA tensors" in chosen.reasons["cuda"]
    assert "cuda       cannot: inputs are on cpu" in str(chosen)
    assert "torch      could run it; reference was asked for" in str(chosen)


def test_which_backend_checks_the_inputs_and_says_when_nothing_can_run():
    with pytest.raises(TypeError, match="x"):
        ff.which_backend(ff.softmax, torch.arange(5))
    with pytest.raises(ValueError, match="made no backend choice"):
        ff.which_backend(lambda: None)
    nothing = ff.which_backend(ff.softmax, torch.randn(3), backend="cuda")
    assert nothing.backend is None and "no backend can run it" in str(nothing)


def test_explain_runs_the_call_and_counts_each_choice():
    x = torch.randn(2, 3, 8)
    layer = ff.nn.LayerNorm(8)
    seen = ff.explain(lambda t: ff.softmax(layer(t)) + ff.softmax(t), x)
    torch.testing.assert_close(seen.result, torch.softmax(layer(x), -1) + torch.softmax(x, -1))
    counts = {s.op: n for s, n in seen.selections.items()}
    assert counts == {"layer_norm": 1, "softmax": 2}
    auto = ff.which_backend(ff.softmax, x)
    assert seen.backends() == {"layer_norm": {auto.backend}, "softmax": {auto.backend}}
    assert "(2 calls)" in str(seen) and str(ff.explain(torch.softmax, x, 0)) == "no fusedformer op was called"
    assert backends.observers == []


@pytest.fixture
def fake_gpu(monkeypatch):
    """Every backend available; triton's softmax declines float64 (as a kernel backend does)."""
    def unsupported(x, dim):
        return "float64 runs on the reference backend" if x.dtype == torch.float64 else None

    triton = types.SimpleNamespace(softmax_forward=reference.softmax_forward,
                                   softmax_backward=reference.softmax_backward, unsupported=unsupported)
    monkeypatch.setattr(backends, "unavailable_reason", lambda name, device: None)
    monkeypatch.setitem(SOFTMAX.loaded, "triton", (SOFTMAX.check(triton), None))
    monkeypatch.setattr(backends, "_passed_over", set())
    return torch.device("cuda")


def test_auto_passing_over_a_gpu_backend_is_said_once_per_reason(fake_gpu, caplog):
    caplog.set_level(logging.WARNING, logger="fusedformer")
    x = torch.randn(3, 5, dtype=torch.float64)
    for _ in range(3):
        assert backends.select("softmax", fake_gpu, (x, -1)) == backends.AUTO_ORDER["cuda"][1]
    said = [r.getMessage() for r in caplog.records if r.name == "fusedformer"]
    assert said == ["fusedformer: auto passed over the triton backend for softmax: float64 runs on the reference "
                    "backend"]
    assert backends.select("softmax", fake_gpu, (x.float(), -1)) == "triton"
    assert backends.select("softmax", torch.device("cpu"), (x, -1)) == backends.AUTO_ORDER["cpu"][0]
    assert len([r for r in caplog.records if r.name == "fusedformer"]) == 1


def test_explain_on_a_gpu_names_the_backend_passed_over(fake_gpu):
    x = torch.randn(3, 5, dtype=torch.float64)
    (chosen,) = ff.explain(backends.select, "softmax", fake_gpu, (x, -1)).selections
    assert chosen.device == "cuda" and chosen.backend == backends.AUTO_ORDER["cuda"][1]
    text = str(chosen)
    assert text.startswith(f"softmax on cuda, backend='auto' -> {chosen.backend}\n")
    assert "triton     cannot: float64 runs on the reference backend" in text
    assert f"reference  could run it; auto chose {chosen.backend}, earlier in its order here (triton, " in text
    not_tried = ff.Selection("softmax", "cuda", "auto", "triton", {"triton": None, "cuda": None}, ("triton",))
    assert "cuda       could run it; auto does not try it on cuda (ask for it by name)" in str(not_tried)


def test_the_log_line_does_not_break_a_compiled_graph(fake_gpu):
    def f(x):
        backends._report_pass_over("softmax", "triton", "a reason only the compiled call meets")
        return x * 2

    torch.testing.assert_close(torch.compile(f, fullgraph=True)(torch.ones(3)), torch.full((3,), 2.0))

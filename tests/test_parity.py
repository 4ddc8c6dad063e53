"""The parity harness: the 2x rule passes the reference and fails a deliberately wrong backend,
skips a backend that cannot run, measures cross-backend agreement, keeps strided layouts, and
writes the parity envelope of docs/results-format.md."""

import json
import math
import types

import fusedformer as ff
import pytest
import torch
from fusedformer import backends, parity, reference
from fusedformer._backends.tables import SOFTMAX as SOFTMAX_TABLE
from fusedformer.bench import validate_results

HAS_GPU = torch.cuda.is_available()
DEVICE = "cuda" if HAS_GPU else "cpu"


def _wrong_softmax_module(forward_scale=1.0, backward_scale=1.0):
    """A softmax backend that is off by a relative ``scale - 1`` in its forward or backward."""
    return types.SimpleNamespace(
        softmax_forward=lambda x, dim: reference.softmax_forward(x, dim) * forward_scale,
        softmax_backward=lambda grad_y, y, dim: reference.softmax_backward(grad_y, y, dim) * backward_scale)


@pytest.fixture
def wrong_triton_softmax(monkeypatch, request):
    """Route the triton backend's softmax to a wrong implementation, through the real dispatch."""
    fwd, bwd = request.param
    monkeypatch.setattr(backends, "unavailable_reason", lambda name, device: None if name != "cuda" else "off")
    wrong = _wrong_softmax_module(fwd, bwd)
    monkeypatch.setitem(SOFTMAX_TABLE.loaded, "triton", (SOFTMAX_TABLE.check(wrong), None))
    return request.param


SOFTMAX = [c for c in parity.default_cases(quick=True) if c.op == "softmax"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_passes(dtype):
    rows = [r for c in SOFTMAX for r in parity.run_case(c, "reference", dtype, DEVICE)]
    assert rows and all(r["ok"] for r in rows)
    assert {r["output"] for r in rows} == {"out", "d0"}


@pytest.mark.parametrize("wrong_triton_softmax", [(1.001, 1.0), (1.0, 1.01)], indirect=True,
                         ids=["forward-off-by-1e-3", "backward-off-by-1e-2"])
def test_wrong_backend_fails(wrong_triton_softmax):
    fwd, bwd = wrong_triton_softmax
    result = parity.run_full(backends=["reference", "triton"], dtypes=["float32"], device=DEVICE, ops=["softmax"])
    bad = parity.failures(result["rows"])
    assert bad and all(r["backend"] == "triton" for r in bad)
    assert {r["output"] for r in bad} == ({"out", "d0"} if fwd != 1.0 else {"d0"})
    assert all(r["ratio"] > 2 for r in bad)
    # agreement: reference vs the wrong triton differ by far more than float32 rounding
    pairs = [a for a in result["agreement"] if a["backends"] == ["reference", "triton"]]
    assert pairs and max(a["max_diff"] for a in pairs) > 1e-4
    assert "failed" in parity.format_table(result["rows"], result["agreement"])


def test_skipped_backend_does_not_fail():
    result = parity.run_full(backends=["reference", "cuda"], dtypes=["float32"], device="cpu", ops=["rms_norm"])
    skipped = [r for r in result["rows"] if r["backend"] == "cuda"]
    assert skipped and all(r["ok"] is None and r["skipped"].startswith("cuda") for r in skipped)
    assert not parity.failures(result["rows"])
    assert all(a["backends"] != ["cuda", "reference"] for a in result["agreement"])
    assert "skipped" in parity.format_table(result["rows"])


def test_agreement_of_identical_backends_is_zero():
    case = SOFTMAX[0]
    _, outs = parity._run_case(case, "reference", torch.float32, DEVICE, 0)
    rows = parity.agreement({"reference": outs, "copy": outs}, case, torch.float32)
    assert {r["output"] for r in rows} == {"out", "d0"} and all(r["max_diff"] == 0.0 for r in rows)


ATTENTION_EXTRA = [c for c in parity.default_cases(quick=True)
                   if c.op == "attention" and ("mask" in c.shape or "layout" in c.shape)]


def test_masked_and_strided_attention_cases_exist():
    kinds = {c.shape.get("mask") or c.shape.get("layout") for c in ATTENTION_EXTRA}
    assert kinds == {"bool", "key_padding", "fully_masked_rows", "strided"}


@pytest.mark.parametrize("case", ATTENTION_EXTRA, ids=lambda c: c.shape.get("mask") or c.shape.get("layout"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_and_strided_attention_reference(case, dtype):
    rows = parity.run_case(case, "reference", dtype, DEVICE)
    assert all(r["ok"] for r in rows), parity.format_table(rows)


def test_fully_masked_rows_are_zero():
    case = next(c for c in ATTENTION_EXTRA if c.shape.get("mask") == "fully_masked_rows")
    (q, k, v, mask), _, _ = case.make(torch.Generator().manual_seed(0))
    out = case.ours(q, k, v, mask, backend="reference")
    dead = ~mask.any(-1)  # (B, 1, Lq)
    assert dead.sum() >= 2
    assert torch.equal(out[dead.expand(-1, out.shape[1], -1)], torch.zeros_like(out[dead.expand(-1, out.shape[1], -1)]))
    assert torch.isfinite(case.theirs(q, k, v, mask)).all()


def test_cast_keeps_strides():
    base = torch.randn(2, 7, 3, 13, dtype=torch.float64)
    view = base.transpose(1, 2)[..., :9]
    cast = parity._cast(view, torch.float32, "cpu")
    assert cast.stride() == view.stride() and not cast.is_contiguous()
    assert torch.equal(cast, view.float())


def test_max_error_nan_and_shape():
    a = torch.tensor([1.0, float("nan")])
    assert parity.max_error(a, a) == 0.0
    assert parity.max_error(a, torch.tensor([1.0, 2.0])) == math.inf
    assert parity.max_error(torch.zeros(2), torch.zeros(3)) == math.inf


@pytest.mark.parametrize("wrong_triton_softmax", [(1.001, 1.0)], indirect=True, ids=["forward-off"])
def test_envelope_validates_with_failures_and_skips(tmp_path, wrong_triton_softmax):
    result = parity.run_full(backends=["reference", "triton", "cuda"], dtypes=["float32"], device="cpu",
                             ops=["softmax"])
    path = tmp_path / "parity.json"
    parity.write_json(result["rows"], "cpu", path, result["agreement"])
    doc = validate_results(str(path))
    assert doc["kind"] == "parity" and doc["agreement"]
    assert {r["ok"] for r in doc["rows"]} == {True, False, None}
    text = path.read_text()
    assert "Infinity" not in text and "NaN" not in text
    json.loads(text)


def test_validator_rejects_parity_rows():
    doc = parity.envelope(parity.run_case(SOFTMAX[0], "reference", torch.float32), "cpu")
    validate_results(doc)
    doc["rows"][0]["ok"] = "yes"
    with pytest.raises(ValueError, match="ok"):
        validate_results(doc)
    doc["rows"][0].update(ok=True, backend="fast")
    with pytest.raises(ValueError, match="backend"):
        validate_results(doc)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_backends_parity_and_agreement(backend):
    if backend not in ff.available_backends("cuda"):
        pytest.skip(f"{backend} unavailable")
    result = parity.run_full(backends=["reference", backend], dtypes=["float32", "bfloat16"], device="cuda")
    assert not parity.failures(result["rows"]), parity.format_table(parity.failures(result["rows"]))


def test_torch_backend_passes_and_agrees_with_the_reference_on_cpu():
    result = parity.run_full(backends=["reference", "torch"], dtypes=["float32"], device="cpu")
    assert {r["backend"] for r in result["rows"]} == {"reference", "torch"}
    assert not parity.failures(result["rows"]), parity.format_table(parity.failures(result["rows"]))
    pairs = [a for a in result["agreement"] if a["backends"] == ["reference", "torch"]]
    assert pairs and max(a["max_diff"] for a in pairs) < 1e-4, parity.format_table([], pairs)

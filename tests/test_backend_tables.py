"""The declared backend tables (fusedformer/_backends/tables.py): every backend module fits its
family's table, a module that does not fails when loaded with the missing or misnamed function's
name, optional entries get their fallbacks, and importing fusedformer loads no backend."""

import pathlib
import subprocess
import sys
import types

import pytest
import torch
from _testing import skip_below_triton_floor
from fusedformer import reference
from fusedformer._backends.contract import BackendContractError, BackendUnavailableError, Family
from fusedformer._backends.tables import FAMILIES, LINEAR_ACT, SOFTMAX

BACKENDS_DIR = pathlib.Path(__file__).resolve().parents[1] / "python" / "fusedformer" / "_backends"


def _fake_softmax_family(monkeypatch, **functions):
    """SOFTMAX's table with one more backend, "fake", whose module defines ``functions``."""
    module = types.ModuleType("fake_softmax_backend")
    for name, fn in functions.items():
        setattr(module, name, fn)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return Family("softmax", SOFTMAX.functions, {**SOFTMAX.modules, "fake": module.__name__})


def test_a_missing_function_fails_at_load_with_its_name(monkeypatch):
    family = _fake_softmax_family(monkeypatch, softmax_forward=reference.softmax_forward)
    with pytest.raises(BackendContractError, match=r"fake_softmax_backend lacks softmax_backward\(grad_y, y, dim\)"):
        family.implementation("fake")


def test_a_misnamed_function_fails_at_load_with_its_name(monkeypatch):
    family = _fake_softmax_family(monkeypatch, softmax_fwd=reference.softmax_forward,
                                  softmax_backward=reference.softmax_backward)
    with pytest.raises(BackendContractError, match="lacks softmax_forward"):
        family.implementation("fake")


def test_misnamed_or_reordered_parameters_fail_at_load(monkeypatch):
    family = _fake_softmax_family(monkeypatch, softmax_forward=lambda dim, x: x,
                                  softmax_backward=reference.softmax_backward)
    with pytest.raises(BackendContractError, match=r"softmax_forward\(dim, x\) should take \(x, dim\)"):
        family.implementation("fake")
    family = _fake_softmax_family(monkeypatch, softmax_forward=reference.softmax_forward,
                                  softmax_backward=reference.softmax_backward, unsupported=lambda x, dim, extra: None)
    with pytest.raises(BackendContractError, match="unsupported has parameters without a default.*extra"):
        family.implementation("fake")


def test_a_backend_without_a_module_is_unavailable_with_the_reason():
    assert "varlen_attention is not implemented on the cuda backend" in FAMILIES["varlen_attention"].load("cuda")[1]
    with pytest.raises(BackendUnavailableError, match="not implemented on the cuda backend"):
        FAMILIES["varlen_attention"].implementation("cuda")


def test_optional_entries_get_their_fallbacks(monkeypatch):
    family = _fake_softmax_family(monkeypatch, softmax_forward=reference.softmax_forward,
                                  softmax_backward=reference.softmax_backward)
    assert family.implementation("fake").unsupported(torch.ones(2), 0) is None
    plain = types.SimpleNamespace(linear_act_forward=reference.linear_act_forward,
                                  linear_act_backward=reference.linear_act_backward)
    impl = LINEAR_ACT.check(plain)
    g = torch.Generator().manual_seed(0)
    x, w, b, dy = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((5, 4), (6, 4), (6,), (5, 3)))
    y, preact = reference.linear_act_forward(x, w, b, "swiglu")
    assert torch.equal(impl.linear_act_inference(x, w, b, "swiglu"), y)
    dx, dw, db, y_again = impl.linear_act_recompute(dy, x, w, b, "swiglu")
    for got, want in zip((dx, dw, db, y_again), (*reference.linear_act_backward(dy, x, w, b, preact, "swiglu"), y)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("family,backend", [(f, b) for f in FAMILIES for b in FAMILIES[f].modules])
def test_every_backend_module_fits_its_table(family, backend):
    """Loads each module named in a table (the triton ones run under the interpreter here, the
    cuda ones import without a GPU): a contract break fails here, not on the first GPU call."""
    skip_below_triton_floor(backend, family)
    impl, reason = FAMILIES[family].load(backend)
    assert impl is not None, reason


def test_every_backend_module_file_is_named_in_a_table():
    """A backend module nobody's table names would never run: _backends/<backend>/<family>.py
    must appear in the table of <family>."""
    for path in BACKENDS_DIR.glob("*/*.py"):
        if path.stem.startswith("_"):
            continue
        backend, family = path.parent.name, path.stem
        assert family in FAMILIES, f"{path} implements no declared family"
        assert FAMILIES[family].modules.get(backend) == f"fusedformer._backends.{backend}.{family}", (
            f"{path} is not in the {family} table's modules")


def test_importing_fusedformer_loads_no_backend():
    """Availability stays lazy: neither triton nor fusedformer._C is imported by ``import
    fusedformer`` or by an op that runs on the reference backend."""
    script = ("import sys, torch, fusedformer as ff\n"
              "ff.softmax(torch.randn(3, 4)); ff.linear_act(torch.randn(2, 4), torch.randn(6, 4), None, 'swiglu')\n"
              "print(sorted(m for m in ('triton', 'fusedformer._C') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"

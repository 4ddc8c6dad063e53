"""Assertions the test files share: parity rows all within the rule, compiling the Triton
kernels for a GPU target in a process without the interpreter, and what the interpreted triton
backend can run (op families to skip on, patch op groups)."""

import os
import subprocess
import sys

import pytest
from fusedformer import backends, parity


def assert_triton_parity(case, dtype, device):
    """Run ``case`` on the triton backend and fail with the whole parity table if any row is off."""
    rows = parity.run_case(case, "triton", dtype, device)
    bad = [r for r in rows if not r["ok"]]
    assert not bad, parity.format_table(rows)
    return rows


def assert_parity(rows):
    """Fail listing the outputs of ``rows`` (parity.run_case results) that break the rule."""
    bad = [r for r in rows if not r["ok"]]
    assert not bad, "\n".join(f"{r['output']}: err {r['err']:.3e} torch_err {r['torch_err']:.3e}" for r in bad)


def assert_compiles_without_interpreter(script, cache_dir):
    """Run ``script`` (Python source that prints "ok" last) with TRITON_INTERPRET unset, so Triton's
    real compiler runs; ``cache_dir`` keeps its cache out of the user's."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(cache_dir)
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


# patch op group -> the op families it runs on
PATCH_FAMILIES = {"attention": ("attention",), "norm": ("layer_norm", "rms_norm"), "mlp": ("linear_act",)}


def triton_ops():
    """The patch op groups the triton backend can run on CPU (interpreted) right now, and why the
    others cannot."""
    ops, why = [], []
    for group, fams in PATCH_FAMILIES.items():
        reasons = [backends.unsupported_reason("triton", f, "cpu") for f in fams]
        if all(r is None for r in reasons):
            ops.append(group)
        else:
            why.append(f"{group}: {next(r for r in reasons if r is not None)}")
    return tuple(ops), "; ".join(why)


def skip_unless_triton(*families):
    """Skip unless the triton backend runs every one of these op families here."""
    reasons = [f"triton {f}: {r}" for f in families if (r := backends.unsupported_reason("triton", f, "cpu"))]
    return pytest.mark.skipif(bool(reasons), reason="; ".join(reasons))


def skip_below_triton_floor(backend, family):
    """Skip when ``backend`` is triton and the installed triton is older than ``family``'s floor
    (make test-oldest): the triton backend declines the family there, and says why."""
    if backend != "triton":
        return
    triton = pytest.importorskip("triton")
    from fusedformer._backends.triton_floors import floor_reason

    if reason := floor_reason(family, triton.__version__):
        pytest.skip(f"the triton backend declines {family} here: {reason}")

"""The Triton interpreter as the package patches it (kernels/_interpreter.py):
bounds-checked loads and stores, bf16 tl.dot and fp32 -> bf16 rounding as on the GPU, also in a
plain script that never sees this test suite's conftest."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from _testing import skip_below_triton_floor

from conftest import HAS_GPU

pytestmark = pytest.mark.skipif(HAS_GPU, reason="checks the CPU interpreter")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from fusedformer.kernels import _interpreter  # noqa: E402
from triton.runtime.errors import InterpreterError  # noqa: E402


@triton.jit
def _copy_kernel(X, Y, n, shift, load_extra, store_extra, BLOCK: tl.constexpr):
    """y[:n] = x[shift:n + shift], reading load_extra and writing store_extra lanes past n; shift
    and the extras are the planted defects."""
    offs = tl.arange(0, BLOCK)
    x = tl.load(X + shift + offs, mask=offs < n + load_extra, other=0.0)
    tl.store(Y + offs, x, mask=offs < n + store_extra)


@triton.jit
def _cast_kernel(X, Y, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(Y + offs, tl.load(X + offs, mask=offs < n).to(tl.bfloat16), mask=offs < n)


@triton.jit
def _dot_kernel(A, B, C, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    idx = offs[:, None] * BLOCK + offs[None, :]
    tl.store(C + idx, tl.dot(tl.load(A + idx), tl.load(B + idx)))


def _copy(x, n, shift=0, load_extra=0, store_extra=0, y=None):
    y = torch.zeros(n, dtype=x.dtype) if y is None else y
    _copy_kernel[(1,)](x, y, n, shift, load_extra, store_extra, BLOCK=32)
    return y


def test_bounds_checking_is_on_in_this_suite():
    assert _interpreter.bounds_checking()


def test_masked_lanes_may_point_anywhere():
    """The usual tail: a 32-lane block over 13 elements, the 19 lanes past the end masked off."""
    x = torch.randn(13)
    assert torch.equal(_copy(x, 13), x)


def test_planted_read_past_the_end_is_caught():
    x = torch.randn(13)
    with pytest.raises(InterpreterError, match=r"_copy_kernel: load of 1 enabled lane\(s\) outside .* lane \(13,\) "
                                               r"reads 4 bytes at byte 52 of X's storage \(52 bytes\)"):
        _copy(x, 13, load_extra=1)


def test_planted_write_past_the_end_is_caught():
    x, y = torch.randn(13), torch.zeros(11)
    with pytest.raises(InterpreterError, match=r"_copy_kernel: store of 2 enabled lane\(s\) .* byte 44 of Y's"):
        _copy(x, 11, store_extra=2, y=y)


def test_planted_read_before_the_start_is_caught():
    x = torch.randn(13)
    assert torch.equal(_copy(x[1:], 12, shift=-1), x[:12])  # x[1:] starts 4 bytes into its storage
    with pytest.raises(InterpreterError, match=r"load of 1 enabled lane\(s\) .* lane \(0,\) .* byte -4 of X's"):
        _copy(x, 12, shift=-1)


def test_a_view_may_read_its_whole_storage():
    """The rule is the argument's storage, as a GPU's allocation: a view's neighbours are in bounds."""
    base = torch.randn(40)
    assert torch.equal(_copy(base[4:17], 13, load_extra=6), base[4:17])
    assert torch.equal(_copy(base[4:17], 13, shift=-4), base[:13])


def test_checking_bounds_context_overrides_the_environment():
    with _interpreter.checking_bounds(False):
        assert not _interpreter.bounds_checking()
        with _interpreter.checking_bounds():
            assert _interpreter.bounds_checking()
        assert not _interpreter.bounds_checking()
    assert _interpreter.bounds_checking()


def test_fp32_to_bf16_rounds_to_nearest_even_as_torch():
    x = torch.randn(97) * 1e3
    # halfway ties (round to even, both ways), just above a tie, inf, nan, a bf16 subnormal
    ties = torch.tensor([0x3F808000, 0x3F818000, 0x3F808001], dtype=torch.int32).view(torch.float32)
    x = torch.cat([x, ties, torch.tensor([float("inf"), -float("inf"), float("nan"), 1e-39])])
    y = torch.zeros(x.numel(), dtype=torch.bfloat16)
    _cast_kernel[(1,)](x, y, x.numel(), BLOCK=128)
    assert torch.equal(y.view(torch.int16), x.to(torch.bfloat16).view(torch.int16))


def test_bf16_dot_multiplies_values_not_bit_patterns():
    a, b = torch.randn(16, 16).bfloat16(), torch.randn(16, 16).bfloat16()
    c = torch.zeros(16, 16)
    _dot_kernel[(1,)](a, b, c, BLOCK=16)
    torch.testing.assert_close(c, a.float() @ b.float(), atol=1e-5, rtol=1e-5)


_PLAIN_SCRIPT = textwrap.dedent("""
    import torch
    from fusedformer import parity
    from fusedformer.kernels import _interpreter
    from triton.runtime.interpreter import InterpreterBuilder

    cases = [c for c in parity.default_cases() if c.op == "attention" or c.shape.get("activation") == "gelu"]
    rows = [r for case in cases[:2] for r in parity.run_case(case, "triton", torch.bfloat16)]
    bad = [r for r in rows if not r["ok"] or r["backend"] != "triton"]
    assert rows and not bad, parity.format_table(rows)
    patched = InterpreterBuilder.create_dot, InterpreterBuilder.cast_impl
    _interpreter.install()  # again: idempotent
    assert (InterpreterBuilder.create_dot, InterpreterBuilder.cast_impl) == patched
    print("ok")
""")


def test_plain_script_gets_correct_bf16_from_the_interpreter(tmp_path):
    """No conftest in a user's script: the package itself must make bf16 GEMM and attention right
    (linear_act gelu and plain attention, forward and backward, within the parity rule), and
    installing its shims again changes nothing."""
    for family in ("linear_act", "attention"):
        skip_below_triton_floor("triton", family)
    env = {k: v for k, v in os.environ.items() if k != _interpreter.BOUNDS_ENV}
    env.update(TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(sys.path))
    result = subprocess.run([sys.executable, "-c", _PLAIN_SCRIPT], env=env, capture_output=True, text=True,
                            timeout=600, cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]

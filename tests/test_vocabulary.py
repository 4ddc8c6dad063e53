"""fusedformer.vocabulary: every activation's math against torch autograd in float64, its torch
column against torch's own functions, the CUDA codes against csrc/linear_act.cu, and the Philox
dropout stream (known answer, Triton's tl.randint bit for bit)."""

import math
import os
import pathlib
import re

import pytest
import torch
import torch.nn.functional as F
from _testing import skip_below_triton_floor
from fusedformer.vocabulary import (
    ACTIVATIONS,
    FUSED_ACTIVATIONS,
    attention_dropout_keep,
    compute_dtype,
    gated_activation,
    philox4x32,
    philox_uint32,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]
f64 = torch.float64


def _gated(fn):
    return lambda h: fn(h.chunk(2, -1)[0]) * h.chunk(2, -1)[1]


# what each name means, spelled with torch's functions: the spec the table is held to
TORCH_SPEC = {
    "relu": F.relu, "gelu": F.gelu, "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"), "silu": F.silu,
    "identity": lambda h: h, "swiglu": _gated(F.silu), "geglu": _gated(F.gelu),
    "geglu_tanh": _gated(lambda h: F.gelu(h, approximate="tanh")), "reglu": _gated(F.relu),
}


def test_every_activation_is_specified_and_the_fused_ones_are_the_ops():
    assert set(ACTIVATIONS) == set(TORCH_SPEC)
    assert FUSED_ACTIVATIONS == ("relu", "gelu", "gelu_tanh", "silu", "swiglu", "geglu", "identity")


@pytest.mark.parametrize("name", list(TORCH_SPEC))
def test_activation_forward_backward_and_torch_column(name):
    act = ACTIVATIONS[name]
    h = torch.randn(7, 18, dtype=f64) * 3
    dy = torch.randn(7, act.output_width(18), dtype=f64)
    want = TORCH_SPEC[name](h)
    torch.testing.assert_close(act.torch_forward(h), want, atol=0, rtol=0)
    torch.testing.assert_close(act.forward(h), want, atol=1e-12, rtol=1e-12)
    hr = h.clone().requires_grad_()
    (want_grad,) = torch.autograd.grad(TORCH_SPEC[name](hr), hr, dy)
    torch.testing.assert_close(act.backward(dy, h), want_grad, atol=1e-12, rtol=1e-12)


def test_activations_propagate_nan():
    h = torch.tensor([float("nan"), 1.0, -1.0], dtype=f64)
    for name in ("relu", "gelu", "gelu_tanh", "silu"):
        assert torch.isnan(ACTIVATIONS[name].forward(h)[0]), name
    for name in ("gelu", "gelu_tanh", "silu"):
        assert torch.isnan(ACTIVATIONS[name].backward(torch.ones_like(h), h)[0]), name
    # relu's backward is torch's threshold_backward, a select: dy where h is NaN (NaN <= 0 is
    # false), 0 where h <= 0 even for a NaN dy
    dy = torch.tensor([2.0, 3.0, float("nan")], dtype=f64)
    assert torch.equal(ACTIVATIONS["relu"].backward(dy, h), torch.tensor([2.0, 3.0, 0.0], dtype=f64))


def test_gated_activation_by_gate_function():
    assert {f: gated_activation(f).name for f in ("silu", "gelu", "gelu_tanh", "relu")} == {
        "silu": "swiglu", "gelu": "geglu", "gelu_tanh": "geglu_tanh", "relu": "reglu"}
    assert gated_activation("identity") is None


def test_cuda_codes_are_the_csrc_enum():
    """csrc/linear_act.cu's `enum Act` (kGeluTanh = 2, ...) names every fused activation's code."""
    source = (ROOT / "csrc" / "linear_act.cu").read_text()
    body = re.search(r"enum Act : int \{([^}]*)\}", source).group(1)
    enum = {re.sub(r"(?<!^)([A-Z])", r"_\1", k[1:]).lower(): int(v) for k, v in re.findall(r"(k\w+) = (\d+)", body)}
    assert enum == {name: a.cuda_code for name, a in ACTIVATIONS.items() if a.fused}


def test_compute_dtype():
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        assert compute_dtype(torch.empty(0, dtype=dtype)) == torch.float32
    assert compute_dtype(torch.empty(0, dtype=f64)) == f64


# --------------------------------------------------------------------------------------------
# the Philox stream
# --------------------------------------------------------------------------------------------


def test_dropout_from_seed_is_reproducible_and_keeps_one_minus_p():
    keep = attention_dropout_keep(1234, 2, 3, 64, 64, 0.25)
    assert torch.equal(keep, attention_dropout_keep(1234, 2, 3, 64, 64, 0.25))
    assert not torch.equal(keep, attention_dropout_keep(1235, 2, 3, 64, 64, 0.25))
    rate = keep.double().mean().item()
    assert abs(rate - 0.75) < 4 * math.sqrt(0.75 * 0.25 / keep.numel())


def test_philox_known_answer():
    # Random123's known-answer vector for Philox4x32-10: counter 0, key 0 -> 0x6627e8d5, ...
    assert philox_uint32(0, torch.tensor([0])).item() == 0x6627E8D5


def test_dropout_uses_all_four_philox_outputs_in_key_order():
    # the same vector's four outputs: 0x6627e8d5 0xe169c58d 0xbc57ac4c 0x9b00dbd8; with p = 0.7 the
    # threshold 0xb3333333 keeps outputs 1 and 2, so keys 0..3 of row 0 read outputs 0..3 of call 0
    # and keys 4..7 (and row 1 of Lk = 5: ceil(5/4) = 2 calls per row) start the next calls
    assert [int(x) for x in philox4x32(0, torch.tensor([0]))] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert attention_dropout_keep(0, 1, 1, 1, 4, 0.7).flatten().tolist() == [False, True, True, False]
    keep = attention_dropout_keep(7, 1, 1, 2, 5, 0.5)
    calls = [torch.stack(philox4x32(7, torch.tensor([c]))).flatten() for c in range(4)]
    assert torch.equal(keep[0, 0, 1], torch.cat(calls[2:])[:5] >= 1 << 31)


def test_philox_matches_triton_randint():
    # the attention kernels' dropout draws with tl.randint: below their floor (triton 3.1, whose
    # randint gives other numbers) no kernel does
    skip_below_triton_floor("triton", "attention")
    triton = pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("needs a GPU or the triton interpreter")
    import triton.language as tl

    @triton.jit
    def randint_kernel(out_ptr, seed, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        r = tl.randint(seed, offs.to(tl.int64) * 4099)
        tl.store(out_ptr + offs, r.to(tl.int64, bitcast=False) & 0xFFFFFFFF, mask=offs < n)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    n, seed = 300, 0x1234_5678_9ABC
    out = torch.empty(n, dtype=torch.int64, device=device)
    randint_kernel[(triton.cdiv(n, 128),)](out, seed, n, BLOCK=128)
    want = philox_uint32(seed, torch.arange(n, dtype=torch.int64) * 4099)
    assert torch.equal(out.cpu(), want)

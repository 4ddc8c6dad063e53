"""Triton attention's Hopper-shaped paths against the float64 reference, under the interpreter:
K/V (forward, dQ) and Q/dO (dK/dV) read through TMA descriptors, and the pointer loads the host
falls back to when TMA's constraints fail; dK/dV accumulated in two passes (SPLIT_DKDV); the query
heads of a GQA group walked by parallel dK/dV programs whose float32 partials are summed in a
fixed order; the forward's launch order in L2 sections. Shape legend as in _attention_cases."""

import pytest
import torch
from _attention_cases import DEV, assert_parity, case, randn

pytest.importorskip("triton")

from fusedformer._backends.triton import attention as tri  # noqa: E402
from fusedformer.kernels import attention as fwd_kernels  # noqa: E402
from fusedformer.kernels import attention_backward as bwd_kernels  # noqa: E402
from fusedformer.kernels import attention_common as common  # noqa: E402

# every feature the kernels have, at odd sizes: GQA, causal, window, float bias + dbias, bool
# mask, ALiBi, dropout, strided inputs and Dv != D
FEATURES = [
    ("causal gqa dropout", case(1, 4, 2, 29, 45, 64, causal=True, dropout_p=0.2)),
    ("bias grad window alibi", case(2, 2, 1, 17, 33, 40, bias="float", window=(5, 3), alibi=True)),
    ("bool mask", case(2, 2, 2, 23, 27, 48, bias="bool")),
    ("dv differs strided", case(2, 2, 1, 18, 21, 80, Dv=40, strided=True)),
]


@pytest.fixture
def tma(monkeypatch):
    """A TMA-capable device: returns the list of the tensor groups the launchers made descriptors of."""
    monkeypatch.setattr(common, "tma_capable", lambda device: True)
    made = []

    def recording(use, *tensors):
        if use:
            made.append(tuple(t.shape for t in tensors))
        return common.descriptors(use, *tensors)

    monkeypatch.setattr(fwd_kernels, "descriptors", recording)
    monkeypatch.setattr(bwd_kernels, "descriptors", recording)
    return made


@pytest.mark.parametrize("name,case", FEATURES, ids=[c[0] for c in FEATURES])
def test_tma_descriptor_path(tma, name, case):
    assert_parity(case, torch.bfloat16)
    # the forward's K/V (not with dropout) and dK/dV's Q/dO; dQ reads by pointers
    assert len(tma) >= 1 + (case.shape["dropout_p"] == 0), tma


def test_pointer_fallback_where_tma_cannot_read(tma):
    """Rows of 36 bf16 (72 bytes) are not 16-byte strides: the host keeps the pointer loads; fp32
    too; a grad_output with a strided last dim keeps the backward on pointers, not the forward."""
    assert_parity(case(1, 2, 2, 19, 23, 36, causal=True, bias="float"), torch.bfloat16)
    assert not tma
    assert_parity(case(1, 2, 2, 19, 23, 32), torch.float32)
    assert not tma
    assert_parity(case(2, 2, 1, 18, 21, 80, Dv=40, transpose_out=True), torch.bfloat16)
    assert tma and all(shapes == ((2, 1, 21, 80), (2, 1, 21, 40)) for shapes in tma), tma  # K/V only


def test_tma_eligibility():
    t = torch.randn(2, 3, 5, 40, dtype=torch.bfloat16)
    assert common.tma_eligible(t)
    assert common.tma_eligible(t[:1])  # a size-1 dim's stride is never used
    assert not common.tma_eligible(t.float())
    assert not common.tma_eligible(t.transpose(-1, -2))  # last dim not contiguous
    assert not common.tma_eligible(torch.randn(2, 3, 5, 44, dtype=torch.bfloat16)[..., :40])  # 88-byte rows
    assert not common.tma_eligible(torch.randn(1 + t.numel(), dtype=torch.bfloat16)[1:].view(t.shape))  # base
    assert not common.tma_eligible(t[:, :1].expand(2, 3, 5, 40))  # stride 0
    assert not common.tma_eligible(t[:, :, :0])
    assert not common.use_tma(torch.device("cpu"), False, t)  # no TMA on this device (no monkeypatch)


def test_descriptor_blocks_follow_the_config():
    q = torch.randn(1, 2, 9, 40, dtype=torch.bfloat16)
    (desc,) = common.descriptors(True, q)
    assert list(desc.shape) == [1, 2, 9, 40] and desc.block_shape[3] == 64
    common.set_tma_blocks({"Q": desc, "BLOCK_M": 128, "BLOCK_N": 32})
    assert desc.block_shape == [1, 1, 128, 64]


def _force_dkdv(monkeypatch, **kwargs):
    dq_tuned = bwd_kernels._tuned("dq")
    config = bwd_kernels._config(16, 16, 4, 1, **kwargs)
    monkeypatch.setattr(bwd_kernels, "_tuned", lambda name: (bwd_kernels._attn_bwd_dkdv, config) if name == "dkdv"
                        else dq_tuned)


@pytest.mark.parametrize("name,case", FEATURES, ids=[c[0] for c in FEATURES])
def test_two_pass_dkdv(monkeypatch, name, case):
    """dV, stored, then dK (one accumulator live at a time): the large-tile sm_90 configs."""
    _force_dkdv(monkeypatch, SPLIT_DKDV=True)
    assert_parity(case, torch.float32)


def test_gqa_chunk_rule():
    cpu = torch.device("cpu")  # stands in for 4 SMs: 8 dK/dV programs wanted
    assert tri.gqa_chunks(1, 1, 4, 100, cpu) == 4  # one key block: a program per query head
    assert tri.gqa_chunks(1, 2, 6, 300, cpu) == 2  # 6 programs per chunk: 2 chunks of 3 heads
    assert tri.gqa_chunks(2, 4, 4, 128, cpu) == 1  # the kv heads fill the SMs alone
    assert tri.gqa_chunks(1, 1, 1, 10, cpu) == 1


def _grads(c, dtype):
    args, _, _ = c.make(torch.Generator().manual_seed(5))
    q, k, v, bias, slopes = args
    q, k, v = (t.to(dtype).requires_grad_(True) for t in (q, k, v))
    out = c.ours(q, k, v, bias, slopes, "triton")
    out.backward(torch.ones_like(out))
    return q.grad, k.grad, v.grad


GQA = case(1, 8, 2, 23, 37, 32, causal=True, bias="float", window=(9, 2), alibi=True, dropout_p=0.1)


def test_gqa_heads_in_parallel(monkeypatch):
    """G = 4 query heads per kv head over one key block: four dK/dV programs per kv head, their
    partials summed; the same gradients as one program looping over the group, and every run
    bitwise the same (no atomics)."""
    assert tri.gqa_chunks(1, 2, 4, 37, torch.device(DEV)) > 1 or DEV == "cuda"
    assert_parity(GQA, torch.float32)
    parallel = _grads(GQA, torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(parallel, _grads(GQA, torch.float32)))
    monkeypatch.setattr(tri, "gqa_chunks", lambda *args: 1)
    looped = _grads(GQA, torch.float32)
    for a, b in zip(parallel, looped):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_gqa_two_pass_chunks(monkeypatch):
    _force_dkdv(monkeypatch, SPLIT_DKDV=True)
    assert_parity(GQA, torch.float32)


@pytest.mark.parametrize("section", [1, 3])
def test_forward_in_l2_sections(monkeypatch, section):
    """Launch sections of 1 and 3 (b, head) pairs over 7 of them (a narrower last section), on the
    row-block path and the decode path with key splits."""
    monkeypatch.setattr(fwd_kernels, "l2_section", lambda *args: section)
    assert_parity(case(1, 7, 7, 37, 37, 16, causal=True, bias="float"), torch.float32)
    gen = torch.Generator().manual_seed(section)
    q, k, v = randn(gen, 1, 7, 2, 16).float(), randn(gen, 1, 1, 77, 16).float(), randn(gen, 1, 1, 77, 16).float()
    full = tri.forward(q, k, v, None, True, 0.25, pack_gqa=False, num_splits=1)
    dec = tri.forward(q, k, v, None, True, 0.25, pack_gqa=True, num_splits=3)
    torch.testing.assert_close(dec[0], full[0], atol=2e-6, rtol=2e-6)
    torch.testing.assert_close(dec[1], full[1], atol=2e-6, rtol=2e-6)

"""csrc/attention.cu checked on a CPU through its lane-level emulation (_attention_emulator):

- the PTX fragment model alone: ldmatrix (x1/x2/x4, .trans) + mma.m16n8k16 of random matrices
  equals a plain matmul;
- the kernel in float64 (no rounding) equals reference.py to 1e-12, forward and backward;
- the kernel with its fp16/bf16 roundings, behind the real cuda backend's host code, is within
  the parity rule (2x torch's own error) of the float64 oracle;
- the checks are live: a planted wrong lane mapping, shuffle partner or mask index fails them,
  and the memory model faults on out-of-bounds and misaligned accesses as a GPU would.
"""

import _attention_emulator
import _mma_emulator as isa
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _device_memory import EXACT_CODE
from _emulated_c import EmulatedC, emulated_cuda_attention, exact_attention_backward, exact_attention_forward
from fusedformer import parity, reference, vocabulary

# --------------------------------------------------------------------------------------------
# the PTX ISA model on its own
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout, shape", [(isa.a_layout, (16, 16)), (isa.b_layout, (16, 8)),
                                           (isa.c_layout, (16, 8)), (lambda: isa.ldmatrix_layout(False), (8, 8)),
                                           (lambda: isa.ldmatrix_layout(True), (8, 8))])
def test_fragment_layout_owns_every_element_once(layout, shape):
    row, col = layout()
    owners = np.zeros(shape, int)
    np.add.at(owners, (row, col), 1)
    assert (owners == 1).all()


def _fp16_values(rng, *shape):
    """Random numbers exactly representable in fp16, so every product and the sums of 16 of
    them are exact in float64 and the model must equal the matmul exactly."""
    return rng.standard_normal(shape).astype(np.float16).astype(np.float64)


@pytest.mark.parametrize("b_via", ["x2", "x2.trans", "x1", "x1.trans"])
def test_ldmatrix_mma_equals_matmul(b_via):
    """Three (a leading axis) 16x16 A, 16x8 B and C: A by ldmatrix.x4 from a row-major tile, B by
    ldmatrix from B^T rows (non-trans: the "col" operand) or B rows (.trans), as x2 or two x1."""
    rng = np.random.default_rng(0)
    A, B, C = _fp16_values(rng, 3, 16, 16), _fp16_values(rng, 3, 16, 8), _fp16_values(rng, 3, 16, 8)
    lane = isa.LANES
    pitch = 24  # padded rows, as the kernel's D + 8
    smem_a = np.zeros((3, 16 * pitch))
    smem_a.reshape(3, 16, pitch)[:, :, :16] = A
    # lanes 0-7: rows 0-7 cols 0-7 (a0a1), 8-15: rows 8-15 (a2a3), 16-23 / 24-31: cols 8-15 (a4-a7)
    a = isa.ldmatrix(smem_a, (lane % 16) * pitch + (lane // 16) * 8, 4)
    trans = b_via.endswith(".trans")
    stored = B if trans else np.swapaxes(B, 1, 2)  # .trans reads (k, n) rows, plain reads (n, k) rows
    smem_b = np.zeros((3, stored.shape[1] * pitch))
    smem_b.reshape(3, -1, pitch)[:, :, : stored.shape[2]] = stored
    # b0b1 hold k 0-7, b2b3 k 8-15: that k half is a row block (.trans) or a column block (plain)
    addr = lambda half: (half * 8 + lane % 8) * pitch if trans else (lane % 8) * pitch + half * 8  # noqa: E731
    if b_via.startswith("x2"):
        b = isa.ldmatrix(smem_b, addr(lane // 8 % 2), 2, trans)
    else:
        b = np.concatenate([isa.ldmatrix(smem_b, addr(h), 1, trans) for h in (0, 1)], axis=-2)
    c = C[:, isa.C_ROW, isa.C_COL]
    d = isa.mma_m16n8k16(c, a, b)
    want = (A @ B + C)[:, isa.C_ROW, isa.C_COL]
    np.testing.assert_array_equal(d, want)


def test_ldmatrix_faults_on_misaligned_rows():
    with pytest.raises(AssertionError, match="16-byte aligned"):
        isa.ldmatrix(np.zeros(512), isa.LANES * 16 + 4, 4)


# --------------------------------------------------------------------------------------------
# the kernel in float64 against the reference
# --------------------------------------------------------------------------------------------


def _inputs(dtype, B, H, Hkv, Lq, Lk, D, mask=None, strided=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    if strided:  # (B, L, H, D) buffers seen as (B, H, L, D), as a model's projections give them
        q = torch.randn(B, Lq, H, D, generator=g, dtype=torch.float64).transpose(1, 2)
        k = torch.randn(B, Lk, Hkv, D, generator=g, dtype=torch.float64).transpose(1, 2)
        v = torch.randn(B, Lk, Hkv, D, generator=g, dtype=torch.float64).transpose(1, 2)
    else:
        q, k, v = (torch.randn(B, heads, L, D, generator=g, dtype=torch.float64)
                   for heads, L in ((H, Lq), (Hkv, Lk), (Hkv, Lk)))
    dout = torch.randn(B, H, Lq, D, generator=g, dtype=torch.float64)
    bias = None
    if mask is not None:
        keep = torch.rand(B, 1, Lq, Lk, generator=g) < 0.6
        keep[0, 0, min(3, Lq - 1)] = False  # a fully masked row
        if Lq > 4:
            keep[-1, :, Lq - 1] = False
        if mask == "key_padding":
            keep = torch.ones(B, 1, 1, Lk, dtype=torch.bool)
            keep[-1, ..., Lk // 2:] = False
        # float: a float32-exact additive bias, -inf where masked
        bias = keep if mask in ("bool", "key_padding") else torch.randn(B, 1, Lq, Lk, generator=g).float().double()
        if mask == "float":
            bias = bias.masked_fill(~keep, float("-inf"))
    return [t.to(dtype) for t in (q, k, v, dout)] + [bias]


# (B, H, Hkv, Lq, Lk, D, causal, mask, strided): odd lengths, several query and key tiles
EXACT_CASES = [
    (1, 4, 2, 70, 150, 64, False, None, False),  # GQA, online softmax over 3 key tiles
    (1, 2, 2, 130, 75, 64, True, None, True),  # causal, Lq > Lk, strided q/k/v
    (2, 2, 1, 67, 71, 128, True, "bool", False),  # fully masked rows
    (2, 1, 1, 1, 83, 128, False, "float", False),  # Lq = 1 (decode), -inf entries
    (2, 2, 2, 33, 97, 64, False, "key_padding", False),
]


def _scale(D):
    return D ** -0.5


def _exact_errors(B, H, Hkv, Lq, Lk, D, causal, mask, strided):
    """{output: max error of the float64 kernel against the reference, relative to its scale}."""
    q, k, v, dout, bias = _inputs(torch.float64, B, H, Hkv, Lq, Lk, D, mask, strided)
    scale = _scale(D)
    out, lse = exact_attention_forward(q, k, v, bias, causal, scale)
    want_out, want_lse = reference.attention_forward(q, k, v, bias, causal, scale)
    got = exact_attention_backward(dout, q, k, v, bias, out, lse, causal, scale)
    want = reference.attention_backward(dout, q, k, v, bias, want_out, want_lse, causal, scale)[:3]
    return {name: parity.max_error(x, y) / max(1.0, float(y.nan_to_num(0, 0, 0).abs().max()))
            for name, x, y in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *got), (want_out, want_lse, *want))}


@pytest.mark.parametrize("B, H, Hkv, Lq, Lk, D, causal, mask, strided", EXACT_CASES)
def test_kernel_exact_matches_reference(B, H, Hkv, Lq, Lk, D, causal, mask, strided):
    errors = _exact_errors(B, H, Hkv, Lq, Lk, D, causal, mask, strided)
    assert max(errors.values()) <= 1e-12, errors


# --------------------------------------------------------------------------------------------
# fp16 / bf16: the kernel's roundings behind the real host code, against the parity rule
# --------------------------------------------------------------------------------------------


def _torch_grads(q, k, v, dout, bias, causal, scale):
    """torch's own SDPA in q's dtype (rows with nothing to attend zeroed, fusedformer's contract)."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    live = None
    if bias is not None:
        live = (bias if bias.dtype == torch.bool else bias > float("-inf")).any(-1, keepdim=True)
        bias = (bias | ~live) if bias.dtype == torch.bool else torch.where(live, bias, 0.0).to(q.dtype)
    gqa = q.shape[1] != k.shape[1]
    try:
        out = F.scaled_dot_product_attention(q, k, v, bias, is_causal=causal, scale=scale, enable_gqa=gqa)
    except RuntimeError:  # torch 2.5 refuses a mask with is_causal (on this path): the rule goes into the mask
        if not (causal and bias is not None):
            raise
        upper = torch.ones(bias.shape[-2:], dtype=torch.bool).triu(1)
        bias = bias & ~upper if bias.dtype == torch.bool else bias.masked_fill(upper, float("-inf"))
        out = F.scaled_dot_product_attention(q, k, v, bias, scale=scale, enable_gqa=gqa)
    if live is not None:
        out = out * live
    return (out, *torch.autograd.grad(out, (q, k, v), dout))


# (dtype, B, H, Hkv, Lq, Lk, D, causal, mask, strided)
HALF_CASES = [
    (torch.float16, 2, 2, 1, 70, 90, 64, True, "bool", False),
    (torch.bfloat16, 1, 2, 2, 45, 100, 128, False, "float", False),
    (torch.float16, 2, 2, 2, 1, 130, 128, False, "key_padding", True),
]


def _assert_rounded_parity(q, k, v, dout, bias, causal, scale):
    """The emulated kernel behind the real host code, in q's dtype, against the float64 oracle:
    within 2x torch's own error (parity's rule) for out, dq, dk, dv; lse to float32 precision."""
    with emulated_cuda_attention(q, k, v, dout, bias) as cuda_attention:
        out, lse = cuda_attention.attention_forward(q, k, v, bias, causal, scale)
        ours = (out, *cuda_attention.attention_backward(dout, q, k, v, bias, out, lse, causal, scale)[:3])
    q64, k64, v64, do64 = (t.double() for t in (q, k, v, dout))
    b64 = bias if bias is None or bias.dtype == torch.bool else bias.double()
    want_out, want_lse = reference.attention_forward(q64, k64, v64, b64, causal, scale)
    oracle = (want_out, *reference.attention_backward(do64, q64, k64, v64, b64, want_out, want_lse, causal, scale)[:3])
    theirs = _torch_grads(q, k, v, dout, bias, causal, scale)
    # lse to float32 precision, except on rows whose keys all carry a finfo.min-sized bias: any
    # lse that large gives the same P
    sane = ~(want_lse.isfinite() & (want_lse.abs() > 1e6))
    assert parity.max_error(lse[sane], want_lse[sane]) <= 1e-5 * float(want_lse[sane].nan_to_num(0, 0, 0).abs().max())
    for name, x, want, t in zip(("out", "dq", "dk", "dv"), ours, oracle, theirs):
        err, torch_err = parity.max_error(x, want), parity.max_error(t, want)
        bound = vocabulary.parity_bound(torch_err, q.dtype, float(want.abs().max()))
        assert err <= bound, f"{name}: err {err:.3e} > {bound:.3e} (torch {torch_err:.3e})"


@pytest.mark.parametrize("dtype, B, H, Hkv, Lq, Lk, D, causal, mask, strided", HALF_CASES)
def test_kernel_rounded_within_parity_rule(dtype, B, H, Hkv, Lq, Lk, D, causal, mask, strided):
    q, k, v, dout, bias = _inputs(dtype, B, H, Hkv, Lq, Lk, D, mask, strided)
    bias = bias if bias is None or bias.dtype == torch.bool else bias.float()
    _assert_rounded_parity(q, k, v, dout, bias, causal, _scale(D))


def test_reference_min_filled_row_is_uniform():
    """The oracle of the test below: a row whose every key carries finfo.min attends uniformly, as
    torch (exp(s - lse) gave p = 1 per key there: lse cannot hold log(Lk) next to 3e38)."""
    q, k, v, _, _ = _inputs(torch.float64, 1, 1, 1, 3, 70, 64)
    bias = torch.zeros(1, 1, 3, 70, dtype=torch.float64)
    bias[..., 1, :] = torch.finfo(torch.bfloat16).min
    out, _ = reference.attention_forward(q, k, v, bias, False, 0.125)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, bias, scale=0.125))
    torch.testing.assert_close(out[0, 0, 1], v[0, 0].mean(0))


def test_min_filled_bf16_mask_row():
    q, k, v, dout, _ = _inputs(torch.bfloat16, 1, 2, 2, 9, 70, 64)
    bias = torch.zeros(1, 1, 9, 70)
    bias[..., 2, :] = torch.finfo(torch.bfloat16).min  # a padding row as HF builds it: every key at min
    bias[..., 5, 30:] = torch.finfo(torch.bfloat16).min
    _assert_rounded_parity(q, k, v, dout, bias, False, _scale(64))


# --------------------------------------------------------------------------------------------
# the checks are live: planted defects fail them
# --------------------------------------------------------------------------------------------


def _plant_b_fragment_lanes(mp):
    """The ISA model: lanes 4 and 5 swap their B fragments."""
    swapped = isa.B_ROW.copy()
    swapped[[4, 5]] = isa.B_ROW[[5, 4]]
    mp.setattr(isa, "B_ROW", swapped)


def _plant_shuffle_partner(mp):
    """The kernel: the quad reduction shuffles with lane ^ 8 (another row) instead of lane ^ 2."""
    mp.setattr(_attention_emulator, "shfl_xor", lambda v, m: isa.shfl_xor(v, 8 if m == 2 else m))


def _plant_ldmatrix_addresses(mp):
    """The kernel: in every transposing ldmatrix, lanes 8-15 and 16-23 give each other's rows."""
    def ldsm_x4_t(smem, addr):
        addr = np.broadcast_to(addr, np.broadcast_shapes(np.shape(addr), (32,)))
        return isa.ldmatrix(smem.data, addr[..., np.r_[0:8, 16:24, 8:16, 24:32]], 4, trans=True)
    mp.setattr(_attention_emulator, "ldsm_x4_t", ldsm_x4_t)


def _plant_causal_off_by_one(mp):
    """The kernel: causal keeps key j <= i + 1."""
    score2 = _attention_emulator.score2
    mp.setattr(_attention_emulator, "score2", lambda p, bias, qk, i, j: score2(p, bias, qk, i + 1, j))


PLANTS = {f.__name__.removeprefix("_plant_"): f for f in (
    _plant_b_fragment_lanes, _plant_shuffle_partner, _plant_ldmatrix_addresses, _plant_causal_off_by_one)}


@pytest.mark.parametrize("plant", sorted(PLANTS))
def test_planted_defect_is_caught(plant, monkeypatch):
    PLANTS[plant](monkeypatch)
    errors = _exact_errors(1, 2, 1, 70, 75, 64, True, None, False)
    assert max(errors.values()) > 1e-3, errors


def _launch_forward(q, k, v, Lk=None):
    """One emulated attention_forward launch on contiguous float64 q, k, v."""
    B, H, Lq, D = q.shape
    out, lse = q.new_empty(B, H, Lq, D), q.new_empty(B, H, Lq)
    strides = [s for t in (q, k, v) for s in t.stride()[:3]]
    EmulatedC(lambda: [q, k, v, out, lse]).attention_forward(
        EXACT_CODE, D, q.data_ptr(), k.data_ptr(), v.data_ptr(), strides, out.data_ptr(),
        lse.data_ptr(), B, H, k.shape[1], Lq, k.shape[2] if Lk is None else Lk, 0.125, False, 0, 0, [0] * 4, 0)
    return out


def test_memory_model_faults_like_a_gpu(monkeypatch):
    q, k, v, _, _ = _inputs(torch.float64, 1, 1, 1, 20, 20, 64)
    _launch_forward(q, k, v)
    with pytest.raises(AssertionError, match="out of bounds"):  # Lk beyond the K and V storage
        _launch_forward(q, k, v, Lk=24)
    shifted = torch.cat([q.new_zeros(1), q.flatten()])[1:].view(q.shape)  # 8 bytes off a 16-byte boundary
    with pytest.raises(AssertionError, match="misaligned"):
        _launch_forward(shifted, k, v)
    monkeypatch.setattr(_attention_emulator, "TIG", 0 * _attention_emulator.TIG)  # a quad's lanes share columns
    with pytest.raises(AssertionError, match="stored twice"):
        _launch_forward(q, k, v)

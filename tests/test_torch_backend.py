"""The torch backend against the float64 reference, forward and backward, through the public ops
(backend="torch" vs backend="reference" on the same inputs): odd shapes, strided inputs, bool and
float masks broadcast, causal, GQA, windows, ALiBi, a float mask's gradient, residual norms, every
activation, varlen; the contract where torch's kernels differ (empty rows give 0 and lse -inf, NaN
propagates); what it declines and why; float16/bfloat16 within 2x of torch's own error."""

import math

import fusedformer as ff
import pytest
import torch
from fusedformer import parity, reference, vocabulary
from fusedformer._backends.torch import attention as torch_attention

F64 = torch.float64


def _randn(*shape, gen):
    return torch.randn(*shape, generator=gen, dtype=F64)


def _strided(*shape, gen, pad=3):
    """A (..., N) tensor that is a column slice of a wider buffer: rows not contiguous."""
    return _randn(*shape[:-1], shape[-1] + pad, gen=gen)[..., :shape[-1]]


def _outputs_and_grads(call, tensors, diff, backend, seed=0):
    """call(*tensors, backend=...) and the gradients of a fixed random projection of its output with
    respect to tensors[i] for i in diff."""
    leaves = [t.detach().requires_grad_(i in diff) if isinstance(t, torch.Tensor) and t.is_floating_point()
              else t for i, t in enumerate(tensors)]
    out = call(*leaves, backend=backend)
    first = out[0] if isinstance(out, tuple) else out
    grad_out = torch.randn(first.shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
    grads = torch.autograd.grad(first, [leaves[i] for i in diff], grad_out, allow_unused=True) if diff else ()
    return [first, *grads]


def assert_matches_reference(call, tensors, diff, rtol=1e-9, atol=1e-10):
    want = _outputs_and_grads(call, tensors, diff, "reference")
    got = _outputs_and_grads(call, tensors, diff, "torch")
    for name, g, w in zip(["out"] + [f"d{i}" for i in diff], got, want):
        assert g is not None and w is not None, name
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol, equal_nan=True, msg=name)


# --------------------------------------------------------------------------------------------
# softmax, norms, linear_act in float64
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [0, 1, 2])
def test_softmax(dim):
    gen = torch.Generator().manual_seed(1)
    x = _randn(5, 13, 7, gen=gen).transpose(0, 2) * 3  # strided (7, 13, 5)
    assert_matches_reference(lambda x, backend: ff.softmax(x, dim, backend=backend), [x], [0])


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("affine", [False, True])
def test_layer_norm(residual, affine):
    gen = torch.Generator().manual_seed(2)
    x, r = _strided(3, 5, 37, gen=gen), _randn(3, 5, 37, gen=gen)
    w, b = 1 + 0.1 * _randn(37, gen=gen), 0.1 * _randn(37, gen=gen)

    def call(x, r, w, b, backend):
        out = ff.layer_norm(x, (37,), w if affine else None, b if affine else None, 1e-5,
                            residual=r if residual else None, backend=backend)
        return out[0] * 1.3 + out[1] * 0.7 if residual else out  # both outputs reach the gradients

    assert_matches_reference(call, [x, r, w, b], [0, 1, 2, 3] if residual and affine else [0, 2, 3] if affine else [0])


@pytest.mark.parametrize("residual", [False, True])
def test_rms_norm(residual):
    gen = torch.Generator().manual_seed(3)
    x, r, w = _strided(4, 3, 41, gen=gen), _randn(4, 3, 41, gen=gen), 1 + 0.1 * _randn(41, gen=gen)

    def call(x, r, w, backend):
        out = ff.rms_norm(x, (41,), w, 1e-6, residual=r if residual else None, backend=backend)
        return out[0] * 1.3 + out[1] * 0.7 if residual else out

    assert_matches_reference(call, [x, r, w], [0, 1, 2] if residual else [0, 2])


def test_norms_with_float32_weight_on_bfloat16_input_follow_the_reference():
    # a weight of another dtype is applied in float32, unrounded, as the reference does
    gen = torch.Generator().manual_seed(4)
    x = _randn(6, 33, gen=gen).bfloat16()
    w, b = (1 + 0.1 * _randn(33, gen=gen)).float(), (0.1 * _randn(33, gen=gen)).float()
    for op, args in ((ff.layer_norm, (w, b)), (ff.rms_norm, (w,))):
        got, want = op(x, (33,), *args, backend="torch"), op(x, (33,), *args, backend="reference")
        assert got.dtype == torch.bfloat16 and torch.equal(got, want)


@pytest.mark.parametrize("activation", vocabulary.FUSED_ACTIVATIONS)
@pytest.mark.parametrize("bias", [True, False])
def test_linear_act(activation, bias):
    gen = torch.Generator().manual_seed(5)
    x, w, b = _strided(2, 9, 24, gen=gen), _randn(2 * 19, 24, gen=gen) / 5, 0.1 * _randn(2 * 19, gen=gen)

    def call(x, w, b, backend):
        return ff.linear_act(x, w, b if bias else None, activation, backend=backend)

    assert_matches_reference(call, [x, w, b], [0, 1, 2] if bias else [0, 1])
    with torch.no_grad():  # the inference entry, no preact kept
        torch.testing.assert_close(call(x, w, b, "torch"), call(x, w, b, "reference"), rtol=1e-9, atol=1e-10)


def test_linear_act_table_recomputes_a_missing_preact_and_never_aliases():
    from fusedformer._backends.torch import linear_act

    gen = torch.Generator().manual_seed(6)
    x, w, b, dy = _randn(5, 8, gen=gen), _randn(6, 8, gen=gen), _randn(6, gen=gen), _randn(5, 3, gen=gen)
    y, preact = linear_act.linear_act_forward(x, w, b, "identity")
    assert y.data_ptr() != preact.data_ptr()
    saved = linear_act.linear_act_backward(dy, x, w, b, linear_act.linear_act_forward(x, w, b, "swiglu")[1], "swiglu")
    recomputed = linear_act.linear_act_backward(dy, x, w, b, None, "swiglu")
    want = reference.linear_act_backward(dy, x, w, b, None, "swiglu")
    for s, r, e in zip(saved, recomputed, want):
        torch.testing.assert_close(s, e, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(r, e, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# attention in float64
# --------------------------------------------------------------------------------------------

# (B, H, Hkv, Lq, Lk, D, causal, mask kind, window, alibi, strided)
ATTENTION = {
    "plain": (2, 3, 3, 37, 37, 40, False, None, None, None, False),
    "causal-cross-longer-keys": (1, 4, 4, 13, 45, 64, True, None, None, None, False),
    "causal-cross-longer-queries": (1, 2, 2, 29, 11, 16, True, None, None, None, False),
    "gqa-causal": (2, 6, 2, 21, 21, 32, True, None, None, None, False),
    "bool-key-padding": (2, 3, 3, 19, 37, 24, False, "key_padding", None, None, False),
    "bool-random-causal": (2, 2, 2, 17, 23, 8, True, "bool", None, None, False),
    "float-mask": (2, 2, 1, 17, 33, 32, False, "float", None, None, False),
    "float-mask-grad": (2, 2, 2, 17, 33, 32, True, "float_grad", None, None, False),
    "window-alibi-gqa": (2, 4, 2, 25, 25, 16, True, None, (5, 0), "heads", False),
    "alibi-per-batch": (2, 3, 3, 9, 14, 8, False, "key_padding", None, "batch", False),
    "window-both-sides": (1, 2, 2, 30, 30, 8, False, None, (3, 4), None, False),
    "strided": (2, 3, 3, 23, 31, 40, True, None, None, None, True),
    "decode": (3, 4, 2, 1, 50, 64, False, "key_padding", None, None, False),
}


def _attention_inputs(B, H, Hkv, Lq, Lk, D, mask_kind, alibi, strided, gen):
    if strided:  # (B, L, H, D) buffers seen as (B, H, L, D)
        q = _randn(B, Lq, H, D, gen=gen).transpose(1, 2)
        k, v = (_randn(B, Lk, Hkv, D + 8, gen=gen).transpose(1, 2)[..., :D] for _ in range(2))
    else:
        q, k, v = _randn(B, H, Lq, D, gen=gen), _randn(B, Hkv, Lk, D, gen=gen), _randn(B, Hkv, Lk, D, gen=gen)
    mask = None
    if mask_kind == "key_padding":
        mask = torch.ones(B, 1, 1, Lk, dtype=torch.bool)
        mask[-1, ..., Lk // 2:] = False
    elif mask_kind == "bool":
        mask = torch.rand(B, 1, Lq, Lk, generator=gen) < 0.6
        mask[..., 0] = True
    elif mask_kind in ("float", "float_grad"):
        mask = _randn(1, H, Lq, Lk, gen=gen)
    slopes = None
    if alibi == "heads":
        slopes = torch.rand(H, generator=gen, dtype=F64)
    elif alibi == "batch":
        slopes = torch.rand(B, H, generator=gen, dtype=F64)
    return q, k, v, mask, slopes


@pytest.mark.parametrize("case", list(ATTENTION))
def test_attention(case):
    B, H, Hkv, Lq, Lk, D, causal, mask_kind, window, alibi, strided = ATTENTION[case]
    q, k, v, mask, slopes = _attention_inputs(B, H, Hkv, Lq, Lk, D, mask_kind, alibi, strided,
                                              torch.Generator().manual_seed(7))

    def call(q, k, v, mask, backend):
        return ff.scaled_dot_product_attention(q, k, v, mask, is_causal=causal, enable_gqa=H != Hkv,
                                               window_size=window, alibi_slopes=slopes, backend=backend)

    diff = [0, 1, 2, 3] if mask_kind == "float_grad" else [0, 1, 2]
    assert_matches_reference(call, [q, k, v, mask], diff)


def _dead_rows_case(gen):
    q, k, v = _randn(2, 3, 11, 16, gen=gen), _randn(2, 3, 13, 16, gen=gen), _randn(2, 3, 13, 16, gen=gen)
    mask = torch.rand(2, 1, 11, 13, generator=gen) < 0.5
    mask[0, 0, 3] = False
    mask[1, 0, 10] = False
    return q, k, v, mask


def test_rows_with_nothing_to_attend_give_zeros_zero_grads_and_lse_minus_inf():
    q, k, v, mask = _dead_rows_case(torch.Generator().manual_seed(8))
    assert_matches_reference(lambda q, k, v, m, backend: ff.scaled_dot_product_attention(q, k, v, m, backend=backend),
                             [q, k, v, mask], [0, 1, 2])
    out, lse = torch_attention.attention_forward(q, k, v, mask, False, 0.25)
    dead = ~mask.any(-1).expand(-1, 3, -1)
    assert dead.sum() == 6
    assert torch.equal(out[dead], torch.zeros_like(out[dead])) and torch.isneginf(lse[dead]).all()
    assert torch.isfinite(lse[~dead]).all()
    want = reference.attention_forward(q, k, v, mask, False, 0.25)[1]
    torch.testing.assert_close(lse, want, rtol=1e-12, atol=1e-12)
    # a window can empty rows too: queries past the keys' end with a left window of 2
    q2, k2 = q[:, :, :11], k[:, :, :4]
    _, lse2 = torch_attention.attention_forward(q2, k2, v[:, :, :4], None, False, 0.25, window=(2, 0))
    assert torch.isneginf(lse2[..., 6:]).all() and torch.isfinite(lse2[..., :6]).all()


def test_a_live_row_whose_lse_is_exactly_zero_is_kept():
    # one key, score 0: lse = log(1) = 0 exactly, the value the kernel also writes for empty rows
    q, k, v = torch.zeros(1, 1, 2, 4, dtype=F64), torch.ones(1, 1, 1, 4, dtype=F64), torch.randn(1, 1, 1, 4, dtype=F64)
    q[0, 0, 1] = 1.0
    out, lse = torch_attention.attention_forward(q, k, v, None, False, 0.5)
    assert lse[0, 0, 0] == 0.0 and torch.equal(out[0, 0], v[0, 0].expand(2, 4))


def test_nan_in_gives_nan_out():
    gen = torch.Generator().manual_seed(9)
    q, k, v = _randn(1, 2, 5, 8, gen=gen), _randn(1, 2, 6, 8, gen=gen), _randn(1, 2, 6, 8, gen=gen)
    q[0, 0, 1, 0] = float("nan")
    out, lse = torch_attention.attention_forward(q, k, v, None, False, 0.3)
    ref_out, ref_lse = reference.attention_forward(q, k, v, None, False, 0.3)
    assert torch.equal(torch.isnan(out), torch.isnan(ref_out)) and torch.isnan(out[0, 0, 1]).all()
    assert torch.equal(torch.isnan(lse), torch.isnan(ref_lse))
    k[0, 1, 2, 3] = float("nan")
    out = ff.scaled_dot_product_attention(q, k, v, backend="torch")
    assert torch.isnan(out[0, 1]).all() and torch.isnan(out[0, 0, 1]).all() and not torch.isnan(out[0, 0, 0]).any()
    for op, args in ((ff.softmax, ()), (ff.layer_norm, ((8,),)), (ff.rms_norm, ((8,),))):
        y = op(q[0, 0], *args, backend="torch")
        assert torch.isnan(y[1]).all() and not torch.isnan(y[0]).any()
    assert torch.isnan(ff.linear_act(q[0, 0], torch.randn(3, 8, dtype=F64), backend="torch")[1]).all()


def test_declines_what_torch_cannot_compute_exactly():
    q = torch.randn(1, 2, 3, 8)
    assert "Philox" in torch_attention.unsupported(q, q, q, None, False, 1.0, 0.1)
    assert "value head dim" in torch_attention.unsupported(q, q, torch.randn(1, 2, 3, 4), None, False, 1.0)
    assert "meta" in torch_attention.unsupported(q.to("meta"), q.to("meta"), q.to("meta"), None, False, 1.0)
    with pytest.raises(ff.BackendUnavailableError, match="Philox"):
        ff.scaled_dot_product_attention(q, q, q, dropout_p=0.1, backend="torch")
    assert torch_attention.unsupported(q, q, q, None, True, 1.0, window=(4, 0), alibi_slopes=torch.ones(2)) is None


# --------------------------------------------------------------------------------------------
# varlen attention in float64
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal,window", [(True, None), (False, (3, 2))])
def test_varlen_attention(causal, window):
    gen = torch.Generator().manual_seed(10)
    lens_q, lens_k = [5, 0, 9, 3], [7, 4, 9, 1]
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32)
    q = _randn(sum(lens_q), 4, 16, gen=gen)
    k, v = _randn(sum(lens_k), 2, 16, gen=gen), _randn(sum(lens_k), 2, 16, gen=gen)
    slopes = torch.rand(4, 4, generator=gen, dtype=F64)

    def call(q, k, v, backend):
        return ff.varlen_attention(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), is_causal=causal,
                                   window_size=window, alibi_slopes=slopes, backend=backend)

    assert_matches_reference(call, [q, k, v], [0, 1, 2])


# --------------------------------------------------------------------------------------------
# low precision: the parity rule (within 2x of torch's own error against the float64 oracle)
# --------------------------------------------------------------------------------------------

LOW_PRECISION_CASES = [c for c in parity.default_cases(quick=True)
                       if c.op != "softmax" or c.shape["N"] < 1000]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_low_precision_within_twice_torch_error(dtype):
    rows = [r for case in LOW_PRECISION_CASES for r in parity.run_case(case, "torch", dtype)]
    assert rows and not parity.failures(rows), parity.format_table(parity.failures(rows))
    assert all(math.isfinite(r["err"]) for r in rows)

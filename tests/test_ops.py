"""The public functional API: signatures, validation errors, backend selection, edge cases."""

import inspect

import fusedformer as ff
import pytest
import torch
import torch.nn.functional as F
from fusedformer import backends


def test_sdpa_signature_is_torchs():
    # torch's is a builtin without an introspectable signature: its documented one
    theirs = {"query": inspect.Parameter.empty, "key": inspect.Parameter.empty, "value": inspect.Parameter.empty,
              "attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}
    ours = inspect.signature(ff.scaled_dot_product_attention).parameters
    positional = [p for p in ours.values() if p.kind != p.KEYWORD_ONLY]
    assert {p.name: p.default for p in positional} == theirs
    assert list(theirs) == [p.name for p in positional]
    assert {"backend", "window_size", "alibi_slopes"} <= {p.name for p in ours.values() if p.kind == p.KEYWORD_ONLY}


@pytest.mark.parametrize("fn,params", [
    (ff.softmax, ["x", "dim", "backend"]),
    (ff.layer_norm, ["x", "normalized_shape", "weight", "bias", "eps", "residual", "backend"]),
    (ff.rms_norm, ["x", "normalized_shape", "weight", "eps", "residual", "backend"]),
    (ff.linear_act, ["x", "weight", "bias", "activation", "backend"]),
])
def test_public_signatures(fn, params):
    assert list(inspect.signature(fn).parameters)[:len(params)] == params


def test_feed_forward_signature():
    names = list(inspect.signature(ff.feed_forward).parameters)
    assert names[:6] == ["x", "w1", "b1", "w2", "b2", "activation"] and "backend" in names


# --------------------------------------------------------------------------------------------
# bad input: a clear error naming the argument
# --------------------------------------------------------------------------------------------

q4 = torch.randn(2, 4, 5, 8)
k4 = torch.randn(2, 4, 6, 8)
v4 = torch.randn(2, 4, 6, 8)
x2 = torch.randn(3, 8)

BAD_CALLS = [
    ("softmax x type", lambda: ff.softmax([1.0, 2.0]), TypeError, "x"),
    ("softmax int dtype", lambda: ff.softmax(torch.ones(3, dtype=torch.int64)), TypeError, "dtype"),
    ("softmax dim range", lambda: ff.softmax(x2, dim=2), ValueError, "dim"),
    ("softmax dim type", lambda: ff.softmax(x2, dim=1.0), TypeError, "dim"),
    ("ln shape", lambda: ff.layer_norm(x2, (7,)), ValueError, "normalized_shape"),
    ("ln shape type", lambda: ff.layer_norm(x2, "8"), TypeError, "normalized_shape"),
    ("ln weight shape", lambda: ff.layer_norm(x2, (8,), torch.ones(7)), ValueError, "weight"),
    ("ln bias shape", lambda: ff.layer_norm(x2, (8,), None, torch.ones(9)), ValueError, "bias"),
    ("ln eps", lambda: ff.layer_norm(x2, (8,), eps=-1.0), ValueError, "eps"),
    ("ln residual shape", lambda: ff.layer_norm(x2, (8,), residual=torch.ones(2, 8)), ValueError, "residual"),
    ("rms weight dtype", lambda: ff.rms_norm(x2, (8,), torch.ones(8, dtype=torch.int32)), TypeError, "weight"),
    ("rms eps type", lambda: ff.rms_norm(x2, (8,), eps="1"), TypeError, "eps"),
    ("linear activation", lambda: ff.linear_act(x2, torch.ones(4, 8), activation="tanh"), ValueError, "activation"),
    ("linear weight shape", lambda: ff.linear_act(x2, torch.ones(4, 7)), ValueError, "weight"),
    ("linear weight dims", lambda: ff.linear_act(x2, torch.ones(8)), ValueError, "weight"),
    ("linear bias shape", lambda: ff.linear_act(x2, torch.ones(4, 8), torch.ones(3)), ValueError, "bias"),
    ("linear dtype mix", lambda: ff.linear_act(x2, torch.ones(4, 8, dtype=torch.float64)), TypeError, "weight"),
    ("linear gated odd", lambda: ff.linear_act(x2, torch.ones(5, 8), activation="swiglu"), ValueError, "even"),
    ("ffn w2 shape", lambda: ff.feed_forward(x2, torch.ones(6, 8), None, torch.ones(8, 5), None), ValueError, "w2"),
    ("ffn w1 type", lambda: ff.feed_forward(x2, None, None, torch.ones(8, 6), None), TypeError, "w1"),
    ("sdpa query type", lambda: ff.scaled_dot_product_attention(1, k4, v4), TypeError, "query"),
    ("sdpa int dtype", lambda: ff.scaled_dot_product_attention(q4.long(), k4, v4), TypeError, "query"),
    ("sdpa dtype mix", lambda: ff.scaled_dot_product_attention(q4, k4.double(), v4), TypeError, "key"),
    ("sdpa 1-D", lambda: ff.scaled_dot_product_attention(torch.ones(8), k4, v4), ValueError, "query"),
    ("sdpa head dim", lambda: ff.scaled_dot_product_attention(q4, torch.randn(2, 4, 6, 7), v4), ValueError, "head dim"),
    ("sdpa kv length", lambda: ff.scaled_dot_product_attention(q4, k4, torch.randn(2, 4, 7, 8)), ValueError, "length"),
    ("sdpa batch", lambda: ff.scaled_dot_product_attention(q4, torch.randn(3, 4, 6, 8), torch.randn(3, 4, 6, 8)),
     ValueError, "batch"),
    ("sdpa heads no gqa", lambda: ff.scaled_dot_product_attention(q4, k4[:, :2], v4[:, :2]), ValueError, "enable_gqa"),
    ("sdpa gqa divisible", lambda: ff.scaled_dot_product_attention(q4, k4[:, :3], v4[:, :3], enable_gqa=True),
     ValueError, "multiple"),
    ("sdpa kv heads", lambda: ff.scaled_dot_product_attention(q4, k4, v4[:, :3], enable_gqa=True), ValueError, "heads"),
    ("sdpa mask shape", lambda: ff.scaled_dot_product_attention(q4, k4, v4, torch.ones(5, 5, dtype=torch.bool)),
     ValueError, "attn_mask"),
    ("sdpa mask dims", lambda: ff.scaled_dot_product_attention(q4, k4, v4, torch.ones(1, 1, 2, 4, 5, 6)),
     ValueError, "attn_mask"),
    ("sdpa mask dtype", lambda: ff.scaled_dot_product_attention(q4, k4, v4, torch.ones(5, 6, dtype=torch.int32)),
     TypeError, "attn_mask"),
    ("sdpa mask type", lambda: ff.scaled_dot_product_attention(q4, k4, v4, [[True]]), TypeError, "attn_mask"),
    ("sdpa dropout high", lambda: ff.scaled_dot_product_attention(q4, k4, v4, dropout_p=1.5), ValueError, "dropout_p"),
    ("sdpa dropout low", lambda: ff.scaled_dot_product_attention(q4, k4, v4, dropout_p=-0.1), ValueError, "dropout_p"),
    ("sdpa causal type", lambda: ff.scaled_dot_product_attention(q4, k4, v4, is_causal=1), TypeError, "is_causal"),
    ("sdpa scale type", lambda: ff.scaled_dot_product_attention(q4, k4, v4, scale="x"), TypeError, "scale"),
    ("sdpa window", lambda: ff.scaled_dot_product_attention(q4, k4, v4, window_size=(2,)), TypeError, "window_size"),
    ("sdpa window neg", lambda: ff.scaled_dot_product_attention(q4, k4, v4, window_size=(-2, 0)), ValueError,
     "window_size"),
    ("sdpa alibi shape", lambda: ff.scaled_dot_product_attention(q4, k4, v4, alibi_slopes=torch.ones(3)), ValueError,
     "alibi_slopes"),
    ("unknown backend", lambda: ff.softmax(x2, backend="cudnn"), ValueError, "backend"),
    ("backend type", lambda: ff.softmax(x2, backend=1), TypeError, "backend"),
]


@pytest.mark.parametrize("name,call,exc,needle", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_input_raises_clear_error(name, call, exc, needle):
    with pytest.raises(exc, match=needle):
        call()


def test_unavailable_backend_error_lists_every_backend(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ff.BackendUnavailableError) as info:
        ff.softmax(x2, backend="cuda")
    text = str(info.value)
    for name in backends.BACKENDS:
        assert f"  {name}" in text
    assert "reference  available" in text
    assert "cuda       unavailable:" in text


# --------------------------------------------------------------------------------------------
# selection order: argument > use_backend > FUSEDFORMER_BACKEND > auto
# --------------------------------------------------------------------------------------------


def test_selection_order(monkeypatch):
    monkeypatch.delenv("FUSEDFORMER_BACKEND", raising=False)
    assert backends.requested_backend() == "auto"
    monkeypatch.setenv("FUSEDFORMER_BACKEND", "triton")
    assert backends.requested_backend() == "triton"
    with ff.use_backend("reference"):
        assert backends.requested_backend() == "reference"
        with ff.use_backend("cuda"):
            assert backends.requested_backend() == "cuda"
        assert backends.requested_backend() == "reference"
        assert backends.requested_backend("triton") == "triton"
    monkeypatch.setenv("FUSEDFORMER_BACKEND", "bogus")
    with pytest.raises(ValueError, match="FUSEDFORMER_BACKEND"):
        backends.requested_backend()


def test_auto_runs_torch_then_reference_on_cpu(monkeypatch):
    monkeypatch.delenv("FUSEDFORMER_BACKEND", raising=False)
    assert backends.select("softmax", "cpu", (x2, -1)) == "torch"
    q = torch.randn(1, 2, 3, 4)
    # dropout: torch's stream is not fusedformer's Philox stream, so the reference runs it
    assert backends.select("attention", "cpu", (q, q, q, None, False, 0.5, 0.1, None, (-1, -1), None)) == "reference"


def test_use_backend_rejects_unknown_name():
    with pytest.raises(ValueError, match="unknown backend"):
        with ff.use_backend("fast"):
            pass


def test_available_backends_on_cpu_include_reference():
    assert "reference" in ff.available_backends("cpu")
    assert "cuda" not in ff.available_backends("cpu")


# --------------------------------------------------------------------------------------------
# edge cases: empty tensors, NaN, broadcasting, layouts
# --------------------------------------------------------------------------------------------


def test_empty_tensors_work_forward_and_backward():
    x = torch.randn(0, 8, requires_grad=True)
    ff.softmax(x).sum().backward()
    assert x.grad.shape == x.shape
    w = torch.randn(8, requires_grad=True)
    ff.layer_norm(x, (8,), w).sum().backward()
    assert torch.equal(w.grad, torch.zeros(8))
    assert ff.rms_norm(torch.randn(2, 0, 8), (8,)).shape == (2, 0, 8)
    assert ff.linear_act(torch.randn(0, 8), torch.randn(6, 8), activation="swiglu").shape == (0, 3)
    q = torch.randn(1, 2, 3, 4, requires_grad=True)
    k = torch.randn(1, 2, 0, 4, requires_grad=True)
    v = torch.randn(1, 2, 0, 5, requires_grad=True)
    out = ff.scaled_dot_product_attention(q, k, v)
    assert out.shape == (1, 2, 3, 5) and (out == 0).all()
    out.sum().backward()
    assert (q.grad == 0).all()


def test_nan_propagates_through_every_op():
    x = torch.randn(4, 8)
    x[1, 3] = float("nan")
    assert torch.isnan(ff.softmax(x)[1]).all() and not torch.isnan(ff.softmax(x)[0]).any()
    assert torch.isnan(ff.layer_norm(x, (8,))[1]).all() and not torch.isnan(ff.layer_norm(x, (8,))[2]).any()
    assert torch.isnan(ff.rms_norm(x, (8,))[1]).all()
    assert torch.isnan(ff.linear_act(x, torch.randn(6, 8))[1]).all()
    q = torch.randn(1, 1, 4, 8)
    q[0, 0, 1, 0] = float("nan")
    out = ff.scaled_dot_product_attention(q, torch.randn(1, 1, 5, 8), torch.randn(1, 1, 5, 8))
    assert torch.isnan(out[0, 0, 1]).all() and not torch.isnan(out[0, 0, 0]).any()


def test_softmax_0d_and_other_dims():
    assert ff.softmax(torch.tensor(3.0)).item() == 1.0
    x = torch.randn(3, 4, 5)
    for dim in range(-3, 3):
        torch.testing.assert_close(ff.softmax(x, dim), torch.softmax(x, dim))


def test_sdpa_layouts_and_broadcast_masks():
    # 3-D (N, L, E), 5-D batch dims, transposed (B, L, H, D) storage, broadcast masks
    q3, k3, v3 = torch.randn(3, 5, 8), torch.randn(3, 6, 8), torch.randn(3, 6, 4)
    torch.testing.assert_close(ff.scaled_dot_product_attention(q3, k3, v3), F.scaled_dot_product_attention(q3, k3, v3))
    q5, k5, v5 = torch.randn(2, 3, 2, 5, 8), torch.randn(2, 3, 2, 6, 8), torch.randn(2, 3, 2, 6, 8)
    m5 = torch.randn(3, 1, 5, 6)
    torch.testing.assert_close(ff.scaled_dot_product_attention(q5, k5, v5, m5),
                               F.scaled_dot_product_attention(q5, k5, v5, m5))
    qt = torch.randn(2, 5, 4, 8).transpose(1, 2)
    kt = torch.randn(2, 6, 4, 8).transpose(1, 2)
    pad = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])[:, None, None, :]
    torch.testing.assert_close(ff.scaled_dot_product_attention(qt, kt, kt, pad),
                               F.scaled_dot_product_attention(qt, kt, kt, pad))


def test_sdpa_float_mask_gets_its_gradient():
    q, k, v = (torch.randn(1, 2, 5, 8, requires_grad=True) for _ in range(3))
    mask = torch.randn(1, 2, 5, 5, requires_grad=True)
    ff.scaled_dot_product_attention(q, k, v, mask).sum().backward()
    ours = mask.grad.clone()
    mask.grad = None
    F.scaled_dot_product_attention(q, k, v, mask).sum().backward()
    torch.testing.assert_close(ours, mask.grad)


def test_sdpa_causal_with_mask_combines_both():
    q, k, v = torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8)
    pad = torch.tensor([True, True, True, False])
    tri = torch.ones(4, 4, dtype=torch.bool).tril()
    torch.testing.assert_close(ff.scaled_dot_product_attention(q, k, v, pad, is_causal=True),
                               F.scaled_dot_product_attention(q, k, v, pad & tri))


def test_sdpa_dropout_reproducible_under_manual_seed():
    q, k, v = torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    torch.manual_seed(7)
    a = ff.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    torch.manual_seed(7)
    b = ff.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    c = ff.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_norm_residual_variant_returns_the_sum():
    x, r = torch.randn(3, 5, 8), torch.randn(3, 5, 8)
    w = torch.randn(8)
    out, h = ff.layer_norm(x, (8,), w, residual=r)
    torch.testing.assert_close(h, x + r)
    torch.testing.assert_close(out, F.layer_norm(x + r, (8,), w))
    out, h = ff.rms_norm(x, (8,), w, eps=1e-6, residual=r)
    torch.testing.assert_close(out, F.rms_norm(x + r, (8,), w, eps=1e-6))


def test_norm_multi_dim_normalized_shape_and_strided_rows():
    x = torch.randn(4, 3, 5)
    w = torch.randn(3, 5)
    torch.testing.assert_close(ff.layer_norm(x, (3, 5), w), F.layer_norm(x, (3, 5), w))
    wide = torch.randn(6, 16)[:, :8]  # row stride 16, unit column stride
    torch.testing.assert_close(ff.rms_norm(wide, (8,)), F.rms_norm(wide, (8,)))


def test_rms_norm_default_eps_is_dtype_eps():
    x = torch.randn(4, 8) * 1e-4
    torch.testing.assert_close(ff.rms_norm(x, (8,)), F.rms_norm(x, (8,)))

"""Triton flash attention (forward, backward, decode, varlen) against the float64 reference.

Runs the kernels under the triton interpreter on CPU (tiny shapes) and compiled on a GPU. The
pass rule is fusedformer.parity's: err <= 2 * torch_err + floor[dtype] * max(1, max|oracle|),
torch_err being PyTorch's own SDPA in the same dtype against the float64 reference.
Shape legend: B batch, H/Hkv heads, Lq/Lk lengths, D/Dv head dims.
"""

import math

import fusedformer as ff
import pytest
import torch
import torch.nn.functional as F
from _testing import assert_compiles_without_interpreter, assert_triton_parity
from fusedformer import backends, parity, reference, vocabulary

pytest.importorskip("triton")

from fusedformer._backends.triton import attention as tri  # noqa: E402
from fusedformer._backends.triton import varlen_attention as tri_varlen  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ALL_OUTPUTS = ("out", "d0", "d1", "d2", "d3")


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


DEV = _device()  # the interpreter on CPU, compiled kernels on a GPU


def _randn(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(DEV)


def _torch_sdpa(q, k, v, bias, causal, window, alibi, dropout_p):
    """PyTorch's own attention on the same inputs: F.sdpa with every rule folded into one mask."""
    Lq, Lk = q.shape[-2], k.shape[-2]
    if dropout_p > 0 or q.shape[-1] == 0:  # torch's dropout stream differs: its math in the reference
        return reference.attention_forward(q, k, v, bias, causal, 1 / math.sqrt(q.shape[-1]), dropout_p,
                                           torch.randint(0, 2**62, ()).item(), window, alibi)[0]
    plain = bias is None and not causal and window == (-1, -1) and alibi is None
    mask = None if plain else vocabulary.attention_mask_bias(Lq, Lk, bias, causal, window, alibi, q.device, q.dtype)
    return F.scaled_dot_product_attention(q, k, v, mask, enable_gqa=True)


def _case(B, H, Hkv, Lq, Lk, D, Dv=None, *, causal=False, bias=None, window=(-1, -1), alibi=False,
          dropout_p=0.0, strided=False, transpose_out=False):
    """A parity.Case for ff.scaled_dot_product_attention. ``bias``: None, 'float' (1, H, Lq, Lk),
    'pad' float (B, 1, 1, Lk), 'rows' float (1, 1, Lq, 1), 'cols' float (1, H, 1, Lk), 'bool'
    (B, 1, Lq, Lk) or 'boolpad' (B, 1, 1, Lk).
    ``strided`` reads q/k/v from (B, L, H, D) storage; ``transpose_out`` hands the backward a
    non-contiguous grad_output."""
    Dv = Dv or D
    shapes = {"float": (1, H, Lq, Lk), "pad": (B, 1, 1, Lk), "rows": (1, 1, Lq, 1), "cols": (1, H, 1, Lk),
              "bool": (B, 1, Lq, Lk),
              "boolpad": (B, 1, 1, Lk)}

    def make(g):
        args = [_randn(g, B, H, Lq, D), _randn(g, B, Hkv, Lk, D), _randn(g, B, Hkv, Lk, Dv)]
        diff = [0, 1, 2]
        if bias is None:
            args.append(None)
        elif bias.startswith("bool"):
            m = torch.rand(*shapes[bias], generator=g) > 0.3
            args.append(m)
        else:
            args.append(_randn(g, *shapes[bias]))
            diff.append(3)
        slopes_shape = (B, H) if alibi == "batch" else (H,)
        args.append(torch.rand(*slopes_shape, generator=g, dtype=torch.float64) if alibi else None)
        return args, {}, diff

    def view(t):
        return t.transpose(1, 2).contiguous().transpose(1, 2) if strided else t

    def finish(out):
        return out.transpose(-1, -2) if transpose_out else out

    def ours(q, k, v, m, slopes, backend):
        torch.manual_seed(1234)  # the same dropout seed for the oracle and the kernel
        return finish(ff.scaled_dot_product_attention(
            view(q), view(k), view(v), m, dropout_p=dropout_p, is_causal=causal, enable_gqa=True,
            window_size=window, alibi_slopes=slopes, backend=backend))

    def theirs(q, k, v, m, slopes):
        torch.manual_seed(1234)
        return finish(_torch_sdpa(q, k, v, m, causal, window, slopes, dropout_p))

    shape = dict(B=B, H=H, Hkv=Hkv, Lq=Lq, Lk=Lk, D=D, Dv=Dv, causal=causal, bias=bias, window=window,
                 alibi=alibi, dropout_p=dropout_p, strided=strided)
    return parity.Case("attention", shape, make, ours, theirs)


def _assert_parity(case, dtype):
    return assert_triton_parity(case, dtype, _device())


# (name, case) pairs: odd lengths, non-power-of-two head dims, cross attention, every mask kind
LOW = [torch.float32, torch.float16, torch.bfloat16]
CASES = [
    ("plain odd", _case(2, 3, 3, 37, 29, 40)),
    ("causal gqa", _case(1, 4, 2, 29, 45, 64, causal=True)),
    ("causal lq>lk", _case(1, 2, 1, 33, 19, 32, causal=True)),
    ("float bias grad", _case(2, 2, 2, 17, 33, 32, bias="float")),
    ("key padding bias grad", _case(2, 2, 1, 19, 23, 16, bias="pad", causal=True)),
    ("col bias grad", _case(1, 2, 2, 21, 18, 24, bias="cols", window=(4, 6))),
    ("bool key padding", _case(2, 2, 2, 15, 22, 16, bias="boolpad", causal=True)),
    ("bool mask", _case(2, 2, 2, 23, 27, 48, bias="bool")),
    ("window alibi", _case(1, 2, 2, 41, 41, 32, window=(7, 3), alibi=True)),
    ("causal window", _case(1, 2, 2, 37, 37, 16, causal=True, window=(9, -1))),
    ("batch alibi bias", _case(2, 2, 1, 19, 24, 32, alibi="batch", bias="float", window=(-1, 2))),
    ("dv differs strided", _case(2, 2, 1, 18, 21, 80, Dv=40, strided=True, transpose_out=True)),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("name,case", CASES, ids=[c[0] for c in CASES])
def test_parity(name, case, dtype):
    _assert_parity(case, dtype)


def test_row_broadcast_bias_gradient():
    # a bias constant along keys has an identically zero gradient (softmax ignores row shifts):
    # only float32 can tell a correct reduction from rounding noise there
    _assert_parity(_case(1, 2, 2, 21, 18, 24, bias="rows"), torch.float32)


@pytest.mark.parametrize("D", [16, 96, 112, 256])
def test_head_dims(D):
    _assert_parity(_case(1, 1, 1, 9, 17, D, causal=D == 112), torch.float16 if D == 96 else torch.float32)


def test_dropout_matches_reference_with_same_seed():
    rows = _assert_parity(_case(1, 2, 1, 19, 26, 32, dropout_p=0.3, causal=True), torch.float32)
    assert {r["output"] for r in rows} == {"out", "d0", "d1", "d2"}
    # the reference with the same seed is matched exactly up to fp32 rounding: a wrong mask would not
    assert max(r["err"] for r in rows) < 1e-4


def test_dropout_keep_rate_and_reproducibility():
    gen = torch.Generator().manual_seed(3)
    B, H, Lq, Lk, D, p = 1, 2, 32, 64, 16, 0.25
    q, k = _randn(gen, B, H, Lq, D).float(), _randn(gen, B, H, Lk, D).float()
    v = torch.eye(Lk, dtype=torch.float32, device=DEV).expand(B, H, Lk, Lk)  # out = probabilities after dropout
    seed = 123456789012
    out, _ = tri.attention_forward(q, k, v, None, False, 0.0, p, seed)  # scale 0: uniform rows 1/Lk
    kept = out != 0
    assert abs(kept.float().mean().item() - (1 - p)) < 0.03
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 1 / (Lk * (1 - p))))
    keep = vocabulary.attention_dropout_keep(seed, B, H, Lq, Lk, p, DEV)
    assert torch.equal(kept, keep)
    again, _ = tri.attention_forward(q, k, v, None, False, 0.0, p, seed)
    assert torch.equal(out, again)
    torch.manual_seed(5)
    a = ff.scaled_dot_product_attention(q, k, k, dropout_p=0.5, backend="triton")
    torch.manual_seed(5)
    b = ff.scaled_dot_product_attention(q, k, k, dropout_p=0.5, backend="triton")
    assert torch.equal(a, b) and not torch.equal(a, ff.scaled_dot_product_attention(q, k, k, dropout_p=0.5,
                                                                                     backend="triton"))


def test_fully_masked_rows_give_zeros_and_zero_grads():
    B, H, Lq, Lk, D = 1, 2, 9, 13, 16
    q, k, v = (torch.randn(B, H, L, D, device=DEV, requires_grad=True) for L in (Lq, Lk, Lk))
    bias = torch.randn(1, H, Lq, Lk, device=DEV)
    bias[:, :, 2] = float("-inf")  # row 2 sees nothing
    bias.requires_grad_(True)
    mask = torch.ones(B, 1, Lq, Lk, dtype=torch.bool, device=DEV)
    mask[..., 5, :] = False
    for m in (bias, mask):
        out = ff.scaled_dot_product_attention(q, k, v, m, backend="triton")
        dead = 2 if m is bias else 5
        assert torch.isfinite(out).all() and (out[:, :, dead] == 0).all()
        out.backward(torch.randn_like(out))
        assert torch.isfinite(q.grad).all() and (q.grad[:, :, dead] == 0).all()
        assert torch.isfinite(k.grad).all() and torch.isfinite(v.grad).all()
        if m is bias:
            assert torch.isfinite(bias.grad).all() and (bias.grad[:, :, 2] == 0).all()
        q.grad = k.grad = v.grad = None
    # a window that leaves rows empty (key range past the end) and the lse of dead rows
    qd, kd = torch.randn(1, 1, 6, 16, device=DEV), torch.randn(1, 1, 3, 16, device=DEV)
    out, lse = tri.attention_forward(qd, kd, kd, None, False, 0.25, window=(0, 0))
    assert (out[0, 0, 3:] == 0).all() and torch.isneginf(lse[0, 0, 3:]).all() and torch.isfinite(lse[0, 0, :3]).all()


def test_nan_propagates():
    q, k, v = (torch.randn(1, 1, L, 16, device=DEV) for L in (5, 7, 7))
    q[0, 0, 1, 3] = float("nan")
    out = ff.scaled_dot_product_attention(q, k, v, backend="triton")
    assert torch.isnan(out[0, 0, 1]).all() and not torch.isnan(out[0, 0, [0, 2, 3, 4]]).any()


def test_empty_key_and_query_lengths():
    q = torch.randn(1, 2, 3, 16, device=DEV, requires_grad=True)
    k = torch.randn(1, 2, 0, 16, device=DEV, requires_grad=True)
    v = torch.randn(1, 2, 0, 8, device=DEV, requires_grad=True)
    out = ff.scaled_dot_product_attention(q, k, v, backend="triton")
    assert out.shape == (1, 2, 3, 8) and (out == 0).all()
    out.sum().backward()
    assert (q.grad == 0).all()
    out, lse = tri.attention_forward(q.detach(), k.detach(), v.detach(), None, False, 0.25)
    assert torch.isneginf(lse).all() and (out == 0).all()
    g = tri.attention_backward(torch.ones_like(out), q.detach(), k.detach(), v.detach(), None, out, lse, False, 0.25)
    assert (g[0] == 0).all() and g[1].shape == k.shape


@pytest.mark.parametrize("G,Lq,causal,bias", [(4, 1, False, False), (2, 3, True, True), (1, 2, False, False)])
def test_decode_path_equals_full_path(G, Lq, causal, bias):
    """The GQA-packed split-K path (what short queries take) gives the row-block path's result."""
    gen = torch.Generator().manual_seed(G + Lq)
    B, Hkv, Lk, D = 2, 2, 77, 32
    H = G * Hkv
    q = _randn(gen, B, H, Lq, D).float()
    k, v = _randn(gen, B, Hkv, Lk, D).float(), _randn(gen, B, Hkv, Lk, D).float()
    m = _randn(gen, B, H, Lq, Lk).float() if bias else None
    slopes = torch.rand(H, device=DEV)
    full = tri.forward(q, k, v, m, causal, 0.2, 0.1, 99, (40, -1), slopes, pack_gqa=False, num_splits=1)
    for splits in (1, 3):
        dec = tri.forward(q, k, v, m, causal, 0.2, 0.1, 99, (40, -1), slopes, pack_gqa=True, num_splits=splits)
        torch.testing.assert_close(dec[0], full[0], atol=2e-6, rtol=2e-6)
        torch.testing.assert_close(dec[1], full[1], atol=2e-6, rtol=2e-6)
    want = reference.attention_forward(q.double(), k.double(), v.double(), None if m is None else m.double(), causal,
                                       0.2, 0.1, 99, (40, -1), slopes.double())
    torch.testing.assert_close(full[0].double(), want[0], atol=1e-5, rtol=1e-5)
    assert tri.decode_splits(B, Hkv, G, Lq, 4096, torch.device("cpu")) > 1  # auto takes split-K for long caches
    assert tri.decode_splits(B, Hkv, G, 128, 4096, torch.device("cpu")) == 0


def _packed(gen, lens_q, lens_k, H, Hkv, D):
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32, device=DEV)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32, device=DEV)
    return (_randn(gen, int(cu_q[-1]), H, D), _randn(gen, int(cu_k[-1]), Hkv, D), _randn(gen, int(cu_k[-1]), Hkv, D),
            cu_q, cu_k)


@pytest.mark.parametrize("causal,window,alibi,dropout_p", [(False, None, False, 0.0), (True, (5, -1), True, 0.2)])
def test_varlen_parity_and_equals_padded(causal, window, alibi, dropout_p):
    gen = torch.Generator().manual_seed(11)
    lens_q, lens_k, H, Hkv, D = [5, 0, 19, 9], [7, 4, 19, 12], 4, 2, 24
    q, k, v, cu_q, cu_k = _packed(gen, lens_q, lens_k, H, Hkv, D)
    slopes = torch.rand(len(lens_q), H, generator=gen, dtype=torch.float64).to(DEV) if alibi else None
    grad = _randn(gen, q.shape[0], H, D)
    results = {}
    for name, dtype in (("oracle", torch.float64), ("triton", torch.float32)):
        ins = [t.detach().to(dtype).requires_grad_(True) for t in (q, k, v)]
        torch.manual_seed(4)
        out = ff.varlen_attention(*ins, cu_q, cu_k, max(lens_q), max(lens_k), dropout_p, causal, window_size=window,
                                  alibi_slopes=slopes, backend="reference" if name == "oracle" else "triton")
        out.backward(grad.to(dtype))
        results[name] = [out.detach()] + [t.grad for t in ins]
    for got, want in zip(results["triton"], results["oracle"]):
        assert parity.max_error(got, want) < 2e-5 * max(1.0, want.abs().max().item())
    if dropout_p == 0.0 and slopes is None:
        # the same sequences zero-padded into a batch, with a key padding mask, give the same rows
        B, Lq, Lk = len(lens_q), max(lens_q), max(lens_k)
        qp, kp, vp = (torch.zeros(B, n, L, D, device=DEV) for n, L in ((H, Lq), (Hkv, Lk), (Hkv, Lk)))
        pad = torch.zeros(B, 1, 1, Lk, dtype=torch.bool, device=DEV)
        for b in range(B):
            qp[b, :, :lens_q[b]] = q[cu_q[b]:cu_q[b + 1]].transpose(0, 1).float()
            kp[b, :, :lens_k[b]] = k[cu_k[b]:cu_k[b + 1]].transpose(0, 1).float()
            vp[b, :, :lens_k[b]] = v[cu_k[b]:cu_k[b + 1]].transpose(0, 1).float()
            pad[b, ..., :lens_k[b]] = True
        padded = ff.scaled_dot_product_attention(qp, kp, vp, pad, is_causal=causal, enable_gqa=True, backend="triton")
        for b in range(B):
            torch.testing.assert_close(results["triton"][0][cu_q[b]:cu_q[b + 1]].float(),
                                       padded[b, :, :lens_q[b]].transpose(0, 1), atol=1e-5, rtol=1e-5)


def test_varlen_half_precision_and_validation():
    gen = torch.Generator().manual_seed(2)
    q, k, v, cu_q, cu_k = _packed(gen, [3, 17], [8, 5], 2, 2, 40)
    want = reference.varlen_attention_forward(q, k, v, cu_q, cu_k, 17, 8, True, 0.2)[0]
    torch_out = reference.varlen_attention_forward(q.half(), k.half(), v.half(), cu_q, cu_k, 17, 8, True, 0.2)[0]
    got = tri_varlen.varlen_attention_forward(q.half(), k.half(), v.half(), cu_q, cu_k, 17, 8, True, 0.2)[0]
    assert parity.max_error(got, want) <= vocabulary.parity_bound(parity.max_error(torch_out, want), torch.float16, 3.0)
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        ff.varlen_attention(q, k, v, cu_q + 1, cu_k, 17, 8)
    with pytest.raises(ValueError, match="max_seqlen_q"):
        ff.varlen_attention(q, k, v, cu_q, cu_k, 4, 8)
    with pytest.raises(ValueError, match="multiple"):
        ff.varlen_attention(q, k[:, :1].expand(-1, 3, -1), v[:, :1].expand(-1, 3, -1), cu_q, cu_k, 17, 8)
    with pytest.raises(TypeError, match="max_seqlen_k"):
        ff.varlen_attention(q, k, v, cu_q, cu_k, 17, 8.0)


def test_unsupported_inputs_are_declined_by_name():
    q = torch.randn(1, 1, 4, 8, dtype=torch.float64, device=DEV)
    with pytest.raises(backends.BackendUnavailableError, match="float64"):
        ff.scaled_dot_product_attention(q, q, q, backend="triton")
    big = torch.randn(1, 1, 2, 264, device=DEV)
    with pytest.raises(backends.BackendUnavailableError, match="head dims"):
        ff.scaled_dot_product_attention(big, big, big, backend="triton")
    assert tri.unsupported(big[..., :256], big[..., :256], big[..., :256], None, False, 1.0) is None


def test_dkdv_and_dq_are_deterministic():
    gen = torch.Generator().manual_seed(9)
    q, k, v = _randn(gen, 1, 4, 21, 32).float(), _randn(gen, 1, 1, 25, 32).float(), _randn(gen, 1, 1, 25, 32).float()
    bias = _randn(gen, 1, 1, 1, 25).float()
    out, lse = tri.attention_forward(q, k, v, bias, True, 0.2)
    do = torch.randn_like(out)
    a = tri.attention_backward(do, q, k, v, bias, out, lse, True, 0.2, bias_requires_grad=True)
    b = tri.attention_backward(do, q, k, v, bias, out, lse, True, 0.2, bias_requires_grad=True)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def _opcheck_cases():
    gen = torch.Generator().manual_seed(5)
    q, k, v = _randn(gen, 1, 4, 5, 16).float(), _randn(gen, 1, 2, 6, 16).float(), _randn(gen, 1, 2, 6, 16).float()
    bias = _randn(gen, 1, 4, 5, 6).float()
    out, lse = tri.attention_forward(q, k, v, bias, True, 0.3)
    qv, kv, vv, cu_q, cu_k = (t.float() if t.is_floating_point() else t for t in _packed(gen, [2, 3], [4, 1], 2, 1, 16))
    vout, vlse = tri_varlen.varlen_attention_forward(qv, kv, vv, cu_q, cu_k, 3, 4, True, 0.25)
    seed = torch.tensor(42)
    ops = torch.ops.fusedformer
    return [
        ("attention_fwd", ops.attention_fwd.default,
         (q.requires_grad_(), k, v, bias, True, 0.3, 0.1, seed, 3, -1, torch.rand(4, device=DEV), "triton")),
        ("attention_bwd", ops.attention_bwd.default,
         (torch.randn_like(out), q.detach(), k, v, bias, out, lse, True, 0.3, 0.0, None, -1, -1, None, True, "triton")),
        ("varlen_attention_fwd", ops.varlen_attention_fwd.default,
         (qv.requires_grad_(), kv, vv, cu_q, cu_k, 3, 4, True, 0.25, 0.1, seed, -1, 1, None, "triton")),
        ("varlen_attention_fwd reference", ops.varlen_attention_fwd.default,
         (qv, kv, vv, cu_q, cu_k, 3, 4, False, 0.25, 0.0, None, -1, -1, torch.rand(2, device=DEV), "reference")),
        ("varlen_attention_bwd", ops.varlen_attention_bwd.default,
         (torch.randn_like(vout), qv.detach(), kv, vv, cu_q, cu_k, 3, 4, vout, vlse, True, 0.25, 0.0, None, -1, -1,
          None, "triton")),
    ]


OPCHECK = _opcheck_cases()


@pytest.mark.parametrize("name,op,args", OPCHECK, ids=[c[0] for c in OPCHECK])
def test_opcheck(name, op, args):
    torch.library.opcheck(op, args)


def test_compile_fullgraph_matches_eager():
    gen = torch.Generator().manual_seed(6)
    q, k, v, cu_q, cu_k = _packed(gen, [3, 5], [4, 6], 2, 1, 16)
    q, k, v = (t.float().requires_grad_() for t in (q, k, v))
    mask = torch.randn(1, 2, 5, 6, device=DEV)

    def fn(q, k, v):
        a = ff.varlen_attention(q, k, v, cu_q, cu_k, 5, 6, is_causal=True, backend="triton")
        b = ff.scaled_dot_product_attention(q[:5].transpose(0, 1)[None], k[:6].transpose(0, 1)[None],
                                            v[:6].transpose(0, 1)[None], mask, enable_gqa=True, backend="triton")
        return a.sum() + (b * b).sum()

    torch._dynamo.reset()
    eager = torch.autograd.grad(fn(q, k, v), (q, k, v))
    compiled = torch.autograd.grad(torch.compile(fn, fullgraph=True, backend="aot_eager")(q, k, v), (q, k, v))
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b)


_COMPILE_SCRIPT = r'''
import os
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fusedformer.kernels import attention as A
from fusedformer.kernels import attention_backward as AB

PTR = {"Lse": "*fp32", "Delta": "*fp32", "Bias": "*u8", "Slopes": "*fp32", "CuQ": "*i32", "CuK": "*i32",
       **{name: "*bf16" for name in ("Q", "K", "V", "Out", "dOut", "dQ", "dK", "dV", "dBias")}}


def compile_for(kernel, consts, arch):
    sig = {}
    for name in kernel.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in PTR:
            sig[name] = PTR[name]
        else:
            sig[name] = {"qk_scale": "fp32", "drop_scale": "fp32", "sm_scale": "fp32", "seed": "i64",
                         "drop_threshold": "i64"}.get(name, "i32")
    src = ASTSource(kernel, sig, consts)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4, "num_stages": 3})


flags = dict(BIAS_KIND=2, CAUSAL=True, WINDOW_LEFT=True, WINDOW_RIGHT=True, HAS_ALIBI=True, DROPOUT=True,
             IEEE_DOT=False, BLOCK_M=64, BLOCK_N=64, BLOCK_D=128, BLOCK_DV=64)
fwd = dict(flags, VARLEN=False, PACK_GQA=True, NUM_SPLITS=1, Lq=1, sq_d=1)  # decode: Lq = 1 is specialised
assert "cubin" in compile_for(A._attn_fwd_kernel, fwd, 90).asm
compile_for(AB._attn_bwd_dkdv, dict(flags, VARLEN=True), 90)
compile_for(AB._attn_bwd_dq, dict(flags, VARLEN=False), 90)
compile_for(AB._attn_bwd_dbias, dict(flags, ROW_BCAST=True, COL_BCAST=False), 90)
print("ok")
'''


def test_kernels_compile_for_sm90_without_a_gpu(tmp_path):
    """The interpreter never runs triton's compiler: compile the GPU path (to a cubin, with ptxas) for
    sm_90 so type errors that only compiled kernels hit show up on CPU machines too."""
    assert_compiles_without_interpreter(_COMPILE_SCRIPT, tmp_path)

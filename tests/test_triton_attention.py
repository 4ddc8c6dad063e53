"""Triton flash attention (forward, backward) against the float64 reference: parity over every
mask kind, head dims, dead rows, NaN, empty lengths, determinism, opcheck and compilation.
Decode and varlen: test_triton_attention_paths.py; dropout: test_triton_attention_dropout.py.

Runs the kernels under the triton interpreter on CPU (tiny shapes) and compiled on a GPU. The
pass rule is fusedformer.parity's: err <= 2 * torch_err + floor[dtype] * max(1, max|oracle|),
torch_err being PyTorch's own SDPA in the same dtype against the float64 reference.
Shape legend: B batch, H/Hkv heads, Lq/Lk lengths, D/Dv head dims.
"""

import fusedformer as ff
import pytest
import torch
from _attention_cases import DEV, assert_parity, case, packed, randn
from _testing import assert_compiles_without_interpreter
from fusedformer import backends

pytest.importorskip("triton")

from fusedformer._backends.triton import attention as tri  # noqa: E402
from fusedformer._backends.triton import varlen_attention as tri_varlen  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (name, case) pairs: odd lengths, non-power-of-two head dims, cross attention, every mask kind
CASES = [
    ("plain odd", case(2, 3, 3, 37, 29, 40)),
    ("causal gqa", case(1, 4, 2, 29, 45, 64, causal=True)),
    ("causal lq>lk", case(1, 2, 1, 33, 19, 32, causal=True)),
    ("float bias grad", case(2, 2, 2, 17, 33, 32, bias="float")),
    ("key padding bias grad", case(2, 2, 1, 19, 23, 16, bias="pad", causal=True)),
    ("col bias grad", case(1, 2, 2, 21, 18, 24, bias="cols", window=(4, 6))),
    ("bool key padding", case(2, 2, 2, 15, 22, 16, bias="boolpad", causal=True)),
    ("bool mask", case(2, 2, 2, 23, 27, 48, bias="bool")),
    ("window alibi", case(1, 2, 2, 41, 41, 32, window=(7, 3), alibi=True)),
    ("causal window", case(1, 2, 2, 37, 37, 16, causal=True, window=(9, -1))),
    ("batch alibi bias", case(2, 2, 1, 19, 24, 32, alibi="batch", bias="float", window=(-1, 2))),
    ("dv differs strided", case(2, 2, 1, 18, 21, 80, Dv=40, strided=True, transpose_out=True)),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("name,case", CASES, ids=[c[0] for c in CASES])
def test_parity(name, case, dtype):
    assert_parity(case, dtype)


def test_row_broadcast_bias_gradient():
    # a bias constant along keys has an identically zero gradient (softmax ignores row shifts):
    # only float32 can tell a correct reduction from rounding noise there
    assert_parity(case(1, 2, 2, 21, 18, 24, bias="rows"), torch.float32)


@pytest.mark.parametrize("D", [16, 96, 112, 256])
def test_head_dims(D):
    assert_parity(case(1, 1, 1, 9, 17, D, causal=D == 112), torch.float16 if D == 96 else torch.float32)


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
    q, k, v = randn(gen, 1, 4, 21, 32).float(), randn(gen, 1, 1, 25, 32).float(), randn(gen, 1, 1, 25, 32).float()
    bias = randn(gen, 1, 1, 1, 25).float()
    out, lse = tri.attention_forward(q, k, v, bias, True, 0.2)
    do = torch.randn_like(out)
    a = tri.attention_backward(do, q, k, v, bias, out, lse, True, 0.2, bias_requires_grad=True)
    b = tri.attention_backward(do, q, k, v, bias, out, lse, True, 0.2, bias_requires_grad=True)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def _opcheck_cases():
    gen = torch.Generator().manual_seed(5)
    q, k, v = randn(gen, 1, 4, 5, 16).float(), randn(gen, 1, 2, 6, 16).float(), randn(gen, 1, 2, 6, 16).float()
    bias = randn(gen, 1, 4, 5, 6).float()
    out, lse = tri.attention_forward(q, k, v, bias, True, 0.3)
    qv, kv, vv, cu_q, cu_k = (t.float() if t.is_floating_point() else t for t in packed(gen, [2, 3], [4, 1], 2, 1, 16))
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
    q, k, v, cu_q, cu_k = packed(gen, [3, 5], [4, 6], 2, 1, 16)
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
from fusedformer.kernels import attention_dbias as AD

PTR = {"Lse": "*fp32", "Delta": "*fp32", "OutPart": "*fp32", "LsePart": "*fp32", "Bias": "*u8", "Slopes": "*fp32",
       "Seed": "*i64", "CuQ": "*i32", "CuK": "*i32",
       **{name: "*bf16" for name in ("Q", "K", "V", "Out", "dOut", "dQ", "dK", "dV", "dBias")}}


def compile_for(kernel, consts, arch):
    sig = {}
    for name in kernel.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in PTR:
            sig[name] = PTR[name]
        else:
            sig[name] = {"qk_scale": "fp32", "drop_scale": "fp32", "sm_scale": "fp32", "drop_threshold": "i64"}.get(
                name, "i32")
    src = ASTSource(kernel, sig, consts)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4, "num_stages": 3})


flags = dict(BIAS_KIND=2, CAUSAL=True, WINDOW_LEFT=True, WINDOW_RIGHT=True, HAS_ALIBI=True, DROPOUT=True,
             IEEE_DOT=False, VEC=8, BLOCK_M=64, BLOCK_N=64, BLOCK_D=128, BLOCK_DV=64)
fwd = dict(flags, VARLEN=False, PACK_GQA=True, USE_TMA=False, Lq=1, sq_d=1)  # decode: Lq = 1 is specialised
assert "cubin" in compile_for(A._attn_fwd_kernel, fwd, 90).asm
compile_for(A._attn_combine_kernel, dict(BLOCK_S=16, BLOCK_DV=64), 90)
compile_for(AB._attn_bwd_dkdv, dict(flags, VARLEN=True, USE_TMA=False, SPLIT_DKDV=True), 90)
compile_for(AB._attn_bwd_dq, dict(flags, VARLEN=False), 90)
dbias = {name: value for name, value in flags.items() if name != "VEC"}  # its loads keep the bias's own layout
compile_for(AD._attn_bwd_dbias, dict(dbias, ROW_BCAST=True, COL_BCAST=False), 90)
print("ok")
'''



def test_kernels_compile_for_sm90_without_a_gpu(tmp_path):
    """The interpreter never runs triton's compiler: compile the GPU path (to a cubin, with ptxas) for
    sm_90 so type errors that only compiled kernels hit show up on CPU machines too."""
    assert_compiles_without_interpreter(_COMPILE_SCRIPT, tmp_path)

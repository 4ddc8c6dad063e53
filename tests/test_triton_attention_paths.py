"""Triton attention's decode path (short queries: GQA-packed rows, split-K) and varlen path
against the float64 reference and the row-block path. Shape legend: B batch, H/Hkv heads,
G = H // Hkv, Lq/Lk lengths, D head dim."""

import types

import fusedformer as ff
import pytest
import torch
from _attention_cases import DEV, assert_parity, case, packed, randn
from fusedformer import parity, reference, vocabulary

pytest.importorskip("triton")

from fusedformer._backends.triton import attention as tri  # noqa: E402
from fusedformer._backends.triton import varlen_attention as tri_varlen  # noqa: E402
from fusedformer.kernels import attention as fwd_kernels  # noqa: E402
from triton._C.libtriton import native_specialize_impl  # noqa: E402
from triton.backends.compiler import BaseBackend  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402


@pytest.mark.parametrize("G,Lq,causal,bias", [(4, 1, False, False), (2, 3, True, True), (1, 2, False, False)])
def test_decode_path_equals_full_path(G, Lq, causal, bias):
    """The GQA-packed split-K path (what short queries take) gives the row-block path's result."""
    gen = torch.Generator().manual_seed(G + Lq)
    B, Hkv, Lk, D = 2, 2, 77, 32
    H = G * Hkv
    q = randn(gen, B, H, Lq, D).float()
    k, v = randn(gen, B, Hkv, Lk, D).float(), randn(gen, B, Hkv, Lk, D).float()
    m = randn(gen, B, H, Lq, Lk).float() if bias else None
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


def test_decode_padding_rows_with_a_per_head_bias_and_alibi():
    """3 query heads per kv head fill 3 of a 16-row packed tile: the 13 padding rows have head
    indices past H, so the per-head bias and the slopes must be read under the row mask (the
    bounds-checking interpreter mode fails the unmasked read; the result is checked here)."""
    assert_parity(case(1, 6, 2, 1, 37, 16, bias="float", alibi=True), torch.float32)


@pytest.mark.gpu
def test_decode_with_a_per_head_bias_on_gpu():
    """The decode path at a real size: 32 query heads on 8 kv heads, one token against 4099 keys,
    a per-head float bias and ALiBi (split-K with padding rows past H)."""
    assert_parity(case(2, 32, 8, 1, 4099, 128, bias="float", alibi=True), torch.bfloat16)


def _frozen(kernel):
    """The arguments triton does not specialise on (do_not_specialize), interpreted or compiled."""
    while isinstance(kernel, Autotuner):
        kernel = kernel.fn
    if hasattr(kernel, "do_not_specialize"):
        return set(kernel.do_not_specialize)
    return set(kernel.kwargs.get("do_not_specialize") or ())  # an InterpretedFunction


def _variant(kernel, args, meta):
    """(autotune key, compiled variant) of one launch: the key arguments and every tensor's dtype
    select an autotune run; triton's specialisation of each argument and the constexprs select a
    compiled kernel."""
    named = {**dict(zip(kernel.arg_names, args)), **meta}
    frozen = _frozen(kernel)
    spec = tuple(native_specialize_impl(BaseBackend, a, False, name not in frozen, True)[:2]
                 for name, a in zip(kernel.arg_names, args))
    key = tuple(named[k] for k in fwd_kernels._AUTOTUNE_KEY if k in named)
    key += tuple(str(a.dtype) for a in args if isinstance(a, torch.Tensor))
    return key, (spec, tuple(sorted(meta.items())))


def test_decode_compiles_a_bounded_number_of_variants(monkeypatch):
    """Decoding against a KV cache growing from 1 to 32768 keys (an H100's 132 SMs, 8 kv heads of
    4 query heads each): at most 6 autotune keys and 6 compiled forward kernels, 1 combine kernel.
    Lengths: all up to 1024, then every 37th (37 is prime to the 16 of triton's divisibility
    specialisation and the 256 keys per split step), so every residue class is met."""
    monkeypatch.setattr(tri, "_sm_count", lambda device: 132)
    B, Hkv, G, D = 1, 8, 4, 64
    q = torch.empty(B, Hkv * G, 1, D, dtype=torch.bfloat16)
    cache = torch.empty(B, Hkv, 32768, D, dtype=torch.bfloat16)  # a preallocated cache, read up to Lk
    keys, kernels, combines, splits = set(), set(), set(), set()
    for Lk in [*range(1, 1025), *range(1025, 32769, 37), 32768]:
        k = cache[:, :, :Lk]
        _, _, launches = tri._plan_forward(q, k, k, None, False, 0.125, 0.0, None, (-1, -1), None, None, None)
        kernel, _, args, meta = launches[0]
        key, compiled = _variant(kernel, args, meta)
        keys.add(key)
        kernels.add(compiled)
        splits.add(args[kernel.arg_names.index("num_splits")])
        for kernel, _, args, meta in launches[1:]:
            combines.add(_variant(kernel, args, meta)[1])
    assert len(splits) > 30  # the split count still follows the cache length
    assert len(keys) <= 6 and len(kernels) <= 6 and len(combines) == 1, (len(keys), len(kernels), len(combines))


@pytest.mark.parametrize("causal,window,alibi,dropout_p", [(False, None, False, 0.0), (True, (5, -1), True, 0.2)])
def test_varlen_parity_and_equals_padded(causal, window, alibi, dropout_p):
    gen = torch.Generator().manual_seed(11)
    lens_q, lens_k, H, Hkv, D = [5, 0, 19, 9], [7, 4, 19, 12], 4, 2, 24
    q, k, v, cu_q, cu_k = packed(gen, lens_q, lens_k, H, Hkv, D)
    slopes = torch.rand(len(lens_q), H, generator=gen, dtype=torch.float64).to(DEV) if alibi else None
    grad = randn(gen, q.shape[0], H, D)
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
    q, k, v, cu_q, cu_k = packed(gen, [3, 17], [8, 5], 2, 2, 40)
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



def test_device_facts_are_read_once_per_gpu(monkeypatch):
    """The launchers' per-call device questions (TMA on sm_90+, the L2-sized causal sections, SM
    counts) are answered from one read of torch's properties per GPU (kernels/_device.py)."""
    from fusedformer.kernels import _device, attention_common

    asked = []
    h100 = types.SimpleNamespace(major=9, L2_cache_size=50 << 20, multi_processor_count=132)
    monkeypatch.setattr(_device, "_properties", {})
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: asked.append(i) or h100)
    monkeypatch.setattr(attention_common, "TMA_ENABLED", True)
    gpu = torch.device("cuda", 0)
    for _ in range(3):
        assert attention_common.tma_capable(gpu)
        assert fwd_kernels.l2_section(gpu, 4096, 128, 128, 2) == (25 << 20) // (4096 * 256 * 2)
        assert tri._sm_count(gpu) == 132
    assert asked == [0]

"""Triton varlen attention: packed sequences on the flash kernels of kernels/attention*.py.

Shape legend: T_q/T_k total tokens, B sequences, H/Hkv heads, G = H // Hkv, D/Dv head dims.
The kernels read (T, H, D) tensors with batch stride 0 and each sequence's token offset from
cu_seqlens; grids are sized by max_seqlen, and programs past a sequence's end do nothing.
"""

import torch

from fusedformer._backends.triton.attention import _clamp_window, gqa_chunks, unsupported_inputs
from fusedformer.kernels import attention as fwd_kernels
from fusedformer.kernels import attention_backward as bwd_kernels
from fusedformer.vocabulary import dropout_threshold


def unsupported(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, dropout_p=0.0,
                seed=None, window=(-1, -1), alibi_slopes=None):
    """Why the triton kernels cannot run these forward arguments, or None."""
    return unsupported_inputs(q, v, "varlen attention")


def _bhld(t):
    """(batch, head, token, dim) strides of a (T, H, D) tensor: batch stride 0."""
    return (0, t.stride(1), t.stride(0), t.stride(2))


def _offsets(cu_seqlens):
    """cu_seqlens as the kernels read it: int32, contiguous (they index the raw pointer)."""
    return cu_seqlens.to(torch.int32).contiguous()


def _prepare(q, k, v, dropout_p, seed):
    reason = unsupported(q, k, v, None, None, 0, 0, False, 1.0)
    if reason:
        raise ValueError(f"varlen_attention (triton): {reason}")
    if dropout_p > 0.0 and seed is None:
        raise ValueError("varlen_attention (triton): dropout_p > 0 needs a seed")


def varlen_attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale,
                             dropout_p=0.0, seed=None, window=(-1, -1), alibi_slopes=None):
    """See ``fusedformer.reference.varlen_attention_forward``."""
    _prepare(q, k, v, dropout_p, seed)
    total_q, H, _ = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    B = cu_seqlens_q.numel() - 1
    out = torch.zeros(total_q, H, Dv, dtype=q.dtype, device=q.device)
    lse = torch.full((H, total_q), float("-inf"), dtype=torch.float32, device=q.device)
    if B == 0 or total_q == 0 or k.shape[0] == 0 or max_seqlen_q == 0 or max_seqlen_k == 0:
        return out, lse
    window = _clamp_window(window, max_seqlen_q, max_seqlen_k)
    slopes = None if alibi_slopes is None else alibi_slopes.to(torch.float32)
    threshold = dropout_threshold(dropout_p) if dropout_p > 0 else 0
    fwd_kernels.launch_forward(
        q, k, v, out, lse, None, slopes, causal, scale, window, dropout_p, seed, threshold,
        _bhld(q), _bhld(k), _bhld(v), _bhld(out), (0, total_q, 1), B, H, H // Hkv, max_seqlen_q, max_seqlen_k,
        cu_q=_offsets(cu_seqlens_q), cu_k=_offsets(cu_seqlens_k))
    return out, lse


def varlen_attention_backward(grad_out, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, out,
                              lse, causal, scale, dropout_p=0.0, seed=None, window=(-1, -1), alibi_slopes=None):
    """See ``fusedformer.reference.varlen_attention_backward``: (dq, dk, dv)."""
    _prepare(q, k, v, dropout_p, seed)
    total_q, H, _ = q.shape
    Hkv = k.shape[1]
    B = cu_seqlens_q.numel() - 1
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    if B == 0 or total_q == 0 or k.shape[0] == 0 or max_seqlen_q == 0 or max_seqlen_k == 0:
        return dq, dk, dv
    window = _clamp_window(window, max_seqlen_q, max_seqlen_k)
    slopes = None if alibi_slopes is None else alibi_slopes.to(torch.float32)
    threshold = dropout_threshold(dropout_p) if dropout_p > 0 else 0
    strides = {"q": _bhld(q), "k": _bhld(k), "v": _bhld(v), "do": _bhld(grad_out), "out": _bhld(out),
               "dq": _bhld(dq), "dk": _bhld(dk), "dv": _bhld(dv)}
    bwd_kernels.launch_backward(grad_out, q, k, v, out, lse.to(torch.float32).contiguous(), dq, dk, dv, None, None,
                                slopes, causal, scale, window, dropout_p, seed, threshold, strides, B, H, H // Hkv,
                                max_seqlen_q, max_seqlen_k, total_q=total_q, cu_q=_offsets(cu_seqlens_q),
                                cu_k=_offsets(cu_seqlens_k),
                                head_chunks=gqa_chunks(B, Hkv, H // Hkv, max_seqlen_k, q.device))
    return dq, dk, dv

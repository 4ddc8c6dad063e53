"""Triton attention: the op table of backends.py on the flash kernels of kernels/attention*.py.

Shape legend: B batch, H query heads, Hkv kv heads, G = H // Hkv, Lq/Lk lengths, D/Dv head dims.
Inputs arrive as (B, H, L, D) views of any strides; nothing is copied. Short query lengths
(decoding against a KV cache) take the GQA-packed split-K path; everything else the row-block
path. dQ, dK, dV and dbias are deterministic (no atomics; see kernels/attention_backward.py).
"""

import torch

from fusedformer._backends.triton._guards import Refused, before_sm80
from fusedformer.kernels import _device
from fusedformer.kernels import attention as fwd_kernels
from fusedformer.kernels import attention_backward as bwd_kernels
from fusedformer.vocabulary import dropout_threshold, empty_dense

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
# decode path: at most this many query rows per kv head (G * Lq), packed into one row tile
DECODE_MAX_ROWS = 64
DECODE_MAX_LQ = 16


def unsupported_inputs(q, v, op="attention"):
    """Why the triton kernels cannot take these dtypes and head dims, or None (both ops' rule)."""
    if q.dtype not in DTYPES:
        return f"triton {op} supports float16, bfloat16 and float32, not {q.dtype} (use the reference backend)"
    if q.shape[-1] > MAX_HEAD_DIM or v.shape[-1] > MAX_HEAD_DIM:
        return f"triton {op} supports head dims up to {MAX_HEAD_DIM}, got D={q.shape[-1]}, Dv={v.shape[-1]}"
    if q.dtype is torch.bfloat16 and before_sm80(q):
        return f"bfloat16 {op} needs an sm_80 or newer GPU"
    return None


def unsupported(q, k, v, bias, causal, scale, dropout_p=0.0, seed=None, window=(-1, -1), alibi_slopes=None):
    """Why the triton kernels cannot run these forward arguments, or None."""
    if bias is not None and bias.dim() != 4:
        return f"attention bias must be 4-D (B|1, H|1, Lq|1, Lk|1), got {bias.dim()}-D"
    return unsupported_inputs(q, v)


def _clamp_window(window, Lq, Lk):
    # a window wider than both sequences is no window; clamping keeps the kernels' index math in int32
    limit = Lq + Lk
    return tuple(-1 if w < 0 else min(int(w), limit) for w in window)


def _check(q, k, v, bias, dropout_p, seed):
    reason = unsupported(q, k, v, bias, False, 1.0)
    if reason:
        raise ValueError(f"attention (triton): {reason}")
    if dropout_p > 0.0 and seed is None:
        raise ValueError("attention (triton): dropout_p > 0 needs a seed")
    H, Hkv = q.shape[1], k.shape[1]
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"attention (triton): query heads {H} are not a multiple of key/value heads {Hkv}")


def _slopes(alibi_slopes):
    return None if alibi_slopes is None else alibi_slopes.to(torch.float32)


def _sm_count(device):
    return _device.properties(device).multi_processor_count if device.type == "cuda" else 4


def decode_splits(B, Hkv, G, Lq, Lk, device):
    """Number of key splits for the packed decode path, or 0 when the row-block path is better."""
    if Lq > DECODE_MAX_LQ or G * Lq > DECODE_MAX_ROWS:
        return 0
    n_sm = _sm_count(torch.device(device))
    programs = B * Hkv
    # enough splits to fill every SM twice over, each split at least 256 keys long, at most 64
    want = -(-2 * n_sm // max(programs, 1))
    return max(1, min(want, -(-Lk // 256), 64))


def gqa_chunks(B, Hkv, G, Lk, device):
    """How many chunks the G query heads of a group are split in for dK/dV (a divisor of G): the
    fewest that give every SM two programs of 128 keys; 1 when the kv heads alone do. Each chunk
    beyond the first costs a float32 partial of dK and dV (see kernels/attention_backward.py)."""
    want = 2 * _sm_count(torch.device(device))
    programs = B * Hkv * -(-Lk // 128)
    return next((c for c in range(1, G + 1) if G % c == 0 and programs * c >= want), G)


def _plan_forward(q, k, v, bias, causal, scale, dropout_p, seed, window, alibi_slopes, pack_gqa, num_splits):
    """(out, lse, launches): the outputs, allocated, and the kernel launches that fill them (see
    kernels/attention.py forward_launches); no launches when there is nothing to attend."""
    B, H, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    G = H // Hkv
    out = torch.empty(B, H, Lq, Dv, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, Lq, dtype=torch.float32, device=q.device)
    if Lk == 0 or Lq == 0 or B * H == 0:
        return out.zero_(), lse.fill_(float("-inf")), []
    if pack_gqa is None:
        splits = decode_splits(B, Hkv, G, Lq, Lk, q.device)
        pack_gqa = splits > 0
        num_splits = max(splits, 1) if num_splits is None else num_splits
    num_splits = 1 if num_splits is None else int(num_splits)
    out_part = lse_part = None
    if num_splits > 1:  # split-major, so the kernel's strides do not depend on the split count
        out_part = torch.empty(num_splits, B * H * Lq, Dv, dtype=torch.float32, device=q.device)
        lse_part = torch.empty(num_splits, B * H * Lq, dtype=torch.float32, device=q.device)
    window = _clamp_window(window, Lq, Lk)
    threshold = dropout_threshold(dropout_p) if dropout_p > 0 else 0
    launches = fwd_kernels.forward_launches(
        q, k, v, out, lse, bias, _slopes(alibi_slopes), causal, scale, window, dropout_p, seed, threshold,
        q.stride(), k.stride(), v.stride(), out.stride(), lse.stride(), B, H, G, Lq, Lk,
        pack_gqa=pack_gqa, num_splits=num_splits, out_part=out_part, lse_part=lse_part)
    return out, lse, launches


def forward(q, k, v, bias, causal, scale, dropout_p=0.0, seed=None, window=(-1, -1), alibi_slopes=None,
            *, pack_gqa=None, num_splits=None):
    """attention_forward with the path forced: ``pack_gqa``/``num_splits`` None picks as ``auto``.
    ``seed``: an int, or the one-element int64 tensor the op draws on the device."""
    _check(q, k, v, bias, dropout_p, seed)
    out, lse, launches = _plan_forward(q, k, v, bias, causal, scale, dropout_p, seed, window, alibi_slopes,
                                       pack_gqa, num_splits)
    fwd_kernels.run(launches)
    return out, lse


def attention_forward(q, k, v, bias, causal, scale, dropout_p=0.0, seed=None, window=(-1, -1), alibi_slopes=None):
    """See ``fusedformer.reference.attention_forward``: (out (B, H, Lq, Dv), lse (B, H, Lq) float32)."""
    return forward(q, k, v, bias, causal, scale, dropout_p, seed, window, alibi_slopes)


def attention_lean(q, k, v, causal, scale):
    """attention_forward's out for the ops' lean call: no mask, dropout, window or ALiBi, and
    ops/attention's _plain_call told the rest valid (q, k, v 4-D plain tensors of one float
    dtype on one device, one batch and head dim D = Dv > 0, k and v of one length and head
    count dividing q's, nothing empty: the op body's empty answers and the reference's head dim
    0 are never asked for here), scale a float. Left to refuse: what ``unsupported_inputs``
    refuses (float64, which ``auto`` runs on the reference; a head dim over MAX_HEAD_DIM;
    bfloat16 before sm_80). What passes is ``forward``'s plan and launches, without its checks
    of what _plain_call has told."""
    if unsupported_inputs(q, v):
        raise Refused
    out, _, launches = _plan_forward(q, k, v, None, causal, scale, 0.0, None, (-1, -1), None, None, None)
    fwd_kernels.run(launches)
    return out


def attention_backward(grad_out, q, k, v, bias, out, lse, causal, scale, dropout_p=0.0, seed=None,
                       window=(-1, -1), alibi_slopes=None, bias_requires_grad=False):
    """See ``fusedformer.reference.attention_backward``: (dq, dk, dv, dbias or None)."""
    _check(q, k, v, bias, dropout_p, seed)
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = H // Hkv
    dq, dk, dv = empty_dense(q), empty_dense(k), empty_dense(v)
    want_dbias = bias_requires_grad and bias is not None and bias.is_floating_point()
    dbias = empty_dense(bias) if want_dbias else None
    if Lk == 0 or Lq == 0 or B * H == 0:
        for t in (dq, dk, dv, dbias):
            if t is not None:
                t.zero_()
        return dq, dk, dv, dbias
    lse = lse.to(torch.float32).contiguous()
    window = _clamp_window(window, Lq, Lk)
    threshold = dropout_threshold(dropout_p) if dropout_p > 0 else 0
    strides = {"q": q.stride(), "k": k.stride(), "v": v.stride(), "do": grad_out.stride(), "out": out.stride(),
               "dq": dq.stride(), "dk": dk.stride(), "dv": dv.stride()}
    bwd_kernels.launch_backward(grad_out, q, k, v, out, lse, dq, dk, dv, dbias, bias, _slopes(alibi_slopes), causal,
                                scale, window, dropout_p, seed, threshold, strides, B, H, G, Lq, Lk,
                                head_chunks=gqa_chunks(B, Hkv, G, Lk, q.device))
    return dq, dk, dv, dbias

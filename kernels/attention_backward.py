"""Flash attention backward, recomputing P from the saved log-sum-exp (no Lq x Lk storage).

Legend as in attention.py. With S the masked scores, P = exp(S - lse), Z = P * keep / (1 - p),
delta = rowsum(dO * O):
    dV = Z^T dO,  dP = (dO V^T) * keep / (1 - p),  dS = P * (dP - delta),
    dQ = scale * dS K,  dK = scale * dS^T Q,  dbias = dS summed over the bias's broadcast dims.
Every result is owned by exactly one program, so all of it is deterministic without atomics:
  _attn_bwd_delta   delta, reads Lq*Dv twice per head
  _attn_bwd_dkdv    one program per (key block, b, kv head), looping over the G query heads of
                    its group and the query blocks that can see it: dK, dV summed over the group
  _attn_bwd_dq      one program per (query block, b, h), looping over its keys (a second
                    recompute of P: the price of a deterministic dQ without atomics)
and dbias (attention_dbias.py) when the bias needs its gradient.
"""

import functools

import torch
import triton
import triton.language as tl

from fusedformer.kernels import _autotune
from fusedformer.kernels import attention_resources as resources
from fusedformer.kernels.attention import with_config
from fusedformer.kernels.attention_common import (
    LOG2E,
    _dot,
    _dropout_keep,
    _key_range,
    _load_lse2,
    _load_seed,
    _probs_tile,
    _seq_bounds,
    _whole_key_range,
    bias_strides,
    block_d,
    dropout_args,
    flags,
    ieee_dot,
    interpreted,
    pointer_args,
    pow2,
    slope_strides,
)
from fusedformer.kernels.attention_dbias import launch_dbias


@triton.jit
def _attn_bwd_delta(
    Out, dOut,  # (B, H, L, Dv) by strides
    Delta,  # (B, H, L) float32, contiguous
    so_b, so_h, so_l, so_d, sdo_b, sdo_h, sdo_l, sdo_d,
    H, L, Dv,
    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    num_m = tl.cdiv(L, BLOCK_M)
    pid_m = pid % num_m
    bh = pid // num_m  # one flat grid: B * H may pass the 65535 limit of grid axes 1 and 2
    b = bh // H
    h = bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask = (rows[:, None] < L) & (offs_dv[None, :] < Dv)
    o = tl.load(Out + b * so_b + h * so_h + rows[:, None] * so_l + offs_dv[None, :] * so_d, mask=mask, other=0.0)
    do = tl.load(dOut + b * sdo_b + h * sdo_h + rows[:, None] * sdo_l + offs_dv[None, :] * sdo_d, mask=mask,
                 other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + bh * L + rows, delta, mask=rows < L)


@triton.jit
def _dkdv_tiles(lo, hi, q_base, do_base, sq_l, sq_d, sdo_l, sdo_d, Lse, Delta, row_base, k, v, dk, dv, b, b_drop,
                h_row, j, Lq_b, Lk_b, H, D, Dv, Bias, sb_b, sb_h, sb_i, sb_j, Slopes, ss_b, ss_h, qk_scale, win_left,
                win_right, seed, drop_threshold, drop_scale, BIAS_KIND: tl.constexpr, CAUSAL: tl.constexpr,
                WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, HAS_ALIBI: tl.constexpr, DROPOUT: tl.constexpr,
                IEEE_DOT: tl.constexpr, MASK_KEYS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """dK, dV contributions of one query head's row blocks [lo, hi) to one key block, in the
    transposed orientation (keys down the rows): S^T = K Q^T, dP^T = V dO^T, so P^T and dS^T are
    the left operands of dV += Z^T dO and dK += dS^T Q as they come out of the registers, and
    only loaded tiles (Q^T, dO) are read transposed, which the MMA takes from shared memory."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    n0 = tl.min(j, 0)
    for start_m in range(lo, hi, BLOCK_M):
        i = start_m + offs_m
        i64 = i.to(tl.int64)
        qt = tl.load(q_base + i64[None, :] * sq_l + offs_d[:, None] * sq_d,
                     mask=(i[None, :] < Lq_b) & (offs_d[:, None] < D), other=0.0)  # (BLOCK_D, BLOCK_M)
        do = tl.load(do_base + i64[:, None] * sdo_l + offs_dv[None, :] * sdo_d,
                     mask=(i[:, None] < Lq_b) & (offs_dv[None, :] < Dv), other=0.0)
        lse2, delta = _load_lse2(Lse, Delta, row_base, i64, Lq_b)
        pt = _probs_tile(k, qt, lse2, b, h_row, i, j, Lq_b, Lk_b, Bias, sb_b, sb_h, sb_i, sb_j, Slopes,
                         ss_b, ss_h, qk_scale, win_left, win_right, BIAS_KIND, CAUSAL, WINDOW_LEFT,
                         WINDOW_RIGHT, HAS_ALIBI, IEEE_DOT, MASK_KEYS, True)  # (BLOCK_N, BLOCK_M)
        dpt = _dot(v, tl.trans(do), IEEE_DOT)
        if DROPOUT:
            keep = tl.trans(_dropout_keep(seed, b_drop, h_row, i, n0, H, Lq_b, Lk_b, drop_threshold, BLOCK_N))
            zt = tl.where(keep, pt * drop_scale, 0.0)
            dpt = tl.where(keep, dpt * drop_scale, 0.0)
        else:
            zt = pt
        dst = pt * (dpt - delta[None, :])
        dv += _dot(zt.to(do.dtype), do, IEEE_DOT)
        dk += _dot(dst.to(qt.dtype), tl.trans(qt), IEEE_DOT)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, dOut,  # q (B, H, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv), dout (B, H, Lq, Dv) by strides
    Lse, Delta,  # (B, H, Lq) float32 contiguous; varlen (H, total_q)
    dK, dV,  # (B, Hkv, Lk, D) / (B, Hkv, Lk, Dv) by strides (varlen: (total_k, Hkv, .))
    Bias, Slopes, Seed, CuQ, CuK,
    sq_b, sq_h, sq_l, sq_d, sk_b, sk_h, sk_l, sk_d, sv_b, sv_h, sv_l, sv_d,
    sdo_b, sdo_h, sdo_l, sdo_d, sdk_b, sdk_h, sdk_l, sdk_d, sdv_b, sdv_h, sdv_l, sdv_d,
    sb_b, sb_h, sb_i, sb_j, ss_b, ss_h,
    B, H, G, Lq, Lk, D, Dv, total_q,
    sm_scale, qk_scale, win_left, win_right, drop_threshold, drop_scale,
    key_lq, key_lk,
    BIAS_KIND: tl.constexpr, CAUSAL: tl.constexpr, WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr,
    HAS_ALIBI: tl.constexpr, DROPOUT: tl.constexpr, VARLEN: tl.constexpr, IEEE_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    Hkv = H // G
    num_n = tl.cdiv(Lk, BLOCK_N)
    pid_n = pid % num_n
    bh = pid // num_n
    b = bh // Hkv
    hkv = bh % Hkv
    q_start, Lq_b, k_start, Lk_b = _seq_bounds(CuQ, CuK, b, Lq, Lk, VARLEN)
    seed = 0
    if DROPOUT:
        seed = _load_seed(Seed, b, VARLEN)
    b_drop = b * 0 if VARLEN else b
    n0 = (pid_n * BLOCK_N).to(tl.int32)
    j = n0 + tl.arange(0, BLOCK_N)
    j64 = j.to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k = tl.load(K + b * sk_b + hkv * sk_h + (k_start + j64[:, None]) * sk_l + offs_d[None, :] * sk_d,
                mask=(j[:, None] < Lk_b) & (offs_d[None, :] < D), other=0.0)  # (BLOCK_N, BLOCK_D)
    v = tl.load(V + b * sv_b + hkv * sv_h + (k_start + j64[:, None]) * sv_l + offs_dv[None, :] * sv_d,
                mask=(j[:, None] < Lk_b) & (offs_dv[None, :] < Dv), other=0.0)  # (BLOCK_N, BLOCK_DV)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)

    # query rows i that can see keys n0..n0+BLOCK_N-1
    lo = n0 * 0
    hi = lo + Lq_b
    if CAUSAL:
        lo = tl.maximum(lo, n0)
    if WINDOW_RIGHT:
        lo = tl.maximum(lo, n0 - win_right)
    if WINDOW_LEFT:
        hi = tl.minimum(hi, n0 + BLOCK_N + win_left)
    lo = (lo // BLOCK_M) * BLOCK_M
    if n0 >= Lk_b:
        hi = lo
    m_full_lo = lo
    m_full_hi = hi
    if CAUSAL:
        m_full_lo = tl.maximum(m_full_lo, n0 + BLOCK_N - 1)
    if WINDOW_RIGHT:
        m_full_lo = tl.maximum(m_full_lo, n0 + BLOCK_N - 1 - win_right)
    if WINDOW_LEFT:
        m_full_hi = tl.minimum(m_full_hi, ((n0 + win_left + 1) // BLOCK_M) * BLOCK_M)
    m_full_lo = tl.minimum(tl.cdiv(m_full_lo, BLOCK_M) * BLOCK_M, hi)
    if n0 + BLOCK_N > Lk_b:  # a ragged key block is masked everywhere
        m_full_hi = m_full_lo
    m_full_hi = tl.maximum(m_full_hi, m_full_lo)
    for g in range(0, G):
        h = hkv * G + g
        h_row = (h + offs_m * 0).to(tl.int64)
        if VARLEN:
            row_base = h * total_q + q_start
        else:
            row_base = (b * H + h) * Lq
        q_base = Q + b * sq_b + h * sq_h + q_start * sq_l
        do_base = dOut + b * sdo_b + h * sdo_h + q_start * sdo_l
        # query blocks [m_full_lo, m_full_hi) see this key block whole: no causal/window/bound mask
        dk, dv = _dkdv_tiles(
            lo, m_full_lo, q_base, do_base, sq_l, sq_d, sdo_l, sdo_d, Lse, Delta, row_base, k, v, dk, dv, b, b_drop,
            h_row, j, Lq_b, Lk_b, H, D, Dv, Bias, sb_b, sb_h, sb_i, sb_j, Slopes, ss_b, ss_h, qk_scale, win_left,
            win_right, seed, drop_threshold, drop_scale, BIAS_KIND, CAUSAL, WINDOW_LEFT, WINDOW_RIGHT, HAS_ALIBI,
            DROPOUT, IEEE_DOT, True, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV)
        dk, dv = _dkdv_tiles(
            m_full_lo, m_full_hi, q_base, do_base, sq_l, sq_d, sdo_l, sdo_d, Lse, Delta, row_base, k, v, dk, dv, b,
            b_drop, h_row, j, Lq_b, Lk_b, H, D, Dv, Bias, sb_b, sb_h, sb_i, sb_j, Slopes, ss_b, ss_h, qk_scale,
            win_left, win_right, seed, drop_threshold, drop_scale, BIAS_KIND, CAUSAL, WINDOW_LEFT, WINDOW_RIGHT,
            HAS_ALIBI, DROPOUT, IEEE_DOT, False, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV)
        dk, dv = _dkdv_tiles(
            m_full_hi, hi, q_base, do_base, sq_l, sq_d, sdo_l, sdo_d, Lse, Delta, row_base, k, v, dk, dv, b, b_drop,
            h_row, j, Lq_b, Lk_b, H, D, Dv, Bias, sb_b, sb_h, sb_i, sb_j, Slopes, ss_b, ss_h, qk_scale, win_left,
            win_right, seed, drop_threshold, drop_scale, BIAS_KIND, CAUSAL, WINDOW_LEFT, WINDOW_RIGHT, HAS_ALIBI,
            DROPOUT, IEEE_DOT, True, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV)
    dk = dk * sm_scale
    nmask = j[:, None] < Lk_b
    tl.store(dK + b * sdk_b + hkv * sdk_h + (k_start + j64[:, None]) * sdk_l + offs_d[None, :] * sdk_d,
             dk.to(dK.dtype.element_ty), mask=nmask & (offs_d[None, :] < D))
    tl.store(dV + b * sdv_b + hkv * sdv_h + (k_start + j64[:, None]) * sdv_l + offs_dv[None, :] * sdv_d,
             dv.to(dV.dtype.element_ty), mask=nmask & (offs_dv[None, :] < Dv))


@triton.jit
def _dq_tiles(dq, lo, hi, q, do, lse2, delta, k_base, v_base, sk_l, sk_d, sv_l, sv_d, b, b_drop, h_row, i, Lq_b, Lk_b,
              H, D, Dv, Bias, sb_b, sb_h, sb_i, sb_j, Slopes, ss_b, ss_h, qk_scale, win_left, win_right, seed,
              drop_threshold, drop_scale, BIAS_KIND: tl.constexpr, CAUSAL: tl.constexpr, WINDOW_LEFT: tl.constexpr,
              WINDOW_RIGHT: tl.constexpr, HAS_ALIBI: tl.constexpr, DROPOUT: tl.constexpr, IEEE_DOT: tl.constexpr,
              MASK_KEYS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """dQ contributions of key tiles [lo, hi) to one query block."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for start_n in range(lo, hi, BLOCK_N):
        j = start_n + offs_n
        j64 = j.to(tl.int64)
        kt = tl.load(k_base + j64[None, :] * sk_l + offs_d[:, None] * sk_d,
                     mask=(j[None, :] < Lk_b) & (offs_d[:, None] < D), other=0.0)
        vt = tl.load(v_base + j64[None, :] * sv_l + offs_dv[:, None] * sv_d,
                     mask=(j[None, :] < Lk_b) & (offs_dv[:, None] < Dv), other=0.0)
        p = _probs_tile(q, kt, lse2, b, h_row, i, j, Lq_b, Lk_b, Bias, sb_b, sb_h, sb_i, sb_j, Slopes,
                        ss_b, ss_h, qk_scale, win_left, win_right, BIAS_KIND, CAUSAL, WINDOW_LEFT,
                        WINDOW_RIGHT, HAS_ALIBI, IEEE_DOT, MASK_KEYS)
        dp = _dot(do, vt, IEEE_DOT)
        if DROPOUT:
            keep = _dropout_keep(seed, b_drop, h_row, i, start_n, H, Lq_b, Lk_b, drop_threshold, BLOCK_N)
            dp = tl.where(keep, dp * drop_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(kt.dtype), tl.trans(kt), IEEE_DOT)
    return dq


@triton.jit
def _attn_bwd_dq(
    Q, K, V, dOut, Lse, Delta,  # as in _attn_bwd_dkdv
    dQ,  # (B, H, Lq, D) by strides (varlen: (total_q, H, D))
    Bias, Slopes, Seed, CuQ, CuK,
    sq_b, sq_h, sq_l, sq_d, sk_b, sk_h, sk_l, sk_d, sv_b, sv_h, sv_l, sv_d,
    sdo_b, sdo_h, sdo_l, sdo_d, sdq_b, sdq_h, sdq_l, sdq_d,
    sb_b, sb_h, sb_i, sb_j, ss_b, ss_h,
    B, H, G, Lq, Lk, D, Dv, total_q,
    sm_scale, qk_scale, win_left, win_right, drop_threshold, drop_scale,
    key_lq, key_lk,
    BIAS_KIND: tl.constexpr, CAUSAL: tl.constexpr, WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr,
    HAS_ALIBI: tl.constexpr, DROPOUT: tl.constexpr, VARLEN: tl.constexpr, IEEE_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    num_m = tl.cdiv(Lq, BLOCK_M)
    pid_m = pid % num_m
    bh = pid // num_m
    b = bh // H
    h = bh % H
    if CAUSAL:
        pid_m = num_m - 1 - pid_m
    hkv = h // G
    q_start, Lq_b, k_start, Lk_b = _seq_bounds(CuQ, CuK, b, Lq, Lk, VARLEN)
    seed = 0
    if DROPOUT:
        seed = _load_seed(Seed, b, VARLEN)
    b_drop = b * 0 if VARLEN else b
    row_base = h * total_q + q_start if VARLEN else (b * H + h) * Lq
    offs_m = tl.arange(0, BLOCK_M)
    i = (pid_m * BLOCK_M).to(tl.int32) + offs_m
    i64 = i.to(tl.int64)
    h_row = (h + offs_m * 0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = i < Lq_b
    q = tl.load(Q + b * sq_b + h * sq_h + (q_start + i64[:, None]) * sq_l + offs_d[None, :] * sq_d,
                mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    do = tl.load(dOut + b * sdo_b + h * sdo_h + (q_start + i64[:, None]) * sdo_l + offs_dv[None, :] * sdo_d,
                 mask=row_ok[:, None] & (offs_dv[None, :] < Dv), other=0.0)
    lse2, delta = _load_lse2(Lse, Delta, row_base, i64, Lq_b)
    k_base = K + b * sk_b + hkv * sk_h + k_start * sk_l
    v_base = V + b * sv_b + hkv * sv_h + k_start * sv_l
    i_lo = (pid_m * BLOCK_M).to(tl.int32)
    i_hi = tl.minimum(i_lo + BLOCK_M, Lq_b) - 1
    lo, hi = _key_range(i_lo, i_hi, Lk_b, win_left, win_right, CAUSAL, WINDOW_LEFT, WINDOW_RIGHT, BLOCK_N)
    full_lo, full_hi = _whole_key_range(lo, hi, i_lo, i_hi, Lk_b, win_left, win_right, CAUSAL, WINDOW_LEFT,
                                        WINDOW_RIGHT, BLOCK_N)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _dq_tiles(
        dq, lo, full_lo, q, do, lse2, delta, k_base, v_base, sk_l, sk_d, sv_l, sv_d, b, b_drop, h_row, i, Lq_b, Lk_b, H,
        D, Dv, Bias, sb_b, sb_h, sb_i, sb_j, Slopes, ss_b, ss_h, qk_scale, win_left, win_right, seed, drop_threshold,
        drop_scale, BIAS_KIND, CAUSAL, WINDOW_LEFT, WINDOW_RIGHT, HAS_ALIBI, DROPOUT, IEEE_DOT, True, BLOCK_N, BLOCK_D,
        BLOCK_DV)
    dq = _dq_tiles(
        dq, full_lo, full_hi, q, do, lse2, delta, k_base, v_base, sk_l, sk_d, sv_l, sv_d, b, b_drop, h_row, i, Lq_b,
        Lk_b, H, D, Dv, Bias, sb_b, sb_h, sb_i, sb_j, Slopes, ss_b, ss_h, qk_scale, win_left, win_right, seed,
        drop_threshold, drop_scale, BIAS_KIND, CAUSAL, WINDOW_LEFT, WINDOW_RIGHT, HAS_ALIBI, DROPOUT, IEEE_DOT, False,
        BLOCK_N, BLOCK_D, BLOCK_DV)
    dq = _dq_tiles(
        dq, full_hi, hi, q, do, lse2, delta, k_base, v_base, sk_l, sk_d, sv_l, sv_d, b, b_drop, h_row, i, Lq_b, Lk_b, H,
        D, Dv, Bias, sb_b, sb_h, sb_i, sb_j, Slopes, ss_b, ss_h, qk_scale, win_left, win_right, seed, drop_threshold,
        drop_scale, BIAS_KIND, CAUSAL, WINDOW_LEFT, WINDOW_RIGHT, HAS_ALIBI, DROPOUT, IEEE_DOT, True, BLOCK_N, BLOCK_D,
        BLOCK_DV)
    dq = dq * sm_scale
    tl.store(dQ + b * sdq_b + h * sdq_h + (q_start + i64[:, None]) * sdq_l + offs_d[None, :] * sdq_d,
             dq.to(dQ.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < D))


# --------------------------------------------------------------------------------------------
# configs and launcher
# --------------------------------------------------------------------------------------------


def bwd_configs():
    if interpreted():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    # sized for H100 (sm_90); the backward holds two accumulators (dK, dV or dQ) and four operand
    # tiles per step, so prune_bwd keeps far fewer than in the forward. The last fits every dtype
    # and head dim (fp32 "ieee" and D = 256 included): the untuned fallback.
    shapes = [(64, 128, 8, 2), (128, 64, 8, 2), (64, 64, 4, 3), (64, 64, 8, 2), (32, 64, 4, 2), (64, 32, 4, 2),
              (32, 32, 4, 2), (16, 32, 4, 1), (32, 32, 8, 1), (16, 32, 8, 1)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


def prune_bwd(configs, named_args, **meta):
    """The backward family's rule (dK/dV and dQ): keep the tiles that fit this call's dtype and
    head dims (see attention_resources.fits_bwd)."""
    q = named_args["Q"]
    elt, smem = q.element_size(), _autotune.smem_limit(q.device)
    kept = [c for c in configs if resources.fits_bwd(c, meta["BLOCK_D"], meta["BLOCK_DV"], elt, meta["IEEE_DOT"], smem)]
    return kept or configs[-1:]


_KEY = ["key_lq", "key_lk", "BLOCK_D", "BLOCK_DV", "BIAS_KIND", "CAUSAL", "DROPOUT", "VARLEN"]


@functools.cache
def _tuned(name):
    """(kernel, fixed config or None) of "dkdv" or "dq": the autotuner, or the interpreter's one config."""
    kernel = {"dkdv": _attn_bwd_dkdv, "dq": _attn_bwd_dq}[name]
    configs = bwd_configs()
    if len(configs) == 1:
        return kernel, configs[0]
    return _autotune.autotune(configs, _KEY, prune_bwd, _autotune.smallest)(kernel), None


def launch_backward(do, q, k, v, out, lse, dq, dk, dv, dbias, bias, slopes, causal, scale, window, dropout_p,
                    seed, drop_threshold, strides, B, H, G, Lq, Lk, total_q=0, cu_q=None, cu_k=None):
    """Launch delta, dK/dV, dQ (and dbias when ``dbias`` is given). ``strides`` maps each of
    q, k, v, do, out, dq, dk, dv to its (batch, head, token, dim) strides as the kernels read
    them; ``lse`` is (B, H, Lq) contiguous float32 (varlen: (H, total_q))."""
    D, Dv = q.shape[-1], v.shape[-1]
    varlen = cu_q is not None
    # delta = rowsum(dO * O): varlen tensors are read as one batch of total_q tokens
    if varlen:
        delta = torch.empty(H, total_q, dtype=torch.float32, device=q.device)
        dB, dL = 1, total_q
    else:
        delta = torch.empty(B, H, Lq, dtype=torch.float32, device=q.device)
        dB, dL = B, Lq
    if dL > 0:
        bm = 16 if interpreted() else 64
        _attn_bwd_delta[(triton.cdiv(dL, bm) * dB * H,)](out, do, delta, *strides["out"], *strides["do"], H, dL, Dv,
                                                       BLOCK_M=bm, BLOCK_DV=block_d(Dv))
    pointers = pointer_args(q, bias, slopes, seed, dropout_p)
    cu = (cu_q if varlen else q, cu_k if varlen else q)
    tail = (*bias_strides(bias), *slope_strides(slopes), B, H, G, Lq, Lk, D, Dv, total_q, float(scale),
            float(scale) * LOG2E, int(window[0]), int(window[1]), *dropout_args(dropout_p, drop_threshold),
            pow2(Lq), pow2(Lk))
    meta = dict(flags(bias, causal, window, slopes, dropout_p), VARLEN=varlen, IEEE_DOT=ieee_dot(q),
                BLOCK_D=block_d(D), BLOCK_DV=block_d(Dv))
    qkv = (*strides["q"], *strides["k"], *strides["v"], *strides["do"])

    kernel, config = _tuned("dkdv")
    grid = lambda m: (triton.cdiv(Lk, m["BLOCK_N"]) * B * (H // G),)  # noqa: E731
    kernel[grid](q, k, v, do, lse, delta, dk, dv, *pointers, *cu, *qkv, *strides["dk"], *strides["dv"], *tail,
                 **with_config(meta, config))
    kernel, config = _tuned("dq")
    grid = lambda m: (triton.cdiv(Lq, m["BLOCK_M"]) * B * H,)  # noqa: E731
    kernel[grid](q, k, v, do, lse, delta, dq, *pointers, *cu, *qkv, *strides["dq"], *tail,
                 **with_config(meta, config))
    if dbias is not None:
        launch_dbias(do, q, k, v, lse, delta, dbias, bias, slopes, scale, window, dropout_p, pointers, strides,
                     meta, B, H, G, Lq, Lk, drop_threshold)

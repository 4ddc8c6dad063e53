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
  _attn_bwd_dbias   one program per tile of the bias's own shape, looping over the batch, head,
                    row and column blocks the bias broadcasts over (only when the bias needs grad)
"""

import functools

import torch
import triton
import triton.language as tl
from fusedformer.kernels.attention import (
    LOG2E,
    _dot,
    _dropout_keep,
    _key_range,
    _seq_bounds,
    _tile_scores,
    bias_strides,
    block_d,
    flags,
    ieee_dot,
    interpreted,
    pow2,
)


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
def _probs_tile(q, kt, lse2, b, h_row, i_row, j, Lq_b, Lk_b, Bias, sb_b, sb_h, sb_i, sb_j, Slopes, ss_b, ss_h,
                qk_scale, win_left, win_right, BIAS_KIND: tl.constexpr, CAUSAL: tl.constexpr,
                WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, HAS_ALIBI: tl.constexpr,
                IEEE_DOT: tl.constexpr, MASK_KEYS: tl.constexpr = True):
    """P = exp2(S - lse2) for a (BLOCK_M, BLOCK_N) tile; lse2 = +inf on dead rows gives P = 0."""
    qk = _dot(q, kt, IEEE_DOT)
    s = _tile_scores(qk, b, h_row, i_row, j, Lq_b, Lk_b, Bias, sb_b, sb_h, sb_i, sb_j, Slopes, ss_b, ss_h,
                     qk_scale, win_left, win_right, BIAS_KIND, CAUSAL, WINDOW_LEFT, WINDOW_RIGHT, HAS_ALIBI,
                     MASK_KEYS)
    return tl.math.exp2(s - lse2[:, None])


@triton.jit
def _load_lse2(Lse, Delta, row_base, i, Lq_b):
    """lse in log2 units (+inf for dead rows and rows past the end) and delta of rows i."""
    lse = tl.load(Lse + row_base + i, mask=i < Lq_b, other=float("-inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    delta = tl.load(Delta + row_base + i, mask=i < Lq_b, other=0.0)
    return lse2, delta


@triton.jit
def _dkdv_tiles(lo, hi, q_base, do_base, sq_l, sq_d, sdo_l, sdo_d, Lse, Delta, row_base, kt, vt, dk, dv, b, b_drop,
                h_row, j, Lq_b, Lk_b, H, D, Dv, Bias, sb_b, sb_h, sb_i, sb_j, Slopes, ss_b, ss_h, qk_scale, win_left,
                win_right, seed, drop_threshold, drop_scale, BIAS_KIND: tl.constexpr, CAUSAL: tl.constexpr,
                WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, HAS_ALIBI: tl.constexpr, DROPOUT: tl.constexpr,
                IEEE_DOT: tl.constexpr, MASK_KEYS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_DV: tl.constexpr):
    """dK, dV contributions of one query head's row blocks [lo, hi) to one key block."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for start_m in range(lo, hi, BLOCK_M):
        i = start_m + offs_m
        i64 = i.to(tl.int64)
        q = tl.load(q_base + i64[:, None] * sq_l + offs_d[None, :] * sq_d,
                    mask=(i[:, None] < Lq_b) & (offs_d[None, :] < D), other=0.0)
        do = tl.load(do_base + i64[:, None] * sdo_l + offs_dv[None, :] * sdo_d,
                     mask=(i[:, None] < Lq_b) & (offs_dv[None, :] < Dv), other=0.0)
        lse2, delta = _load_lse2(Lse, Delta, row_base, i64, Lq_b)
        p = _probs_tile(q, kt, lse2, b, h_row, i, j, Lq_b, Lk_b, Bias, sb_b, sb_h, sb_i, sb_j, Slopes,
                        ss_b, ss_h, qk_scale, win_left, win_right, BIAS_KIND, CAUSAL, WINDOW_LEFT,
                        WINDOW_RIGHT, HAS_ALIBI, IEEE_DOT, MASK_KEYS)
        dp = _dot(do, vt, IEEE_DOT)
        if DROPOUT:
            keep = _dropout_keep(seed, b_drop, h_row, i, j, H, Lq_b, Lk_b, drop_threshold)
            z = tl.where(keep, p * drop_scale, 0.0)
            dp = tl.where(keep, dp * drop_scale, 0.0)
        else:
            z = p
        ds = p * (dp - delta[:, None])
        dv += _dot(tl.trans(z.to(do.dtype)), do, IEEE_DOT)
        dk += _dot(tl.trans(ds.to(q.dtype)), q, IEEE_DOT)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, dOut,  # q (B, H, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv), dout (B, H, Lq, Dv) by strides
    Lse, Delta,  # (B, H, Lq) float32 contiguous; varlen (H, total_q)
    dK, dV,  # (B, Hkv, Lk, D) / (B, Hkv, Lk, Dv) by strides (varlen: (total_k, Hkv, .))
    Bias, Slopes, CuQ, CuK,
    sq_b, sq_h, sq_l, sq_d, sk_b, sk_h, sk_l, sk_d, sv_b, sv_h, sv_l, sv_d,
    sdo_b, sdo_h, sdo_l, sdo_d, sdk_b, sdk_h, sdk_l, sdk_d, sdv_b, sdv_h, sdv_l, sdv_d,
    sb_b, sb_h, sb_i, sb_j, ss_b, ss_h,
    B, H, G, Lq, Lk, D, Dv, total_q,
    sm_scale, qk_scale, win_left, win_right, seed, drop_threshold, drop_scale,
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
    if VARLEN:
        seed = seed + b
        b_drop = b * 0
    else:
        b_drop = b
    n0 = (pid_n * BLOCK_N).to(tl.int32)
    j = n0 + tl.arange(0, BLOCK_N)
    j64 = j.to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    kmask = (j[None, :] < Lk_b) & (offs_d[:, None] < D)
    kt = tl.load(K + b * sk_b + hkv * sk_h + (k_start + j64[None, :]) * sk_l + offs_d[:, None] * sk_d,
                 mask=kmask, other=0.0)  # (BLOCK_D, BLOCK_N)
    vt = tl.load(V + b * sv_b + hkv * sv_h + (k_start + j64[None, :]) * sv_l + offs_dv[:, None] * sv_d,
                 mask=(j[None, :] < Lk_b) & (offs_dv[:, None] < Dv), other=0.0)  # (BLOCK_DV, BLOCK_N)
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
            lo, m_full_lo, q_base, do_base, sq_l, sq_d, sdo_l, sdo_d, Lse, Delta, row_base, kt, vt, dk, dv, b, b_drop,
            h_row, j, Lq_b, Lk_b, H, D, Dv, Bias, sb_b, sb_h, sb_i, sb_j, Slopes, ss_b, ss_h, qk_scale, win_left,
            win_right, seed, drop_threshold, drop_scale, BIAS_KIND, CAUSAL, WINDOW_LEFT, WINDOW_RIGHT, HAS_ALIBI,
            DROPOUT, IEEE_DOT, True, BLOCK_M, BLOCK_D, BLOCK_DV)
        dk, dv = _dkdv_tiles(
            m_full_lo, m_full_hi, q_base, do_base, sq_l, sq_d, sdo_l, sdo_d, Lse, Delta, row_base, kt, vt, dk, dv, b,
            b_drop, h_row, j, Lq_b, Lk_b, H, D, Dv, Bias, sb_b, sb_h, sb_i, sb_j, Slopes, ss_b, ss_h, qk_scale,
            win_left, win_right, seed, drop_threshold, drop_scale, BIAS_KIND, CAUSAL, WINDOW_LEFT, WINDOW_RIGHT,
            HAS_ALIBI, DROPOUT, IEEE_DOT, False, BLOCK_M, BLOCK_D, BLOCK_DV)
        dk, dv = _dkdv_tiles(
            m_full_hi, hi, q_base, do_base, sq_l, sq_d, sdo_l, sdo_d, Lse, Delta, row_base, kt, vt, dk, dv, b, b_drop,
            h_row, j, Lq_b, Lk_b, H, D, Dv, Bias, sb_b, sb_h, sb_i, sb_j, Slopes, ss_b, ss_h, qk_scale, win_left,
            win_right, seed, drop_threshold, drop_scale, BIAS_KIND, CAUSAL, WINDOW_LEFT, WINDOW_RIGHT, HAS_ALIBI,
            DROPOUT, IEEE_DOT, True, BLOCK_M, BLOCK_D, BLOCK_DV)
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
            keep = _dropout_keep(seed, b_drop, h_row, i, j, H, Lq_b, Lk_b, drop_threshold)
            dp = tl.where(keep, dp * drop_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(kt.dtype), tl.trans(kt), IEEE_DOT)
    return dq


@triton.jit
def _attn_bwd_dq(
    Q, K, V, dOut, Lse, Delta,  # as in _attn_bwd_dkdv
    dQ,  # (B, H, Lq, D) by strides (varlen: (total_q, H, D))
    Bias, Slopes, CuQ, CuK,
    sq_b, sq_h, sq_l, sq_d, sk_b, sk_h, sk_l, sk_d, sv_b, sv_h, sv_l, sv_d,
    sdo_b, sdo_h, sdo_l, sdo_d, sdq_b, sdq_h, sdq_l, sdq_d,
    sb_b, sb_h, sb_i, sb_j, ss_b, ss_h,
    B, H, G, Lq, Lk, D, Dv, total_q,
    sm_scale, qk_scale, win_left, win_right, seed, drop_threshold, drop_scale,
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
    if VARLEN:
        seed = seed + b
        b_drop = b * 0
        row_base = h * total_q + q_start
    else:
        b_drop = b
        row_base = (b * H + h) * Lq
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
    # keys [full_lo, full_hi) are whole for every row of the block: no causal/window/bound mask there
    full_lo = lo
    full_hi = tl.minimum(hi, (Lk_b // BLOCK_N) * BLOCK_N)
    if CAUSAL:
        full_hi = tl.minimum(full_hi, ((i_lo + 1) // BLOCK_N) * BLOCK_N)
    if WINDOW_RIGHT:
        full_hi = tl.minimum(full_hi, ((i_lo + win_right + 1) // BLOCK_N) * BLOCK_N)
    if WINDOW_LEFT:
        full_lo = tl.maximum(full_lo, tl.cdiv(i_hi - win_left, BLOCK_N) * BLOCK_N)
    full_lo = tl.minimum(full_lo, hi)
    full_hi = tl.maximum(full_hi, full_lo)
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


@triton.jit
def _attn_bwd_dbias(
    Q, K, V, dOut, Lse, Delta,  # dense only; as in _attn_bwd_dkdv
    dBias,  # (Bb, Hb, Lqb, Lkb) contiguous, each dim 1 or the full size
    Bias, Slopes,
    sq_b, sq_h, sq_l, sq_d, sk_b, sk_h, sk_l, sk_d, sv_b, sv_h, sv_l, sv_d,
    sdo_b, sdo_h, sdo_l, sdo_d,
    sb_b, sb_h, sb_i, sb_j, ss_b, ss_h,
    B, H, G, Lq, Lk, D, Dv, Bb, Hb, Lqb, Lkb,  # bias shape (Bb, Hb, Lqb, Lkb)
    n_b, n_h, n_m, n_n,  # how many batches, heads, row and column blocks each bias tile sums over
    qk_scale, win_left, win_right, seed, drop_threshold, drop_scale,
    BIAS_KIND: tl.constexpr, CAUSAL: tl.constexpr, WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr,
    HAS_ALIBI: tl.constexpr, DROPOUT: tl.constexpr, IEEE_DOT: tl.constexpr, ROW_BCAST: tl.constexpr,
    COL_BCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """dbias[tile] = sum of dS over every (b, h, i, j) the tile's bias elements were broadcast to.
    A broadcast dim has one tile (index 0) and its loop runs over the full dim; the others loop once."""
    pid = tl.program_id(0).to(tl.int64)
    num_mb = tl.cdiv(Lqb, BLOCK_M)
    num_nb = tl.cdiv(Lkb, BLOCK_N)
    tile_m = pid % num_mb
    rest = pid // num_mb
    tile_n = rest % num_nb
    rest = rest // num_nb
    hb = rest % Hb
    bb = rest // Hb
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for ib in range(0, n_b):
        b = bb + ib
        for ih in range(0, n_h):
            h = hb + ih
            hkv = h // G
            h_row = h + offs_m.to(tl.int64) * 0
            row_base = (b * H + h) * Lq
            for im in range(0, n_m):
                i = (tile_m + im) * BLOCK_M + offs_m
                i64 = i.to(tl.int64)
                q = tl.load(Q + b * sq_b + h * sq_h + i64[:, None] * sq_l + offs_d[None, :] * sq_d,
                            mask=(i[:, None] < Lq) & (offs_d[None, :] < D), other=0.0)
                do = tl.load(dOut + b * sdo_b + h * sdo_h + i64[:, None] * sdo_l + offs_dv[None, :] * sdo_d,
                             mask=(i[:, None] < Lq) & (offs_dv[None, :] < Dv), other=0.0)
                lse2, delta = _load_lse2(Lse, Delta, row_base, i64, Lq)
                for jn in range(0, n_n):
                    j = (tile_n + jn) * BLOCK_N + offs_n
                    j64 = j.to(tl.int64)
                    kt = tl.load(K + b * sk_b + hkv * sk_h + j64[None, :] * sk_l + offs_d[:, None] * sk_d,
                                 mask=(j[None, :] < Lk) & (offs_d[:, None] < D), other=0.0)
                    vt = tl.load(V + b * sv_b + hkv * sv_h + j64[None, :] * sv_l + offs_dv[:, None] * sv_d,
                                 mask=(j[None, :] < Lk) & (offs_dv[:, None] < Dv), other=0.0)
                    p = _probs_tile(q, kt, lse2, b, h_row, i, j, Lq, Lk, Bias, sb_b, sb_h, sb_i, sb_j, Slopes,
                                    ss_b, ss_h, qk_scale, win_left, win_right, BIAS_KIND, CAUSAL, WINDOW_LEFT,
                                    WINDOW_RIGHT, HAS_ALIBI, IEEE_DOT)
                    dp = _dot(do, vt, IEEE_DOT)
                    if DROPOUT:
                        keep = _dropout_keep(seed, b, h_row, i, j, H, Lq, Lk, drop_threshold)
                        dp = tl.where(keep, dp * drop_scale, 0.0)
                    ds = p * (dp - delta[:, None])
                    ok = (i[:, None] < Lq) & (j[None, :] < Lk)
                    acc += tl.where(ok, ds, 0.0)
    out_i = tile_m * BLOCK_M + offs_m
    out_j = tile_n * BLOCK_N + offs_n
    base = dBias + ((bb * Hb + hb) * Lqb) * Lkb
    if ROW_BCAST:
        if COL_BCAST:
            total = tl.sum(tl.sum(acc, 1), 0)
            tl.store(base + offs_m * 0, (total + offs_m * 0.0).to(dBias.dtype.element_ty), mask=offs_m == 0)
        else:
            col = tl.sum(acc, 0)
            tl.store(base + out_j, col.to(dBias.dtype.element_ty), mask=out_j < Lkb)
    else:
        if COL_BCAST:
            row = tl.sum(acc, 1)
            tl.store(base + out_i, row.to(dBias.dtype.element_ty), mask=out_i < Lqb)
        else:
            ptrs = base + out_i[:, None].to(tl.int64) * Lkb + out_j[None, :]
            tl.store(ptrs, acc.to(dBias.dtype.element_ty), mask=(out_i[:, None] < Lqb) & (out_j[None, :] < Lkb))


# --------------------------------------------------------------------------------------------
# configs and launcher
# --------------------------------------------------------------------------------------------


def bwd_configs():
    if interpreted():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    # sm_90: the backward holds two accumulators (dK, dV or dQ) and four operand tiles per step,
    # so tiles are half the forward's; D = 256 only fits the 64x32 and smaller ones.
    shapes = [(64, 128, 8, 2), (128, 64, 8, 2), (64, 64, 4, 3), (64, 64, 8, 2), (32, 64, 4, 2), (64, 32, 4, 2),
              (32, 32, 4, 2), (16, 32, 4, 1)]  # the last fits fp32 at D = 256
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


def _prune_bwd(configs, named_args, **kwargs):
    bd = max(kwargs.get("BLOCK_D", 64), kwargs.get("BLOCK_DV", 64))
    kept = [c for c in configs
            if not (bd >= 256 and c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] > 64 * 32)
            and not (bd >= 128 and c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] > 64 * 64 and c.num_warps < 8)]
    return kept or configs[-1:]


_KEY = ["key_lq", "key_lk", "BLOCK_D", "BLOCK_DV", "BIAS_KIND", "CAUSAL", "DROPOUT", "VARLEN"]


@functools.cache
def _tuned(name):
    kernel = {"dkdv": _attn_bwd_dkdv, "dq": _attn_bwd_dq}[name]
    configs = bwd_configs()
    if len(configs) == 1:
        return kernel, configs[0]
    return triton.autotune(configs=configs, key=_KEY, prune_configs_by={"early_config_prune": _prune_bwd})(kernel), None


def _with_config(meta, config):
    if config is not None:
        meta = dict(meta, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
    return meta


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
    dummy = q
    bias_arg = bias.view(torch.uint8) if bias is not None and not bias.is_floating_point() else bias
    ss = (0, 0)
    if slopes is not None:
        ss = (slopes.stride(0), slopes.stride(1)) if slopes.dim() == 2 else (0, slopes.stride(0))
    fl = flags(bias, causal, window, slopes, dropout_p)
    common = (bias_arg if bias_arg is not None else dummy, slopes if slopes is not None else dummy)
    cu = (cu_q if varlen else dummy, cu_k if varlen else dummy)
    drop = (int(seed) if seed is not None else 0, int(drop_threshold),
            1.0 / (1.0 - dropout_p) if dropout_p > 0 else 1.0)
    tail = (*bias_strides(bias), *ss, B, H, G, Lq, Lk, D, Dv, total_q, float(scale), float(scale) * LOG2E,
            int(window[0]), int(window[1]), *drop, pow2(Lq), pow2(Lk))
    meta = dict(fl, VARLEN=varlen, IEEE_DOT=ieee_dot(q), BLOCK_D=block_d(D), BLOCK_DV=block_d(Dv))
    qkv = (*strides["q"], *strides["k"], *strides["v"], *strides["do"])

    kernel, config = _tuned("dkdv")
    grid = lambda m: (triton.cdiv(Lk, m["BLOCK_N"]) * B * (H // G),)  # noqa: E731
    kernel[grid](q, k, v, do, lse, delta, dk, dv, *common, *cu, *qkv, *strides["dk"], *strides["dv"], *tail,
                 **_with_config(meta, config))
    kernel, config = _tuned("dq")
    grid = lambda m: (triton.cdiv(Lq, m["BLOCK_M"]) * B * H,)  # noqa: E731
    kernel[grid](q, k, v, do, lse, delta, dq, *common, *cu, *qkv, *strides["dq"], *tail,
                 **_with_config(meta, config))
    if dbias is not None:
        Bb, Hb, Lqb, Lkb = dbias.shape
        bm, bn = (16, 16) if interpreted() else (64, 64)
        nw = 4 if interpreted() or max(D, Dv) <= 64 else 8
        grid = (triton.cdiv(Lqb, bm) * triton.cdiv(Lkb, bn) * Bb * Hb,)
        loops = (B if Bb == 1 else 1, H if Hb == 1 else 1, triton.cdiv(Lq, bm) if Lqb == 1 else 1,
                 triton.cdiv(Lk, bn) if Lkb == 1 else 1)
        _attn_bwd_dbias[grid](q, k, v, do, lse, delta, dbias, *common, *qkv, *bias_strides(bias), *ss,
                              B, H, G, Lq, Lk, D, Dv, Bb, Hb, Lqb, Lkb, *loops, float(scale) * LOG2E,
                              int(window[0]), int(window[1]), *drop, **fl, IEEE_DOT=ieee_dot(q),
                              ROW_BCAST=Lqb == 1, COL_BCAST=Lkb == 1,
                              BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d(D), BLOCK_DV=block_d(Dv), num_warps=nw)

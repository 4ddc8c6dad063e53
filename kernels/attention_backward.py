"""Flash attention backward, recomputing P from the saved log-sum-exp (no Lq x Lk storage).

Legend as in attention.py. With S the masked scores, P = exp(S - lse), Z = P * keep / (1 - p),
delta = rowsum(dO * O):
    dV = Z^T dO,  dP = (dO V^T) * keep / (1 - p),  dS = P * (dP - delta),
    dQ = scale * dS K,  dK = scale * dS^T Q,  dbias = dS summed over the bias's broadcast dims.
Every result is owned by exactly one program, so all of it is deterministic without atomics:
  _attn_bwd_delta   delta, reads Lq*Dv twice per head
  _attn_bwd_dkdv    one program per (key block, b, kv head, chunk of the group's G query heads),
                    looping over the heads of its chunk and the query blocks that can see it;
                    with more than one chunk each writes float32 partials, summed in chunk order
                    (_rows.sum_partials). SPLIT_DKDV tiles accumulate dV, store it, then dK.
                    On sm_90 Q and dO arrive through TMA descriptors (attention_common.use_tma).
  _attn_bwd_dq      one program per (query block, b, h), looping over its keys (a second
                    recompute of P: the price of a deterministic dQ without atomics)
and dbias (attention_dbias.py) when the bias needs its gradient.
"""

import functools

import torch
import triton
import triton.language as tl
from fusedformer.kernels import _autotune
from fusedformer.kernels import attention_common as common
from fusedformer.kernels import attention_resources as resources
from fusedformer.kernels._rows import sum_partials
from fusedformer.kernels.attention import run, with_config
from fusedformer.kernels.attention_common import (
    _dot,
    _dropout_keep,
    _key_range,
    _load_lse2,
    _load_rows,
    _probs_tile,
    _sequence,
    _store_rows,
    _whole_key_range,
    descriptors,
    interpreted,
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
def _dkdv_tiles(lo, hi, Q, dOut, b, h, q_start, sq_b, sq_h, sq_l, sq_d, sdo_b, sdo_h, sdo_l, sdo_d, Lse, Delta,
                row_base, k, v, dk, dv, b_drop, h_row, j, Lq_b, Lk_b, H, D, Dv, Bias, sb_b, sb_h, sb_i, sb_j, Slopes,
                ss_b, ss_h, qk_scale, win_left, win_right, seed, drop_threshold, drop_scale, BIAS_KIND: tl.constexpr,
                CAUSAL: tl.constexpr, WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, HAS_ALIBI: tl.constexpr,
                DROPOUT: tl.constexpr, IEEE_DOT: tl.constexpr, USE_TMA: tl.constexpr, VEC: tl.constexpr,
                DO_DK: tl.constexpr, DO_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """dK (DO_DK) and dV (DO_DV) contributions of one query head's row blocks [lo, hi) to one key
    block, in the transposed orientation (keys down the rows): S^T = K Q^T, dP^T = V dO^T, so P^T
    and dS^T are the left operands of dV += Z^T dO and dK += dS^T Q as they come out of the
    registers, and only loaded tiles (Q^T, dO) are read transposed, which the MMA takes from
    shared memory."""
    offs_m = tl.arange(0, BLOCK_M)
    n0 = tl.min(j, 0)
    for start_m in range(lo, hi, BLOCK_M):
        i = start_m + offs_m
        qt = tl.trans(_load_rows(Q, b, h, q_start, start_m, Lq_b, sq_b, sq_h, sq_l, sq_d, D, BLOCK_M, BLOCK_D,
                                 USE_TMA, VEC))  # (BLOCK_D, BLOCK_M)
        do = _load_rows(dOut, b, h, q_start, start_m, Lq_b, sdo_b, sdo_h, sdo_l, sdo_d, Dv, BLOCK_M, BLOCK_DV, USE_TMA,
                        VEC)
        lse2, delta = _load_lse2(Lse, Delta, row_base, i.to(tl.int64), Lq_b)
        pt = _probs_tile(k, qt, lse2, b, h_row, i, j, Lq_b, Lk_b, Bias, sb_b, sb_h, sb_i, sb_j, Slopes,
                         ss_b, ss_h, qk_scale, win_left, win_right, BIAS_KIND, CAUSAL, WINDOW_LEFT,
                         WINDOW_RIGHT, HAS_ALIBI, IEEE_DOT, True, True)  # (BLOCK_N, BLOCK_M)
        if DROPOUT:
            keep = tl.trans(_dropout_keep(seed, b_drop, h_row, i, n0, H, Lq_b, Lk_b, drop_threshold, BLOCK_N))
        if DO_DV:
            zt = pt
            if DROPOUT:
                zt = tl.where(keep, pt * drop_scale, 0.0)
            dv += _dot(zt.to(do.dtype), do, IEEE_DOT)
        if DO_DK:
            dpt = _dot(v, tl.trans(do), IEEE_DOT)
            if DROPOUT:
                dpt = tl.where(keep, dpt * drop_scale, 0.0)
            dst = pt * (dpt - delta[None, :])
            dk += _dot(dst.to(qt.dtype), tl.trans(qt), IEEE_DOT)
    return dk, dv


@triton.jit
def _dkdv_group(dk, dv, heads_lo, heads_hi, hkv, lo, hi, Q, dOut, b, q_start, sq_b, sq_h, sq_l,
                sq_d, sdo_b, sdo_h, sdo_l, sdo_d, Lse, Delta, k, v, b_drop, j, Lq, Lq_b, Lk_b, H, G, D, Dv, total_q,
                Bias, sb_b, sb_h, sb_i, sb_j, Slopes, ss_b, ss_h, qk_scale, win_left, win_right, seed, drop_threshold,
                drop_scale, BIAS_KIND: tl.constexpr, CAUSAL: tl.constexpr, WINDOW_LEFT: tl.constexpr,
                WINDOW_RIGHT: tl.constexpr, HAS_ALIBI: tl.constexpr, DROPOUT: tl.constexpr, VARLEN: tl.constexpr,
                IEEE_DOT: tl.constexpr, USE_TMA: tl.constexpr, VEC: tl.constexpr, DO_DK: tl.constexpr,
                DO_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_DV: tl.constexpr):
    """_dkdv_tiles over query heads g in [heads_lo, heads_hi) of kv head hkv's group and the query
    blocks [lo, hi) that see the key block. One loop body, masked throughout: a separate body for
    the blocks that see it whole (as the forward and dQ have) keeps each body's hoisted values live
    across all three loops, which at 64x128 and D = 128 spilled (kernels/attention_resources.py)."""
    for g in range(heads_lo, heads_hi):
        h = hkv * G + g
        h_row = (h + tl.arange(0, BLOCK_M) * 0).to(tl.int64)
        row_base = h * total_q + q_start if VARLEN else (b * H + h) * Lq
        dk, dv = _dkdv_tiles(
            lo, hi, Q, dOut, b, h, q_start, sq_b, sq_h, sq_l, sq_d, sdo_b, sdo_h, sdo_l, sdo_d, Lse, Delta, row_base,
            k, v, dk, dv, b_drop, h_row, j, Lq_b, Lk_b, H, D, Dv, Bias, sb_b, sb_h, sb_i, sb_j, Slopes, ss_b, ss_h,
            qk_scale, win_left, win_right, seed, drop_threshold, drop_scale, BIAS_KIND, CAUSAL, WINDOW_LEFT,
            WINDOW_RIGHT, HAS_ALIBI, DROPOUT, IEEE_DOT, USE_TMA, VEC, DO_DK, DO_DV, BLOCK_M, BLOCK_N, BLOCK_D,
            BLOCK_DV)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, dOut,  # q (B, H, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv), dout (B, H, Lq, Dv) by strides;
                    # USE_TMA: Q and dOut are tensor descriptors of block (1, 1, BLOCK_M, BLOCK_D|BLOCK_DV)
    Lse, Delta,  # (B, H, Lq) float32 contiguous; varlen (H, total_q)
    dK, dV,  # (B, Hkv, Lk, D) / (B, Hkv, Lk, Dv) by strides (varlen: (total_k, Hkv, .)), or with
             # head_chunks > 1 float32 partials, one such tensor per chunk (chunk strides sdk_s, sdv_s)
    Bias, Slopes, Seed, CuQ, CuK,
    sq_b, sq_h, sq_l, sq_d, sk_b, sk_h, sk_l, sk_d, sv_b, sv_h, sv_l, sv_d,
    sdo_b, sdo_h, sdo_l, sdo_d, sdk_b, sdk_h, sdk_l, sdk_d, sdv_b, sdv_h, sdv_l, sdv_d, sdk_s, sdv_s,
    sb_b, sb_h, sb_i, sb_j, ss_b, ss_h,
    B, H, G, Lq, Lk, D, Dv, total_q,
    sm_scale, qk_scale, win_left, win_right, drop_threshold, drop_scale,
    head_chunks,  # the G query heads of a group split in this many chunks, one program each
    key_lq, key_lk,
    BIAS_KIND: tl.constexpr, CAUSAL: tl.constexpr, WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr,
    HAS_ALIBI: tl.constexpr, DROPOUT: tl.constexpr, VARLEN: tl.constexpr, IEEE_DOT: tl.constexpr,
    USE_TMA: tl.constexpr, VEC: tl.constexpr, SPLIT_DKDV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    Hkv = H // G
    num_n = tl.cdiv(Lk, BLOCK_N)
    pid_n = pid % num_n
    rest = pid // num_n
    chunk = rest % head_chunks
    bh = rest // head_chunks
    b = bh // Hkv
    hkv = bh % Hkv
    q_start, Lq_b, k_start, Lk_b, seed, b_drop = _sequence(CuQ, CuK, Seed, b, Lq, Lk, DROPOUT, VARLEN)
    n0 = (pid_n * BLOCK_N).to(tl.int32)
    j = n0 + tl.arange(0, BLOCK_N)
    k = _load_rows(K, b, hkv, k_start, n0, Lk_b, sk_b, sk_h, sk_l, sk_d, D, BLOCK_N, BLOCK_D, False, VEC)
    v = _load_rows(V, b, hkv, k_start, n0, Lk_b, sv_b, sv_h, sv_l, sv_d, Dv, BLOCK_N, BLOCK_DV, False, VEC)
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
    heads_lo = chunk * (G // head_chunks)
    heads_hi = heads_lo + G // head_chunks
    dk_out = dK + chunk * sdk_s
    dv_out = dV + chunk * sdv_s
    if SPLIT_DKDV:  # dV, stored, then dK: one accumulator live at a time, for one more GEMM (S^T twice)
        _, dv = _dkdv_group(dk, dv, heads_lo, heads_hi, hkv, lo, hi, Q, dOut, b, q_start, sq_b,
                            sq_h, sq_l, sq_d, sdo_b, sdo_h, sdo_l, sdo_d, Lse, Delta, k, v, b_drop, j, Lq, Lq_b, Lk_b,
                            H, G, D, Dv, total_q, Bias, sb_b, sb_h, sb_i, sb_j, Slopes, ss_b, ss_h, qk_scale, win_left,
                            win_right, seed, drop_threshold, drop_scale, BIAS_KIND, CAUSAL, WINDOW_LEFT, WINDOW_RIGHT,
                            HAS_ALIBI, DROPOUT, VARLEN, IEEE_DOT, USE_TMA, VEC, False, True, BLOCK_M, BLOCK_N, BLOCK_D,
                            BLOCK_DV)
        _store_rows(dv_out, b, hkv, k_start, n0, Lk_b, sdv_b, sdv_h, sdv_l, sdv_d, Dv, dv, BLOCK_N, BLOCK_DV, VEC)
    dk, dv = _dkdv_group(dk, dv, heads_lo, heads_hi, hkv, lo, hi, Q, dOut, b, q_start, sq_b,
                         sq_h, sq_l, sq_d, sdo_b, sdo_h, sdo_l, sdo_d, Lse, Delta, k, v, b_drop, j, Lq, Lq_b, Lk_b, H,
                         G, D, Dv, total_q, Bias, sb_b, sb_h, sb_i, sb_j, Slopes, ss_b, ss_h, qk_scale, win_left,
                         win_right, seed, drop_threshold, drop_scale, BIAS_KIND, CAUSAL, WINDOW_LEFT, WINDOW_RIGHT,
                         HAS_ALIBI, DROPOUT, VARLEN, IEEE_DOT, USE_TMA, VEC, True, not SPLIT_DKDV, BLOCK_M, BLOCK_N,
                         BLOCK_D, BLOCK_DV)
    _store_rows(dk_out, b, hkv, k_start, n0, Lk_b, sdk_b, sdk_h, sdk_l, sdk_d, D, dk * sm_scale, BLOCK_N, BLOCK_D, VEC)
    if not SPLIT_DKDV:
        _store_rows(dv_out, b, hkv, k_start, n0, Lk_b, sdv_b, sdv_h, sdv_l, sdv_d, Dv, dv, BLOCK_N, BLOCK_DV, VEC)


@triton.jit
def _dq_tiles(dq, lo, hi, q, do, lse2, delta, K, V, b, hkv, k_start, sk_b, sk_h, sk_l, sk_d, sv_b, sv_h, sv_l, sv_d,
              b_drop, h_row, i, Lq_b, Lk_b, H, D, Dv, Bias, sb_b, sb_h, sb_i, sb_j, Slopes, ss_b, ss_h, qk_scale,
              win_left, win_right, seed, drop_threshold, drop_scale, BIAS_KIND: tl.constexpr, CAUSAL: tl.constexpr,
              WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, HAS_ALIBI: tl.constexpr, DROPOUT: tl.constexpr,
              IEEE_DOT: tl.constexpr, MASK_KEYS: tl.constexpr, VEC: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """dQ contributions of key tiles [lo, hi) to one query block (K, V by pointers: see
    attention_resources.BWD_16BIT on TMA here)."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        j = start_n + offs_n
        kt = tl.trans(_load_rows(K, b, hkv, k_start, start_n, Lk_b, sk_b, sk_h, sk_l, sk_d, D, BLOCK_N, BLOCK_D,
                                 False, VEC))
        vt = tl.trans(_load_rows(V, b, hkv, k_start, start_n, Lk_b, sv_b, sv_h, sv_l, sv_d, Dv, BLOCK_N, BLOCK_DV,
                                 False, VEC))
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
    Q, K, V, dOut, Lse, Delta,  # as in _attn_bwd_dkdv (Q and dOut by pointers here)
    dQ,  # (B, H, Lq, D) by strides (varlen: (total_q, H, D))
    Bias, Slopes, Seed, CuQ, CuK,
    sq_b, sq_h, sq_l, sq_d, sk_b, sk_h, sk_l, sk_d, sv_b, sv_h, sv_l, sv_d,
    sdo_b, sdo_h, sdo_l, sdo_d, sdq_b, sdq_h, sdq_l, sdq_d,
    sb_b, sb_h, sb_i, sb_j, ss_b, ss_h,
    B, H, G, Lq, Lk, D, Dv, total_q,
    sm_scale, qk_scale, win_left, win_right, drop_threshold, drop_scale,
    key_lq, key_lk,
    BIAS_KIND: tl.constexpr, CAUSAL: tl.constexpr, WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr,
    HAS_ALIBI: tl.constexpr, DROPOUT: tl.constexpr, VARLEN: tl.constexpr, IEEE_DOT: tl.constexpr, VEC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    num_m = tl.cdiv(Lq, BLOCK_M)
    bh = pid % (B * H)  # heads fastest: every head's heaviest (last, causal) row block launches first
    pid_m = pid // (B * H)
    b = bh // H
    h = bh % H
    if CAUSAL:
        pid_m = num_m - 1 - pid_m
    hkv = h // G
    q_start, Lq_b, k_start, Lk_b, seed, b_drop = _sequence(CuQ, CuK, Seed, b, Lq, Lk, DROPOUT, VARLEN)
    row_base = h * total_q + q_start if VARLEN else (b * H + h) * Lq
    m0 = (pid_m * BLOCK_M).to(tl.int32)
    i = m0 + tl.arange(0, BLOCK_M)
    h_row = (h + i * 0).to(tl.int64)
    q = _load_rows(Q, b, h, q_start, m0, Lq_b, sq_b, sq_h, sq_l, sq_d, D, BLOCK_M, BLOCK_D, False, VEC)
    do = _load_rows(dOut, b, h, q_start, m0, Lq_b, sdo_b, sdo_h, sdo_l, sdo_d, Dv, BLOCK_M, BLOCK_DV, False, VEC)
    lse2, delta = _load_lse2(Lse, Delta, row_base, i.to(tl.int64), Lq_b)
    i_hi = tl.minimum(m0 + BLOCK_M, Lq_b) - 1
    lo, hi = _key_range(m0, i_hi, Lk_b, win_left, win_right, CAUSAL, WINDOW_LEFT, WINDOW_RIGHT, BLOCK_N)
    full_lo, full_hi = _whole_key_range(lo, hi, m0, i_hi, Lk_b, win_left, win_right, CAUSAL, WINDOW_LEFT,
                                        WINDOW_RIGHT, BLOCK_N)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for part in tl.static_range(3):  # [lo, full_lo) and [full_hi, hi) masked, [full_lo, full_hi) whole
        first = lo if part == 0 else full_lo if part == 1 else full_hi
        last = full_lo if part == 0 else full_hi if part == 1 else hi
        dq = _dq_tiles(
            dq, first, last, q, do, lse2, delta, K, V, b, hkv, k_start, sk_b, sk_h, sk_l, sk_d, sv_b, sv_h, sv_l,
            sv_d, b_drop, h_row, i, Lq_b, Lk_b, H, D, Dv, Bias, sb_b, sb_h, sb_i, sb_j, Slopes, ss_b, ss_h, qk_scale,
            win_left, win_right, seed, drop_threshold, drop_scale, BIAS_KIND, CAUSAL, WINDOW_LEFT, WINDOW_RIGHT,
            HAS_ALIBI, DROPOUT, IEEE_DOT, part != 1, VEC, BLOCK_N, BLOCK_D, BLOCK_DV)
    _store_rows(dQ, b, h, q_start, m0, Lq_b, sdq_b, sdq_h, sdq_l, sdq_d, D, dq * sm_scale, BLOCK_M, BLOCK_D, VEC)


# --------------------------------------------------------------------------------------------
# configs and launcher
# --------------------------------------------------------------------------------------------


def _config(m, n, warps, stages, **extra):
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n, **extra}, num_warps=warps, num_stages=stages,
                         pre_hook=common.set_tma_blocks)


# every tile BWD_16BIT (attention_resources) keeps, then the ones the fp32 / D = 256 rule picks from;
# the last fits every dtype and head dim (the untuned fallback)
DKDV_TILES = [(64, 128, 8, 2, True), (64, 128, 8, 3, True), (64, 128, 8, 2, False), (32, 128, 8, 2, True),
              (32, 128, 8, 2, False), (64, 64, 4, 2, True), (64, 64, 4, 2, False), (32, 64, 4, 2, False),
              (32, 32, 4, 2, False), (16, 32, 4, 1, False), (32, 32, 8, 1, False), (16, 32, 8, 1, False)]
DQ_TILES = [(128, 64, 8, 2), (64, 64, 8, 2), (64, 64, 4, 2), (32, 64, 4, 2), (32, 32, 4, 2), (16, 32, 4, 1),
            (32, 32, 8, 1), (16, 32, 8, 1)]


def dkdv_configs():
    """dK/dV tiles: BLOCK_M query rows streamed per step against BLOCK_N resident keys, and whether
    dV and dK are accumulated in two passes (SPLIT_DKDV). prune_bwd keeps what fits."""
    if interpreted():
        return [_config(16, 16, 4, 1, SPLIT_DKDV=False)]
    return [_config(m, n, w, s, SPLIT_DKDV=split) for m, n, w, s, split in DKDV_TILES]


def dq_configs():
    """dQ tiles: BLOCK_M resident query rows against BLOCK_N keys streamed per step."""
    if interpreted():
        return [_config(16, 16, 4, 1)]
    return [_config(m, n, w, s) for m, n, w, s in DQ_TILES]


def prune_bwd(configs, named_args, **meta):
    """The backward family's rule (dK/dV and dQ): keep the tiles that fit this call's dtype, head
    dims, dropout and load path (see attention_resources.fits_bwd)."""
    q = named_args["Q"]
    q = getattr(q, "base", q)  # a TMA descriptor's tensor
    elt, smem = q.element_size(), _autotune.smem_limit(q.device)
    kernel = "dkdv" if "SPLIT_DKDV" in configs[0].kwargs else "dq"
    tma = kernel == "dkdv" and meta.get("USE_TMA", False)  # dQ reads by pointers
    kept = [c for c in configs if resources.fits_bwd(kernel, c, meta["BLOCK_D"], meta["BLOCK_DV"], elt,
                                                     meta["IEEE_DOT"], smem, meta["DROPOUT"], tma)]
    return kept or configs[-1:]


_KEY = ["key_lq", "key_lk", "BLOCK_D", "BLOCK_DV", "BIAS_KIND", "CAUSAL", "DROPOUT", "VARLEN", "USE_TMA"]


@functools.cache
def _tuned(name):
    """(kernel, fixed config or None) of "dkdv" or "dq": the autotuner, or the interpreter's one config."""
    kernel, configs = {"dkdv": (_attn_bwd_dkdv, dkdv_configs()), "dq": (_attn_bwd_dq, dq_configs())}[name]
    if len(configs) == 1:
        return kernel, configs[0]
    return _autotune.autotune(configs, _KEY, prune_bwd, _autotune.smallest)(kernel), None


def launch_backward(do, q, k, v, out, lse, dq, dk, dv, dbias, bias, slopes, causal, scale, window, dropout_p,
                    seed, drop_threshold, strides, B, H, G, Lq, Lk, total_q=0, cu_q=None, cu_k=None, head_chunks=1):
    """Launch delta, dK/dV, dQ (and dbias when ``dbias`` is given). ``strides`` maps each of
    q, k, v, do, out, dq, dk, dv to its (batch, head, token, dim) strides as the kernels read
    them; ``lse`` is (B, H, Lq) contiguous float32 (varlen: (H, total_q)). ``head_chunks`` (a
    divisor of G) splits each GQA group's query heads over that many dK/dV programs, whose float32
    partials are then summed in a fixed order (dk and dv contiguous; otherwise one chunk)."""
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
                                                       BLOCK_M=bm, BLOCK_DV=common.block_d(Dv))
    pointers = common.pointer_args(q, bias, slopes, seed, dropout_p)
    cu = (cu_q if varlen else q, cu_k if varlen else q)
    tail = (*common.bias_strides(bias), *common.slope_strides(slopes), B, H, G, Lq, Lk, D, Dv, total_q, float(scale),
            float(scale) * common.LOG2E, int(window[0]), int(window[1]),
            *common.dropout_args(dropout_p, drop_threshold))
    keys = (common.pow2(Lq), common.pow2(Lk))
    tma = common.use_tma(q.device, varlen, q, do)  # dK/dV's Q and dO
    meta = dict(common.flags(bias, causal, window, slopes, dropout_p), VARLEN=varlen, IEEE_DOT=common.ieee_dot(q),
                USE_TMA=tma, VEC=common.vector_width((q, k, v), strides.values()), BLOCK_D=common.block_d(D),
                BLOCK_DV=common.block_d(Dv))
    strided = (*strides["q"], *strides["k"], *strides["v"], *strides["do"])

    if not (dk.is_contiguous() and dv.is_contiguous()):
        head_chunks = 1
    dk_out, dv_out, chunk_strides = dk, dv, (0, 0)
    if head_chunks > 1:  # per-chunk float32 partials in dk's and dv's own (contiguous) layout
        dk_out = torch.empty(head_chunks, *dk.shape, dtype=torch.float32, device=dk.device)
        dv_out = torch.empty(head_chunks, *dv.shape, dtype=torch.float32, device=dv.device)
        chunk_strides = (dk.numel(), dv.numel())
    q_in, do_in = descriptors(tma, q, do)
    kernel, config = _tuned("dkdv")
    launches = [(kernel, lambda m: (triton.cdiv(Lk, m["BLOCK_N"]) * head_chunks * B * (H // G),),
                 (q_in, k, v, do_in, lse, delta, dk_out, dv_out, *pointers, *cu, *strided, *strides["dk"],
                  *strides["dv"], *chunk_strides, *tail, head_chunks, *keys), with_config(meta, config))]
    kernel, config = _tuned("dq")
    dq_meta = {name: value for name, value in meta.items() if name != "USE_TMA"}
    launches.append((kernel, lambda m: (triton.cdiv(Lq, m["BLOCK_M"]) * B * H,),
                     (q, k, v, do, lse, delta, dq, *pointers, *cu, *strided, *strides["dq"], *tail, *keys),
                     with_config(dq_meta, config)))
    run(launches)
    if head_chunks > 1:
        sum_partials(dk_out.view(head_chunks, -1), dk.view(-1))
        sum_partials(dv_out.view(head_chunks, -1), dv.view(-1))
    if dbias is not None:
        launch_dbias(do, q, k, v, lse, delta, dbias, bias, slopes, scale, window, dropout_p, pointers, strides,
                     meta, B, H, G, Lq, Lk, drop_threshold)

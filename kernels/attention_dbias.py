"""Gradient of a float attention bias in its own (broadcast) shape, for the backward of
attention_backward.py: dbias = dS summed over every (b, h, i, j) a bias element was added to.

One program per (BLOCK_M, BLOCK_N) tile of the bias's own shape (Bb, Hb, Lqb, Lkb), looping over
the batch, head, row and column blocks the bias broadcasts over; P and dS are recomputed from the
saved lse as in the dK/dV and dQ kernels. Deterministic: each element has one owner, no atomics.
"""

import triton
import triton.language as tl
from fusedformer.kernels.attention_common import (
    LOG2E,
    _dot,
    _dropout_keep,
    _load_lse2,
    _load_seed,
    _probs_tile,
    bias_strides,
    block_d,
    dropout_args,
    interpreted,
    slope_strides,
)


@triton.jit
def _attn_bwd_dbias(
    Q, K, V, dOut, Lse, Delta,  # dense only; as in _attn_bwd_dkdv
    dBias,  # (Bb, Hb, Lqb, Lkb) contiguous, each dim 1 or the full size
    Bias, Slopes, Seed,  # see _tile_scores, _load_seed
    sq_b, sq_h, sq_l, sq_d, sk_b, sk_h, sk_l, sk_d, sv_b, sv_h, sv_l, sv_d,
    sdo_b, sdo_h, sdo_l, sdo_d,
    sb_b, sb_h, sb_i, sb_j, ss_b, ss_h,
    B, H, G, Lq, Lk, D, Dv, Bb, Hb, Lqb, Lkb,  # bias shape (Bb, Hb, Lqb, Lkb)
    n_b, n_h, n_m, n_n,  # how many batches, heads, row and column blocks each bias tile sums over
    qk_scale, win_left, win_right, drop_threshold, drop_scale,
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
    seed = 0
    if DROPOUT:
        seed = _load_seed(Seed, 0, False)
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
                        keep = _dropout_keep(seed, b, h_row, i, (tile_n + jn) * BLOCK_N, H, Lq, Lk, drop_threshold,
                                             BLOCK_N)
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


def launch_dbias(do, q, k, v, lse, delta, dbias, bias, slopes, scale, window, dropout_p, pointers, strides, meta,
                 B, H, G, Lq, Lk, drop_threshold):
    """Fill ``dbias`` (contiguous, the bias's shape). ``pointers`` are the (Bias, Slopes, Seed)
    kernel arguments and ``meta`` the flags of the dK/dV and dQ launches."""
    Bb, Hb, Lqb, Lkb = dbias.shape
    D, Dv = q.shape[-1], v.shape[-1]
    bm, bn = (16, 16) if interpreted() else (64, 64)
    nw = 4 if interpreted() or max(D, Dv) <= 64 else 8
    grid = (triton.cdiv(Lqb, bm) * triton.cdiv(Lkb, bn) * Bb * Hb,)
    loops = (B if Bb == 1 else 1, H if Hb == 1 else 1, triton.cdiv(Lq, bm) if Lqb == 1 else 1,
             triton.cdiv(Lk, bn) if Lkb == 1 else 1)
    flags = {name: meta[name] for name in ("BIAS_KIND", "CAUSAL", "WINDOW_LEFT", "WINDOW_RIGHT", "HAS_ALIBI",
                                           "DROPOUT", "IEEE_DOT")}
    _attn_bwd_dbias[grid](q, k, v, do, lse, delta, dbias, *pointers, *strides["q"], *strides["k"], *strides["v"],
                          *strides["do"], *bias_strides(bias), *slope_strides(slopes), B, H, G, Lq, Lk, D, Dv,
                          Bb, Hb, Lqb, Lkb, *loops, float(scale) * LOG2E, int(window[0]), int(window[1]),
                          *dropout_args(dropout_p, drop_threshold), **flags, ROW_BCAST=Lqb == 1, COL_BCAST=Lkb == 1,
                          BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d(D), BLOCK_DV=block_d(Dv), num_warps=nw)

"""Flash attention forward: out = dropout(softmax(scale * q k^T + bias)) v, never storing Lq x Lk.

Legend in attention_common.py; S key splits. One program owns BLOCK_M query rows and streams the
keys in BLOCK_N blocks with the online softmax (Dao et al.), in the log2 domain. Memory traffic:
reads Lq*D + ceil(Lq/BLOCK_M)*Lk*(D+Dv) per head, writes Lq*Dv + Lq (lse). Masks (causal,
window, bool mask, float bias, ALiBi) are applied per tile from indices and strides, so a bias
broadcast over batch/heads/rows costs stride 0 and no copy; tiles that causal/window masking
empties entirely are never visited.

Rows are either plain (program = (row block, b, h)) or GQA-packed (program = (row block, b, kv
head), row r = g * Lq + i for query head kv*G + g): the decode path packs the G heads that read
one kv head, so a single query token still fills a BLOCK_M tile, and splits the keys in S
chunks whose partial results a combine kernel merges by their log-sum-exp (split-K). S is a
run-time argument and the partials are laid out split-major, so a growing KV cache never
recompiles the kernel; its autotune key buckets the keys per split (see decode_key_lk).
"""

import functools

import triton
import triton.language as tl
from fusedformer.kernels import _autotune, _device
from fusedformer.kernels import attention_common as common
from fusedformer.kernels import attention_resources as resources
from fusedformer.kernels.attention_common import (
    _dot,
    _dropout_keep,
    _key_range,
    _load_rows,
    _row_offsets,
    _sequence,
    _tile_scores,
    _whole_key_range,
    descriptors,
    interpreted,
)


@triton.jit
def _fwd_tiles(acc, l_i, m_i, q, K, V, b, hkv, k_start, sk_b, sk_h, sk_l, sk_d, sv_b, sv_h, sv_l, sv_d, lo, hi, b_drop,
               h_row, i_row, row_ok, Lq_b, Lk_b, H, D, Dv, Bias, sb_b, sb_h, sb_i, sb_j, Slopes, ss_b, ss_h, qk_scale,
               win_left, win_right, seed, drop_threshold, drop_scale, BIAS_KIND: tl.constexpr, CAUSAL: tl.constexpr,
               WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, HAS_ALIBI: tl.constexpr, DROPOUT: tl.constexpr,
               IEEE_DOT: tl.constexpr, MASK_KEYS: tl.constexpr, USE_TMA: tl.constexpr, VEC: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """The online softmax over key tiles [lo, hi): returns the updated (acc, l_i, m_i)."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        j = start_n + offs_n
        k = _load_rows(K, b, hkv, k_start, start_n, Lk_b, sk_b, sk_h, sk_l, sk_d, D, BLOCK_N, BLOCK_D, USE_TMA, VEC)
        qk = _dot(q, tl.trans(k), IEEE_DOT)
        s = _tile_scores(qk, b, h_row, i_row, row_ok, j, Lk_b, Bias, sb_b, sb_h, sb_i, sb_j, Slopes, ss_b, ss_h,
                         qk_scale, win_left, win_right, BIAS_KIND, CAUSAL, WINDOW_LEFT, WINDOW_RIGHT, HAS_ALIBI,
                         MASK_KEYS)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # an all-masked row so far: keep p = 0
        alpha = tl.math.exp2(m_i - m_safe)
        p = tl.math.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if DROPOUT:
            keep = _dropout_keep(seed, b_drop, h_row, i_row, start_n, H, Lq_b, Lk_b, drop_threshold, BLOCK_N)
            p = tl.where(keep, p * drop_scale, 0.0)
        v = _load_rows(V, b, hkv, k_start, start_n, Lk_b, sv_b, sv_h, sv_l, sv_d, Dv, BLOCK_N, BLOCK_DV, USE_TMA, VEC)
        acc += _dot(p.to(v.dtype), v, IEEE_DOT)
        m_i = m_new
    return acc, l_i, m_i


# Lk and the split count change as a KV cache grows: no value specialisation on them (nor on the
# autotune-only bucket arguments), so decoding compiles one kernel, not one per length class
@triton.jit(do_not_specialize=["Lk", "num_splits", "section", "key_lq", "key_lk"])
def _attn_fwd_kernel(
    Q, K, V,  # q (B, H, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv); varlen: (total, H, D) with batch stride 0;
              # USE_TMA: K and V are tensor descriptors of block (1, 1, BLOCK_N, BLOCK_D|BLOCK_DV)
    Out,  # (B, H, Lq, Dv) in q's dtype, or with num_splits > 1 the float32 partials (S, B, H, Lq, Dv)
    Lse,  # (B, H, Lq) float32 natural-log lse, or the partials' (S, B, H, Lq)
    Bias, Slopes, Seed,  # see _tile_scores; Seed: the dropout seed, (1,) int64
    CuQ, CuK,  # varlen: cumulative sequence lengths (B + 1,) int32
    sq_b, sq_h, sq_l, sq_d,  # q strides
    sk_b, sk_h, sk_l, sk_d,  # k strides
    sv_b, sv_h, sv_l, sv_d,  # v strides
    so_b, so_h, so_l, so_s, so_d,  # out strides (so_s: split stride)
    sl_b, sl_h, sl_l, sl_s,  # lse strides
    sb_b, sb_h, sb_i, sb_j, ss_b, ss_h,  # bias, slopes strides
    B, H, G, Lq, Lk, D, Dv,  # G = H // Hkv; Lq/Lk: dense lengths (varlen: from CuQ/CuK)
    qk_scale, win_left, win_right,  # qk_scale = scale * log2(e)
    drop_threshold, drop_scale,  # dropout: keep iff philox >= drop_threshold, scale 1/(1-p)
    num_splits,  # S key splits (1: out/lse written directly)
    section,  # (b, head) pairs per launch section (see l2_section)
    key_lq, key_lk,  # autotune buckets (see forward_key)
    BIAS_KIND: tl.constexpr, CAUSAL: tl.constexpr, WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr,
    HAS_ALIBI: tl.constexpr, DROPOUT: tl.constexpr, VARLEN: tl.constexpr, PACK_GQA: tl.constexpr,
    IEEE_DOT: tl.constexpr, USE_TMA: tl.constexpr, VEC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    n_heads = H // G if PACK_GQA else H
    rows_max = G * Lq if PACK_GQA else Lq  # varlen: Lq is max_seqlen_q
    num_m = tl.cdiv(rows_max, BLOCK_M)
    # programs walk sections of `section` (b, head) pairs whose K/V fit in L2 together; inside a
    # section heads (and splits) vary fastest and row blocks slowest, so with causal masking the
    # longest rows (the last row blocks) of each head launch first and short ones fill the tail
    per_section = section * num_splits * num_m
    first = pid // per_section * section
    width = tl.minimum(section, B * n_heads - first)  # the last section may be narrower
    within = pid % per_section
    bh = first + within % width
    rest = within // width
    split = rest % num_splits  # int64, for the partials' offsets
    pid_m = rest // num_splits
    b = bh // n_heads
    head = bh % n_heads
    if CAUSAL:
        pid_m = num_m - 1 - pid_m
    q_start, Lq_b, k_start, Lk_b, seed, b_drop = _sequence(CuQ, CuK, Seed, b, Lq, Lk, DROPOUT, VARLEN)

    r = (pid_m * BLOCK_M).to(tl.int32) + tl.arange(0, BLOCK_M)  # row indices stay int32: cheaper masks
    if PACK_GQA:
        rows_b = G * Lq_b
        h_row = (head * G + r // Lq_b).to(tl.int64)  # dense only: Lq_b = Lq >= 1; past H on padding rows
        i_row = r % Lq_b
        hkv = head
    else:
        rows_b = Lq_b
        h_row = (head + r * 0).to(tl.int64)
        i_row = r
        hkv = head // G
    row_ok = r < rows_b
    i_lo = tl.min(tl.where(row_ok, i_row, Lq_b), 0)  # no valid row: i_lo = Lq_b > i_hi = -1, nothing to do
    i_hi = tl.max(tl.where(row_ok, i_row, -1), 0)

    q_rows, d_ok = _row_offsets(q_start, i_row, sq_l, D, BLOCK_D, VEC)
    q_ptrs = (Q + b * sq_b + (q_rows + tl.multiple_of(h_row * sq_h, VEC))[:, None]
              + tl.arange(0, BLOCK_D)[None, :] * sq_d)
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    lo, hi = _key_range(i_lo, i_hi, Lk_b, win_left, win_right, CAUSAL, WINDOW_LEFT, WINDOW_RIGHT, BLOCK_N)
    if num_splits > 1:
        per_split = tl.cdiv(tl.cdiv(hi - lo, BLOCK_N), num_splits)
        new_lo = lo + split.to(tl.int32) * per_split * BLOCK_N
        hi = tl.minimum(hi, new_lo + per_split * BLOCK_N)
        lo = new_lo
    full_lo, full_hi = _whole_key_range(lo, hi, i_lo, i_hi, Lk_b, win_left, win_right, CAUSAL, WINDOW_LEFT,
                                        WINDOW_RIGHT, BLOCK_N)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    for part in tl.static_range(3):  # [lo, full_lo) and [full_hi, hi) masked, [full_lo, full_hi) whole
        first = lo if part == 0 else full_lo if part == 1 else full_hi
        last = full_lo if part == 0 else full_hi if part == 1 else hi
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, K, V, b, hkv, k_start, sk_b, sk_h, sk_l, sk_d, sv_b, sv_h, sv_l,
                                   sv_d, first, last, b_drop, h_row, i_row, row_ok, Lq_b, Lk_b, H, D, Dv, Bias, sb_b,
                                   sb_h, sb_i, sb_j, Slopes, ss_b, ss_h, qk_scale, win_left, win_right, seed,
                                   drop_threshold, drop_scale, BIAS_KIND, CAUSAL, WINDOW_LEFT, WINDOW_RIGHT, HAS_ALIBI,
                                   DROPOUT, IEEE_DOT, part != 1, USE_TMA, VEC, BLOCK_N, BLOCK_D, BLOCK_DV)

    dead = l_i == 0.0
    l_safe = tl.where(dead, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(dead, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    o_rows, dv_ok = _row_offsets(q_start, i_row, so_l, Dv, BLOCK_DV, VEC)
    o_ptrs = (Out + b * so_b + split * so_s + (o_rows + tl.multiple_of(h_row * so_h, VEC))[:, None]
              + tl.arange(0, BLOCK_DV)[None, :] * so_d)
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & dv_ok[None, :])
    tl.store(Lse + b * sl_b + (q_start + i_row.to(tl.int64)) * sl_l + h_row * sl_h + split * sl_s, lse, mask=row_ok)


# the splits the combine kernel reads at a time: one compiled kernel for every split count
COMBINE_BLOCK_S = 16


@triton.jit(do_not_specialize=["num_splits"])
def _attn_combine_kernel(
    OutPart,  # (S, R, Dv) float32 partial outputs, each normalised within its split
    LsePart,  # (S, R) float32 partial lse
    Out,  # (R, Dv) in q's dtype, R = B*H*Lq rows (contiguous)
    Lse,  # (R,) float32
    R, Dv, num_splits,
    BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """out = sum_s exp(lse_s - lse) * out_s with lse = logsumexp_s(lse_s); all -inf: out 0, lse -inf.
    Splits are read BLOCK_S at a time, so one compiled kernel serves every split count."""
    row = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    m = tl.max(tl.full([BLOCK_S], float("-inf"), dtype=tl.float32), 0)
    for s0 in range(0, num_splits, BLOCK_S):
        s = (s0 + offs_s).to(tl.int64)
        m = tl.maximum(m, tl.max(tl.load(LsePart + s * R + row, mask=s < num_splits, other=float("-inf")), 0))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    total = tl.sum(tl.zeros([BLOCK_S], dtype=tl.float32), 0)
    acc = tl.zeros([BLOCK_DV], dtype=tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        s = (s0 + offs_s).to(tl.int64)
        w = tl.exp(tl.load(LsePart + s * R + row, mask=s < num_splits, other=float("-inf")) - m_safe)
        o_s = tl.load(OutPart + (s[:, None] * R + row) * Dv + offs_dv[None, :],
                      mask=(s[:, None] < num_splits) & (offs_dv[None, :] < Dv), other=0.0)
        total += tl.sum(w, 0)
        acc += tl.sum(o_s * w[:, None], 0)
    dead = total == 0.0
    total_safe = tl.where(dead, 1.0, total)
    tl.store(Out + row * Dv + offs_dv, (acc / total_safe).to(Out.dtype.element_ty), mask=offs_dv < Dv)
    tl.store(Lse + row, tl.where(dead, float("-inf"), m_safe + tl.log(total_safe)))


# --------------------------------------------------------------------------------------------
# configs: one small config under the interpreter; sm_90-sized ones, autotuned per shape bucket
# --------------------------------------------------------------------------------------------


def fwd_configs():
    if interpreted():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1,
                              pre_hook=common.set_tma_blocks)]
    # sized for H100 (sm_90); prune_fwd keeps those that fit the call's dtype, head dims and load
    # path. 128x128 with 8 warps is the D = 128 16-bit tile (each Q row block reused over twice the
    # keys of 128x64): 3 stages with K/V through TMA (the scores stay out of shared memory), 2 with
    # pointers. Smaller tiles win for short or decode-like shapes; 8-warp 32x32 and 16x32 are
    # for fp32 "ieee" dots, and the last fits every dtype at D = 256 (the untuned fallback of prune_fwd).
    shapes = [(128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 3), (128, 64, 4, 4), (128, 32, 4, 3), (64, 64, 4, 3),
              (32, 64, 4, 3), (16, 64, 4, 3), (16, 128, 4, 2), (32, 32, 4, 1), (32, 32, 8, 1), (16, 32, 8, 1)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s, pre_hook=common.set_tma_blocks)
            for m, n, w, s in shapes]


def prune_fwd(configs, named_args, **meta):
    """The forward family's rule: keep the tiles that fit this call's dtype and head dims (see
    attention_resources.fits_fwd), and no row tile larger than the rows (key_lq) beyond 16."""
    rows = named_args.get("key_lq", 1 << 30)
    q = named_args["Q"]
    elt, smem = q.element_size(), _autotune.smem_limit(q.device)
    kept = [c for c in configs if resources.fits_fwd(c, meta["BLOCK_D"], meta["BLOCK_DV"], elt, meta["IEEE_DOT"], smem,
                                                     meta.get("DROPOUT", False), meta.get("USE_TMA", False))]
    return [c for c in kept if c.kwargs["BLOCK_M"] <= max(16, rows)] or kept or configs[-1:]


_AUTOTUNE_KEY = ["key_lq", "key_lk", "BLOCK_D", "BLOCK_DV", "BIAS_KIND", "CAUSAL", "DROPOUT", "VARLEN", "PACK_GQA",
                 "USE_TMA"]


@functools.cache
def _tuned_fwd():
    """(kernel, fixed config or None): the autotuner, or the interpreter's one config."""
    configs = fwd_configs()
    if len(configs) == 1:
        return _attn_fwd_kernel, configs[0]
    return _autotune.autotune(configs, _AUTOTUNE_KEY, prune_fwd, _autotune.smallest)(_attn_fwd_kernel), None


def with_config(meta, config):
    """Launch options: ``meta`` plus a fixed config's block sizes, warps and stages."""
    if config is not None:
        meta = dict(meta, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
    return meta


DECODE_KEY_LK = (64, 1024)  # decode's keys-per-split bucket: powers of two clamped to this range


def forward_key(rows, Lk, num_splits, pack_gqa):
    """(key_lq, key_lk) autotune buckets. The row-block path: powers of two of the rows and keys.
    Decode (GQA-packed): the keys each split reads, as a power of two clamped to DECODE_KEY_LK,
    so a KV cache growing to 32k keys meets a handful of keys, not one per power of two."""
    if not pack_gqa:
        return common.pow2(rows), common.pow2(Lk)
    lo, hi = DECODE_KEY_LK
    return common.pow2(rows), min(max(common.pow2(triton.cdiv(Lk, num_splits)), lo), hi)


L2_BYTES = 50 * 1024 * 1024  # an H100's L2 (H200: the same); the CPU stand-in of l2_section


def l2_section(device, Lk, D, Dv, elt):
    """(b, head) pairs per forward launch section: as many as keep their K and V in half of L2,
    so the row blocks of a section reread them from L2 however they are ordered."""
    l2 = _device.properties(device).L2_cache_size if device.type == "cuda" else L2_BYTES
    return max(1, l2 // 2 // max(1, Lk * (D + Dv) * elt))


def forward_launches(q, k, v, out, lse, bias, slopes, causal, scale, window, dropout_p, seed, drop_threshold,
                     q_strides, k_strides, v_strides, o_strides, l_strides, B, H, G, Lq, Lk,
                     cu_q=None, cu_k=None, pack_gqa=False, num_splits=1, out_part=None, lse_part=None, section=None):
    """The forward's launches as (kernel, grid, args, meta), in order, without launching. Strides
    are (batch, head, token, dim) of each tensor as the kernel reads them (varlen: batch stride 0).
    With num_splits > 1 the kernel writes the float32 partials ``out_part`` (S, B*H*Lq, Dv) /
    ``lse_part`` (S, B*H*Lq), contiguous, and a combine kernel merges them into out / lse, which
    must then be contiguous. ``section``: (b, head) pairs per launch section, None for l2_section's."""
    D, Dv = q.shape[-1], v.shape[-1]
    kernel, config = _tuned_fwd()
    R = B * H * Lq
    if num_splits > 1:
        o_tensor, l_tensor = out_part, lse_part
        so = (H * Lq * Dv, Lq * Dv, Dv, R * Dv, 1)
        sl = (H * Lq, Lq, 1, R)
    else:
        o_tensor, l_tensor = out, lse
        so = (o_strides[0], o_strides[1], o_strides[2], 0, o_strides[3])
        sl = (*l_strides[:3], 0)
    rows = G * Lq if pack_gqa else Lq
    heads = H // G if pack_gqa else H
    if section is None:
        section = l2_section(q.device, Lk, D, Dv, k.element_size())
    # with dropout K/V keep pointer loads: triton 3.6's ptxas crashed on the TMA build (128x64 / 8 warps)
    tma = common.use_tma(q.device, cu_q is not None, k, v) and dropout_p == 0
    meta = dict(common.flags(bias, causal, window, slopes, dropout_p), VARLEN=cu_q is not None, PACK_GQA=bool(pack_gqa),
                IEEE_DOT=common.ieee_dot(q), USE_TMA=tma,
                VEC=common.vector_width((q, k, v), (q_strides, k_strides, v_strides, so)),
                BLOCK_D=common.block_d(D), BLOCK_DV=common.block_d(Dv))
    grid = lambda m: (triton.cdiv(rows, m["BLOCK_M"]) * num_splits * B * heads,)  # noqa: E731
    args = (q, *descriptors(tma, k, v), o_tensor, l_tensor, *common.pointer_args(q, bias, slopes, seed, dropout_p),
            cu_q if cu_q is not None else q, cu_k if cu_k is not None else q,
            *q_strides, *k_strides, *v_strides, *so, *sl, *common.bias_strides(bias), *common.slope_strides(slopes),
            B, H, G, Lq, Lk, D, Dv, float(scale) * common.LOG2E, int(window[0]), int(window[1]),
            *common.dropout_args(dropout_p, drop_threshold), int(num_splits), int(section),
            *forward_key(rows, Lk, num_splits, pack_gqa))
    launches = [(kernel, grid, args, with_config(meta, config))]
    if num_splits > 1:
        launches.append((_attn_combine_kernel, (R,), (out_part, lse_part, out, lse, R, Dv, int(num_splits)),
                         dict(BLOCK_S=COMBINE_BLOCK_S, BLOCK_DV=common.block_d(Dv))))
    return launches


def run(launches):
    """Launch each (kernel, grid, args, meta) in order; a fixed config (the interpreter's) gets the
    TMA block shapes its pre_hook would set under the autotuner."""
    for kernel, grid, args, meta in launches:
        if "BLOCK_N" in meta and "BLOCK_M" in meta:
            common.set_tma_blocks({**dict(zip(kernel.arg_names, args)), **meta})
        kernel[grid](*args, **meta)


def launch_forward(*args, **kwargs):
    """Run forward_launches(*args, **kwargs)."""
    run(forward_launches(*args, **kwargs))

"""Flash attention forward: out = dropout(softmax(scale * q k^T + bias)) v, never storing Lq x Lk.

Legend: B batch (or sequences, varlen), H query heads, Hkv kv heads, G = H // Hkv, Lq/Lk
lengths, D/Dv head dims, S key splits. One program owns BLOCK_M query rows and streams the keys
in BLOCK_N blocks with the online softmax (Dao et al.), in the log2 domain. Memory traffic:
reads Lq*D + ceil(Lq/BLOCK_M)*Lk*(D+Dv) per head, writes Lq*Dv + Lq (lse). Masks (causal,
window, bool mask, float bias, ALiBi) are applied per tile from indices and strides, so a bias
broadcast over batch/heads/rows costs stride 0 and no copy; tiles that causal/window masking
empties entirely are never visited.

Rows are either plain (program = (row block, b, h)) or GQA-packed (program = (row block, b, kv
head), row r = g * Lq + i for query head kv*G + g): the decode path packs the G heads that read
one kv head, so a single query token still fills a BLOCK_M tile, and splits the keys in S
chunks whose partial results a combine kernel merges by their log-sum-exp (split-K).

Dropout keeps (b, h, i, j) iff philox(seed, ((b*H + h)*Lq + i)*Lk + j) >= threshold, the exact
stream of ``fusedformer.vocabulary.attention_dropout_keep`` (varlen: sequence b draws with seed
+ b and b = 0, as the per-sequence reference does).
"""

import functools
import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

# bias kinds
BIAS_NONE, BIAS_BOOL, BIAS_FLOAT = 0, 1, 2


def interpreted():
    return os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _dot(a, b, IEEE_DOT: tl.constexpr):
    """a @ b: full fp32 precision ("ieee") when IEEE_DOT (see ieee_dot), else tl.dot's default."""
    if IEEE_DOT:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _tile_scores(qk, b, h_row, i_row, j_col, Lq, Lk,
                 Bias,  # bias/mask (B|1, H|1, Lq|1, Lk|1); bool masks viewed as uint8
                 sb_b, sb_h, sb_i, sb_j,  # bias strides, 0 on broadcast dims
                 Slopes, ss_b, ss_h,  # ALiBi slopes (B|1, H) float32, batch stride 0 for (H,)
                 qk_scale, win_left, win_right,
                 BIAS_KIND: tl.constexpr, CAUSAL: tl.constexpr, WINDOW_LEFT: tl.constexpr,
                 WINDOW_RIGHT: tl.constexpr, HAS_ALIBI: tl.constexpr, MASK_KEYS: tl.constexpr = True):
    """Scores of a (BLOCK_M, BLOCK_N) tile in the log2 domain, -inf where masked. MASK_KEYS=False
    is for tiles that the bounds, causal and window rules leave whole (the mask and bias still apply)."""
    s = qk * qk_scale
    i2 = i_row[:, None]
    j2 = j_col[None, :]
    valid = (i2 < Lq) & (j2 < Lk)
    if MASK_KEYS:
        if CAUSAL:
            valid = valid & (j2 <= i2)
        if WINDOW_LEFT:
            valid = valid & (j2 >= i2 - win_left)
        if WINDOW_RIGHT:
            valid = valid & (j2 <= i2 + win_right)
    if BIAS_KIND != 0:
        ptrs = Bias + b * sb_b + h_row[:, None] * sb_h + i2.to(tl.int64) * sb_i + j2.to(tl.int64) * sb_j
        if BIAS_KIND == 1:
            valid = valid & (tl.load(ptrs, mask=(i2 < Lq) & (j2 < Lk), other=0) != 0)
        else:
            s += tl.load(ptrs, mask=(i2 < Lq) & (j2 < Lk), other=0.0).to(tl.float32) * 1.4426950408889634
    if HAS_ALIBI:
        slope = tl.load(Slopes + b * ss_b + h_row * ss_h).to(tl.float32)
        dist = tl.abs(i2 - j2).to(tl.float32)
        s -= slope[:, None] * 1.4426950408889634 * dist
    if MASK_KEYS or BIAS_KIND == 1:
        s = tl.where(valid, s, float("-inf"))
    return s


@triton.jit
def _dropout_keep(seed, b, h_row, i_row, j_col, H, Lq, Lk, drop_threshold):
    """Keep-mask of a tile: philox(seed, ((b*H + h)*Lq + i)*Lk + j)[0] >= threshold (unsigned)."""
    off = ((b * H + h_row[:, None]) * Lq + i_row[:, None]) * Lk + j_col[None, :].to(tl.int64)
    r = tl.randint(seed, off)
    return r.to(tl.int64) >= drop_threshold


@triton.jit
def _seq_bounds(CuQ, CuK, b, Lq, Lk, VARLEN: tl.constexpr):
    """(q_start, Lq_b, k_start, Lk_b): a sequence's token offset and lengths (dense: 0, Lq, 0, Lk)."""
    if VARLEN:
        q_start = tl.load(CuQ + b).to(tl.int64)
        Lq_b = (tl.load(CuQ + b + 1) - tl.load(CuQ + b)).to(tl.int32)
        k_start = tl.load(CuK + b).to(tl.int64)
        Lk_b = (tl.load(CuK + b + 1) - tl.load(CuK + b)).to(tl.int32)
    else:
        q_start = b * 0
        Lq_b = Lq
        k_start = b * 0
        Lk_b = Lk
    return q_start, Lq_b, k_start, Lk_b


@triton.jit
def _key_range(i_lo, i_hi, Lk_b, win_left, win_right, CAUSAL: tl.constexpr, WINDOW_LEFT: tl.constexpr,
               WINDOW_RIGHT: tl.constexpr, BLOCK_N: tl.constexpr):
    """[lo, hi) of the keys rows i_lo..i_hi may see, lo aligned to BLOCK_N; empty if i_hi < i_lo."""
    lo = i_lo * 0
    hi = lo + Lk_b
    if CAUSAL:
        hi = tl.minimum(hi, i_hi + 1)
    if WINDOW_RIGHT:
        hi = tl.minimum(hi, i_hi + win_right + 1)
    if WINDOW_LEFT:
        lo = tl.maximum(lo, i_lo - win_left)
    lo = (lo // BLOCK_N) * BLOCK_N
    hi = tl.where(i_hi < i_lo, lo, hi)
    return lo, tl.maximum(hi, lo)


@triton.jit
def _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, sk_l, sk_d, sv_l, sv_d, lo, hi, b, b_drop, h_row, i_row, Lq_b, Lk_b,
               H, D, Dv, Bias, sb_b, sb_h, sb_i, sb_j, Slopes, ss_b, ss_h, qk_scale, win_left, win_right, seed,
               drop_threshold, drop_scale, BIAS_KIND: tl.constexpr, CAUSAL: tl.constexpr, WINDOW_LEFT: tl.constexpr,
               WINDOW_RIGHT: tl.constexpr, HAS_ALIBI: tl.constexpr, DROPOUT: tl.constexpr, IEEE_DOT: tl.constexpr,
               MASK_KEYS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """The online softmax over key tiles [lo, hi): returns the updated (acc, l_i, m_i)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for start_n in range(lo, hi, BLOCK_N):
        j = start_n + offs_n
        j64 = j.to(tl.int64)
        kt = tl.load(k_base + j64[None, :] * sk_l + offs_d[:, None] * sk_d,
                     mask=(j[None, :] < Lk_b) & (offs_d[:, None] < D), other=0.0)
        qk = _dot(q, kt, IEEE_DOT)
        s = _tile_scores(qk, b, h_row, i_row, j, Lq_b, Lk_b, Bias, sb_b, sb_h, sb_i, sb_j, Slopes, ss_b, ss_h,
                         qk_scale, win_left, win_right, BIAS_KIND, CAUSAL, WINDOW_LEFT, WINDOW_RIGHT, HAS_ALIBI,
                         MASK_KEYS)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # an all-masked row so far: keep p = 0
        alpha = tl.math.exp2(m_i - m_safe)
        p = tl.math.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if DROPOUT:
            keep = _dropout_keep(seed, b_drop, h_row, i_row, j, H, Lq_b, Lk_b, drop_threshold)
            p = tl.where(keep, p * drop_scale, 0.0)
        v = tl.load(v_base + j64[:, None] * sv_l + offs_dv[None, :] * sv_d,
                    mask=(j[:, None] < Lk_b) & (offs_dv[None, :] < Dv), other=0.0)
        acc += _dot(p.to(v.dtype), v, IEEE_DOT)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    Q, K, V,  # q (B, H, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv); varlen: (total, H, D) with batch stride 0
    Out,  # (B, H, Lq, Dv) in q's dtype, or with NUM_SPLITS > 1 the float32 partials (B, H, Lq, S, Dv)
    Lse,  # (B, H, Lq) float32 natural-log lse, or the partials' (B, H, Lq, S)
    Bias, Slopes,  # see _tile_scores
    CuQ, CuK,  # varlen: cumulative sequence lengths (B + 1,) int32
    sq_b, sq_h, sq_l, sq_d,  # q strides
    sk_b, sk_h, sk_l, sk_d,  # k strides
    sv_b, sv_h, sv_l, sv_d,  # v strides
    so_b, so_h, so_l, so_s, so_d,  # out strides (so_s: split stride)
    sl_b, sl_h, sl_l, sl_s,  # lse strides
    sb_b, sb_h, sb_i, sb_j, ss_b, ss_h,  # bias, slopes strides
    B, H, G, Lq, Lk, D, Dv,  # G = H // Hkv; Lq/Lk: dense lengths (varlen: from CuQ/CuK)
    qk_scale, win_left, win_right,  # qk_scale = scale * log2(e)
    seed, drop_threshold, drop_scale,  # dropout: keep iff philox >= drop_threshold, scale 1/(1-p)
    key_lq, key_lk,  # autotune buckets (powers of two of the lengths)
    BIAS_KIND: tl.constexpr, CAUSAL: tl.constexpr, WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr,
    HAS_ALIBI: tl.constexpr, DROPOUT: tl.constexpr, VARLEN: tl.constexpr, PACK_GQA: tl.constexpr,
    NUM_SPLITS: tl.constexpr, IEEE_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    n_heads = H // G if PACK_GQA else H
    rows_max = G * Lq if PACK_GQA else Lq  # varlen: Lq is max_seqlen_q
    num_m = tl.cdiv(rows_max, BLOCK_M)
    pid_m = pid % num_m
    rest = pid // num_m
    split = rest % NUM_SPLITS
    bh = rest // NUM_SPLITS
    b = bh // n_heads
    head = bh % n_heads
    if CAUSAL:
        pid_m = num_m - 1 - pid_m  # longest rows first: better tail balance
    q_start, Lq_b, k_start, Lk_b = _seq_bounds(CuQ, CuK, b, Lq, Lk, VARLEN)
    if VARLEN:
        seed = seed + b
        b_drop = b * 0
    else:
        b_drop = b

    r = (pid_m * BLOCK_M).to(tl.int32) + tl.arange(0, BLOCK_M)  # row indices stay int32: cheaper masks
    if PACK_GQA:
        rows_b = G * Lq_b
        # dense only: Lq_b = Lq >= 1. Padding rows (r >= rows_b) repeat the group's last head, so
        # their bias and ALiBi slope reads stay inside the tensors; they are never stored.
        h_row = (head * G + tl.minimum(r // Lq_b, G - 1)).to(tl.int64)
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

    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    i64 = i_row.to(tl.int64)
    q_ptrs = Q + b * sq_b + (q_start + i64[:, None]) * sq_l + h_row[:, None] * sq_h + offs_d[None, :] * sq_d
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    k_base = K + b * sk_b + hkv * sk_h + k_start * sk_l
    v_base = V + b * sv_b + hkv * sv_h + k_start * sv_l

    lo, hi = _key_range(i_lo, i_hi, Lk_b, win_left, win_right, CAUSAL, WINDOW_LEFT, WINDOW_RIGHT, BLOCK_N)
    if NUM_SPLITS > 1:
        n_blocks = tl.cdiv(hi - lo, BLOCK_N)
        per_split = tl.cdiv(n_blocks, NUM_SPLITS)
        new_lo = lo + split * per_split * BLOCK_N
        hi = tl.minimum(hi, new_lo + per_split * BLOCK_N)
        lo = new_lo

    # keys every valid row of the block may see whole: tiles there skip the causal/window/bound masks
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

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    # [lo, full_lo) and [full_hi, hi) masked, [full_lo, full_hi) whole
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, sk_l, sk_d, sv_l, sv_d, lo, full_lo, b, b_drop, h_row,
                               i_row, Lq_b, Lk_b, H, D, Dv, Bias, sb_b, sb_h, sb_i, sb_j, Slopes, ss_b, ss_h, qk_scale,
                               win_left, win_right, seed, drop_threshold, drop_scale, BIAS_KIND, CAUSAL, WINDOW_LEFT,
                               WINDOW_RIGHT, HAS_ALIBI, DROPOUT, IEEE_DOT, True, BLOCK_N, BLOCK_D, BLOCK_DV)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, sk_l, sk_d, sv_l, sv_d, full_lo, full_hi, b, b_drop,
                               h_row, i_row, Lq_b, Lk_b, H, D, Dv, Bias, sb_b, sb_h, sb_i, sb_j, Slopes, ss_b, ss_h,
                               qk_scale, win_left, win_right, seed, drop_threshold, drop_scale, BIAS_KIND, CAUSAL,
                               WINDOW_LEFT, WINDOW_RIGHT, HAS_ALIBI, DROPOUT, IEEE_DOT, False, BLOCK_N, BLOCK_D,
                               BLOCK_DV)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, sk_l, sk_d, sv_l, sv_d, full_hi, hi, b, b_drop, h_row,
                               i_row, Lq_b, Lk_b, H, D, Dv, Bias, sb_b, sb_h, sb_i, sb_j, Slopes, ss_b, ss_h, qk_scale,
                               win_left, win_right, seed, drop_threshold, drop_scale, BIAS_KIND, CAUSAL, WINDOW_LEFT,
                               WINDOW_RIGHT, HAS_ALIBI, DROPOUT, IEEE_DOT, True, BLOCK_N, BLOCK_D, BLOCK_DV)

    dead = l_i == 0.0
    l_safe = tl.where(dead, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(dead, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    o_ptrs = (Out + b * so_b + (q_start + i64[:, None]) * so_l + h_row[:, None] * so_h + split * so_s
              + offs_dv[None, :] * so_d)
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < Dv))
    tl.store(Lse + b * sl_b + (q_start + i64) * sl_l + h_row * sl_h + split * sl_s, lse, mask=row_ok)


@triton.jit
def _attn_combine_kernel(
    OutPart,  # (R, S, Dv) float32 partial outputs, each normalised within its split
    LsePart,  # (R, S) float32 partial lse
    Out,  # (R, Dv) in q's dtype, R = B*H*Lq rows (contiguous)
    Lse,  # (R,) float32
    R, Dv,
    NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """out = sum_s exp(lse_s - lse) * out_s with lse = logsumexp_s(lse_s); all -inf: out 0, lse -inf."""
    row = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    lse_s = tl.load(LsePart + row * NUM_SPLITS + offs_s, mask=offs_s < NUM_SPLITS, other=float("-inf"))
    m = tl.max(lse_s, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse_s - m_safe)
    total = tl.sum(w, 0)
    o_s = tl.load(OutPart + (row * NUM_SPLITS + offs_s[:, None]) * Dv + offs_dv[None, :],
                  mask=(offs_s[:, None] < NUM_SPLITS) & (offs_dv[None, :] < Dv), other=0.0)
    dead = total == 0.0
    total_safe = tl.where(dead, 1.0, total)
    out = tl.sum(o_s * w[:, None], 0) / total_safe
    tl.store(Out + row * Dv + offs_dv, out.to(Out.dtype.element_ty), mask=offs_dv < Dv)
    tl.store(Lse + row, tl.where(dead, float("-inf"), m_safe + tl.log(total_safe)))


# --------------------------------------------------------------------------------------------
# configs: one small config under the interpreter; sm_90-sized ones, autotuned per shape bucket
# --------------------------------------------------------------------------------------------


def fwd_configs():
    if interpreted():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    # H100 (sm_90): 128x128 tiles with 8 warps and 3 stages fit D <= 128 in 228 KB of shared memory;
    # D = 256 needs narrower key tiles. Smaller tiles win for short or decode-like shapes.
    shapes = [(128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 4, 4), (128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 2),
              (32, 64, 4, 3), (16, 64, 4, 3), (16, 128, 4, 2), (32, 32, 4, 1)]  # the last fits fp32 at D = 256
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


def prune_configs(configs, named_args, **kwargs):
    """Drop tiles too big for shared memory at large head dims, and row tiles larger than the rows."""
    bd = max(kwargs.get("BLOCK_D", 64), kwargs.get("BLOCK_DV", 64))
    rows = named_args.get("key_lq", 1 << 30)
    kept = []
    for c in configs:
        m, n = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        if bd >= 256 and (m * n > 64 * 64 or c.num_stages > 2):
            continue
        if bd >= 128 and m * n > 128 * 64 and c.num_stages > 2:
            continue
        if m > max(16, rows):
            continue
        kept.append(c)
    return kept or configs[-1:]


_AUTOTUNE_KEY = ["key_lq", "key_lk", "BLOCK_D", "BLOCK_DV", "BIAS_KIND", "CAUSAL", "DROPOUT", "VARLEN",
                 "PACK_GQA", "NUM_SPLITS"]


@functools.cache
def _tuned_fwd():
    configs = fwd_configs()
    if len(configs) == 1:
        return _attn_fwd_kernel, configs[0]
    return triton.autotune(configs=configs, key=_AUTOTUNE_KEY,
                           prune_configs_by={"early_config_prune": prune_configs})(_attn_fwd_kernel), None


def ieee_dot(q):
    """float32 matmuls in full precision unless torch allows TF32 for them (as torch's SDPA does)."""
    return q.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32


def pow2(n):
    return triton.next_power_of_2(max(int(n), 1))


def block_d(d):
    return max(16, pow2(d))


def bias_strides(bias):
    """Strides of a 4-D bias with 0 on every size-1 (broadcast) dim."""
    if bias is None:
        return (0, 0, 0, 0)
    return tuple(0 if n == 1 else s for n, s in zip(bias.shape, bias.stride()))


def flags(bias, causal, window, alibi_slopes, dropout_p):
    kind = BIAS_NONE if bias is None else BIAS_BOOL if bias.dtype.is_floating_point is False else BIAS_FLOAT
    return dict(BIAS_KIND=kind, CAUSAL=bool(causal), WINDOW_LEFT=window[0] >= 0, WINDOW_RIGHT=window[1] >= 0,
                HAS_ALIBI=alibi_slopes is not None, DROPOUT=dropout_p > 0.0)


def launch_forward(q, k, v, out, lse, bias, slopes, causal, scale, window, dropout_p, seed, drop_threshold,
                   q_strides, k_strides, v_strides, o_strides, l_strides, B, H, G, Lq, Lk,
                   cu_q=None, cu_k=None, pack_gqa=False, num_splits=1, out_part=None, lse_part=None):
    """Launch the forward. Strides are (batch, head, token, dim) of each tensor as the kernel reads
    them (varlen: batch stride 0). With num_splits > 1 the kernel writes the float32 partials
    ``out_part`` (B*H*Lq, S, Dv) / ``lse_part`` (B*H*Lq, S) and the combine kernel fills out/lse,
    which must then be contiguous (B, H, Lq, Dv) / (B, H, Lq)."""
    D, Dv = q.shape[-1], v.shape[-1]
    kernel, config = _tuned_fwd()
    bias_arg = bias.view(torch.uint8) if bias is not None and not bias.is_floating_point() else bias
    slopes_arg = slopes
    ss = (0, 0)
    if slopes is not None:
        ss = (slopes.stride(0), slopes.stride(1)) if slopes.dim() == 2 else (0, slopes.stride(0))
    dummy = q
    split = num_splits > 1
    o_tensor = out_part if split else out
    l_tensor = lse_part if split else lse
    if split:
        so = (H * Lq * num_splits * Dv, Lq * num_splits * Dv, num_splits * Dv, Dv, 1)
        sl = (H * Lq * num_splits, Lq * num_splits, num_splits, 1)
    else:
        so = (o_strides[0], o_strides[1], o_strides[2], 0, o_strides[3])
        sl = (l_strides[0], l_strides[1], l_strides[2], 0)
    rows = G * Lq if pack_gqa else Lq
    heads = H // G if pack_gqa else H
    meta = dict(flags(bias, causal, window, slopes, dropout_p), VARLEN=cu_q is not None, PACK_GQA=bool(pack_gqa),
                NUM_SPLITS=int(num_splits), IEEE_DOT=ieee_dot(q),
                BLOCK_D=block_d(D), BLOCK_DV=block_d(Dv))
    if config is not None:
        meta.update(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
    grid = lambda m: (triton.cdiv(rows, m["BLOCK_M"]) * num_splits * B * heads,)  # noqa: E731
    kernel[grid](
        q, k, v, o_tensor, l_tensor, bias_arg if bias_arg is not None else dummy,
        slopes_arg if slopes_arg is not None else dummy,
        cu_q if cu_q is not None else dummy, cu_k if cu_k is not None else dummy,
        *q_strides, *k_strides, *v_strides, *so, *sl, *bias_strides(bias), *ss,
        B, H, G, Lq, Lk, D, Dv,
        float(scale) * LOG2E, int(window[0]), int(window[1]),
        int(seed) if seed is not None else 0, int(drop_threshold), 1.0 / (1.0 - dropout_p) if dropout_p > 0 else 1.0,
        pow2(rows), pow2(Lk), **meta)
    if split:
        R = B * H * Lq
        _attn_combine_kernel[(R,)](out_part, lse_part, out, lse, R, Dv, NUM_SPLITS=int(num_splits),
                                   BLOCK_S=pow2(num_splits), BLOCK_DV=block_d(Dv))

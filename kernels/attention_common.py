"""What the flash attention forward (attention.py) and backward (attention_backward.py,
attention_dbias.py) share: the per-tile score rules, the dropout stream, the key ranges, and the
host-side argument helpers.

Legend: B batch (or sequences, varlen), H query heads, Hkv kv heads, G = H // Hkv, Lq/Lk
lengths, D/Dv head dims. Scores are kept in the log2 domain (scale * log2(e) folded in).

Dropout keeps (b, h, i, j) iff philox(seed, ((b*H + h)*Lq + i)*ceil(Lk/4) + j//4)[j % 4] >= threshold,
the exact stream of ``fusedformer.vocabulary.attention_dropout_keep`` (varlen: sequence b draws with seed
+ b and b = 0, as the per-sequence reference does). The kernels read the seed from a one-element
int64 device tensor, never from a host integer, so a captured CUDA graph that draws the seed on
the device before the kernel gets a fresh mask on every replay.
"""

import torch
import triton
import triton.language as tl
from fusedformer.kernels import _device, interpreted  # noqa: F401 (the attention kernels import interpreted from here)
from fusedformer.kernels.matmul_act import USE_TMA as TMA_ENABLED

LOG2E = 1.4426950408889634

# bias kinds
BIAS_NONE, BIAS_BOOL, BIAS_FLOAT = 0, 1, 2


@triton.jit
def _dot(a, b, IEEE_DOT: tl.constexpr):
    """a @ b: full fp32 precision ("ieee") when IEEE_DOT (see ieee_dot), else tl.dot's default."""
    if IEEE_DOT:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _by_row(x, TRANSPOSED: tl.constexpr):
    """A per-query-row vector as a column of the (query, key) tile, or a row of its transpose."""
    if TRANSPOSED:
        return x[None, :]
    else:
        return x[:, None]


@triton.jit
def _by_key(x, TRANSPOSED: tl.constexpr):
    """A per-key vector as a row of the (query, key) tile, or a column of its transpose."""
    if TRANSPOSED:
        return x[:, None]
    else:
        return x[None, :]


@triton.jit
def _row_offsets(row0, r, s_l, D, BLOCK_D: tl.constexpr, VEC: tl.constexpr):
    """(offsets of rows row0 + r, column mask d < D): with VEC > 1 the host found every row stride
    and head dim a multiple of VEC elements (16 bytes), so each row starts 16-byte aligned and the
    mask is constant over VEC columns: the loads stay 16-byte vectors (and cp.async) at head dims
    like 40 or 72 that Triton's own specialisation (multiples of 16) does not see."""
    rows = tl.multiple_of((row0 + r.to(tl.int64)) * s_l, VEC)
    cols = tl.max_constancy(tl.arange(0, BLOCK_D) < D, VEC)
    return rows, cols


@triton.jit
def _load_rows(src, b, h, row0, start, end, s_b, s_h, s_l, s_d, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
               USE_TMA: tl.constexpr, VEC: tl.constexpr):
    """Rows start .. start + BLOCK_R - 1 of head h of sequence b, (BLOCK_R, BLOCK_D), zero at rows
    >= end and columns >= D: of a (B, H, L, D) tensor by strides, or varlen of a (T, H, D) one whose
    sequence begins at token row0 (s_b = 0). USE_TMA (dense only): ``src`` is a tensor descriptor of
    the (B, H, L, D) tensor, block (1, 1, BLOCK_R, BLOCK_D), whose bounds zero-fill the rows past L
    and the columns past D: the copy engine computes the addresses, so no address or mask registers.
    VEC: see _row_offsets."""
    if USE_TMA:
        tile = src.load([b.to(tl.int32), h.to(tl.int32), (row0 + start).to(tl.int32), 0])
        return tile.reshape(BLOCK_R, BLOCK_D)
    else:
        r = start + tl.arange(0, BLOCK_R)
        rows, cols = _row_offsets(row0, r, s_l, D, BLOCK_D, VEC)
        ptrs = src + b * s_b + h * s_h + rows[:, None] + tl.arange(0, BLOCK_D)[None, :] * s_d
        return tl.load(ptrs, mask=(r[:, None] < end) & cols[None, :], other=0.0)


@triton.jit
def _store_rows(dst, b, h, row0, start, end, s_b, s_h, s_l, s_d, D, tile, BLOCK_R: tl.constexpr,
                BLOCK_D: tl.constexpr, VEC: tl.constexpr):
    """The mirror of _load_rows' pointer path: ``tile`` into those rows, in dst's dtype."""
    r = start + tl.arange(0, BLOCK_R)
    rows, cols = _row_offsets(row0, r, s_l, D, BLOCK_D, VEC)
    ptrs = dst + b * s_b + h * s_h + rows[:, None] + tl.arange(0, BLOCK_D)[None, :] * s_d
    tl.store(ptrs, tile.to(dst.dtype.element_ty), mask=(r[:, None] < end) & cols[None, :])


@triton.jit
def _tile_scores(qk, b, h_row, i_row, row_ok, j_col, Lk,
                 Bias,  # bias/mask (B|1, H|1, Lq|1, Lk|1); bool masks viewed as uint8
                 sb_b, sb_h, sb_i, sb_j,  # bias strides, 0 on broadcast dims
                 Slopes, ss_b, ss_h,  # ALiBi slopes (B|1, H) float32, batch stride 0 for (H,)
                 qk_scale, win_left, win_right,
                 BIAS_KIND: tl.constexpr, CAUSAL: tl.constexpr, WINDOW_LEFT: tl.constexpr,
                 WINDOW_RIGHT: tl.constexpr, HAS_ALIBI: tl.constexpr, MASK_KEYS: tl.constexpr = True,
                 TRANSPOSED: tl.constexpr = False):
    """Scores of a (BLOCK_M, BLOCK_N) tile in the log2 domain, -inf where masked; TRANSPOSED: of its
    (BLOCK_N, BLOCK_M) transpose, keys down the rows (qk = K Q^T). ``row_ok`` marks the query rows
    that exist (a padding row of the packed decode tile has a head index past H, so every bias and
    slope load is masked by it). MASK_KEYS=False is for tiles that the bounds, causal and window
    rules leave whole (the mask and bias still apply)."""
    s = qk * qk_scale
    i2 = _by_row(i_row, TRANSPOSED)
    j2 = _by_key(j_col, TRANSPOSED)
    inside = _by_row(row_ok, TRANSPOSED) & (j2 < Lk)
    valid = inside
    if MASK_KEYS:
        if CAUSAL:
            valid = valid & (j2 <= i2)
        if WINDOW_LEFT:
            valid = valid & (j2 >= i2 - win_left)
        if WINDOW_RIGHT:
            valid = valid & (j2 <= i2 + win_right)
    if BIAS_KIND != 0:
        ptrs = Bias + b * sb_b + _by_row(h_row, TRANSPOSED) * sb_h + i2.to(tl.int64) * sb_i + j2.to(tl.int64) * sb_j
        if BIAS_KIND == 1:
            valid = valid & (tl.load(ptrs, mask=inside, other=0) != 0)
        else:
            s += tl.load(ptrs, mask=inside, other=0.0).to(tl.float32) * 1.4426950408889634
    if HAS_ALIBI:
        slope = tl.load(Slopes + b * ss_b + h_row * ss_h, mask=row_ok, other=0.0).to(tl.float32)
        dist = tl.abs(i2 - j2).to(tl.float32)
        s -= _by_row(slope, TRANSPOSED) * 1.4426950408889634 * dist
    if MASK_KEYS or BIAS_KIND == 1:
        s = tl.where(valid, s, float("-inf"))
    return s


@triton.jit
def _load_seed(Seed, b, VARLEN: tl.constexpr):
    """The dropout seed from its device tensor; varlen sequence b draws with seed + b."""
    seed = tl.load(Seed)
    if VARLEN:
        seed = seed + b
    return seed


@triton.jit
def _dropout_keep(seed, b, h_row, i_row, n0, H, Lq, Lk, drop_threshold, BLOCK_N: tl.constexpr):
    """Keep-mask of the (BLOCK_M, BLOCK_N) tile of keys n0.. (n0 a multiple of 4): key j of row r =
    (b*H + h)*Lq + i keeps iff output j % 4 of philox(seed, r * ceil(Lk / 4) + j // 4) >= threshold
    (unsigned). One randint4x call per four keys: BLOCK_M * BLOCK_N / 4 calls per tile."""
    rows = (b * H + h_row) * Lq + i_row
    calls = (n0 // 4 + tl.arange(0, BLOCK_N // 4)).to(tl.int64)
    r0, r1, r2, r3 = tl.randint4x(seed, rows[:, None] * tl.cdiv(Lk, 4) + calls[None, :])
    # interleave the four outputs along the keys: key 4c + t takes output t of call c
    draws = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (rows.shape[0], BLOCK_N))
    return draws.to(tl.int64) >= drop_threshold


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
def _sequence(CuQ, CuK, Seed, b, Lq, Lk, DROPOUT: tl.constexpr, VARLEN: tl.constexpr):
    """(q_start, Lq_b, k_start, Lk_b, seed, b_drop) of sequence b: _seq_bounds, the dropout seed
    (0 without dropout) and the batch index of its dropout stream (varlen: 0, see the legend)."""
    q_start, Lq_b, k_start, Lk_b = _seq_bounds(CuQ, CuK, b, Lq, Lk, VARLEN)
    seed = 0
    if DROPOUT:
        seed = _load_seed(Seed, b, VARLEN)
    b_drop = b * 0 if VARLEN else b
    return q_start, Lq_b, k_start, Lk_b, seed, b_drop


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
def _whole_key_range(lo, hi, i_lo, i_hi, Lk_b, win_left, win_right, CAUSAL: tl.constexpr,
                     WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, BLOCK_N: tl.constexpr):
    """[full_lo, full_hi) inside [lo, hi): key tiles every row i_lo..i_hi sees whole, which skip the
    causal/window/bound masks; [lo, full_lo) and [full_hi, hi) stay masked."""
    full_lo = lo
    full_hi = tl.minimum(hi, (Lk_b // BLOCK_N) * BLOCK_N)
    if CAUSAL:
        full_hi = tl.minimum(full_hi, ((i_lo + 1) // BLOCK_N) * BLOCK_N)
    if WINDOW_RIGHT:
        full_hi = tl.minimum(full_hi, ((i_lo + win_right + 1) // BLOCK_N) * BLOCK_N)
    if WINDOW_LEFT:
        full_lo = tl.maximum(full_lo, tl.cdiv(i_hi - win_left, BLOCK_N) * BLOCK_N)
    full_lo = tl.minimum(full_lo, hi)
    return full_lo, tl.maximum(full_hi, full_lo)


@triton.jit
def _probs_tile(a, b_op, lse2, b, h_row, i_row, j, Lq_b, Lk_b, Bias, sb_b, sb_h, sb_i, sb_j, Slopes, ss_b, ss_h,
                qk_scale, win_left, win_right, BIAS_KIND: tl.constexpr, CAUSAL: tl.constexpr,
                WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, HAS_ALIBI: tl.constexpr,
                IEEE_DOT: tl.constexpr, MASK_KEYS: tl.constexpr = True, TRANSPOSED: tl.constexpr = False):
    """P = exp2(S - lse2) of a (BLOCK_M, BLOCK_N) tile from (a, b_op) = (Q, K^T), or with TRANSPOSED
    P^T of its transpose from (K, Q^T); lse2 = +inf on dead rows gives P = 0."""
    qk = _dot(a, b_op, IEEE_DOT)
    s = _tile_scores(qk, b, h_row, i_row, i_row < Lq_b, j, Lk_b, Bias, sb_b, sb_h, sb_i, sb_j, Slopes, ss_b, ss_h,
                     qk_scale, win_left, win_right, BIAS_KIND, CAUSAL, WINDOW_LEFT, WINDOW_RIGHT, HAS_ALIBI,
                     MASK_KEYS, TRANSPOSED)
    return tl.math.exp2(s - _by_row(lse2, TRANSPOSED))


@triton.jit
def _load_lse2(Lse, Delta, row_base, i, Lq_b):
    """lse in log2 units (+inf for dead rows and rows past the end) and delta of rows i."""
    lse = tl.load(Lse + row_base + i, mask=i < Lq_b, other=float("-inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    delta = tl.load(Delta + row_base + i, mask=i < Lq_b, other=0.0)
    return lse2, delta


# --------------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------------


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


def slope_strides(slopes):
    """(batch, head) strides of (B, H) or (H,) ALiBi slopes (batch stride 0 for (H,))."""
    if slopes is None:
        return (0, 0)
    return (slopes.stride(0), slopes.stride(1)) if slopes.dim() == 2 else (0, slopes.stride(0))


def seed_tensor(seed, device):
    """The dropout seed as the one-element int64 device tensor the kernels read: a tensor seed
    (what the op draws on the device) is used in place, an int is copied to the device."""
    if isinstance(seed, torch.Tensor):
        return seed.to(device=device, dtype=torch.int64).reshape(1)
    return torch.tensor([int(seed)], dtype=torch.int64, device=device)


# K/V (forward, dQ) and Q/dO (dK/dV) tiles through TMA descriptors: which kernel argument takes
# which tile rows; the config's pre_hook (or run(), for a fixed config) sets the block shape
TMA_ROWS = {"Q": "BLOCK_M", "dOut": "BLOCK_M", "K": "BLOCK_N", "V": "BLOCK_N"}


def tma_capable(device):
    """TMA descriptors are used on sm_90+ unless FUSEDFORMER_TMA=0 (the GEMM's switch)."""
    return TMA_ENABLED and device.type == "cuda" and _device.properties(device).major >= 9


def tma_eligible(t):
    """A (B, H, L, D) tensor a descriptor can read: 16-bit, non-empty, unit last stride, 16-byte
    aligned base and strides (size-1 dims are never stepped: any stride)."""
    es = t.element_size()
    return (t.dtype in (torch.float16, torch.bfloat16) and t.numel() > 0 and t.stride(-1) == 1
            and t.data_ptr() % 16 == 0
            and all(s > 0 and (s * es) % 16 == 0 for n, s in zip(t.shape[:-1], t.stride()[:-1]) if n > 1))


def use_tma(device, varlen, *tensors):
    """Decided on the host: descriptors for dense (B, H, L, D) tensors on a TMA-capable device when
    every one is eligible; varlen keeps pointers (a descriptor would read past a sequence's end
    into the next sequence rather than zeros)."""
    return not varlen and tma_capable(device) and all(tma_eligible(t) for t in tensors)


def descriptors(tma, *tensors):
    """Each tensor as a TMA descriptor of block (1, 1, rows, BLOCK_D) when ``tma``, else itself; the
    rows are the config's (set_tma_blocks)."""
    if not tma:
        return tensors
    from triton.tools.tensor_descriptor import TensorDescriptor

    def strides(t):  # a size-1 dim is never stepped: any 16-byte multiple will do
        return [s if n > 1 else 16 // t.element_size() for n, s in zip(t.shape[:-1], t.stride()[:-1])] + [1]

    return tuple(TensorDescriptor(t, list(t.shape), strides(t), [1, 1, 16, block_d(t.shape[-1])]) for t in tensors)


def set_tma_blocks(nargs):
    """pre_hook of every attention config: a descriptor argument's block rows are the config's tile."""
    for name, rows in TMA_ROWS.items():
        desc = nargs.get(name)
        if hasattr(desc, "block_shape"):
            desc.block_shape = [1, 1, nargs[rows], desc.block_shape[3]]


def vector_width(tensors, strides):
    """VEC for the kernels: elements per 16 bytes when every head dim and every (batch, head, token)
    stride the kernels step by is a multiple of it, else 1 (see _row_offsets)."""
    vec = 16 // tensors[0].element_size()
    dims = [t.shape[-1] for t in tensors] + [s for group in strides for s in group[:3]]
    return vec if all(n % vec == 0 for n in dims) else 1


def pointer_args(q, bias, slopes, seed, dropout_p):
    """(Bias, Slopes, Seed) kernel arguments: bool masks viewed as uint8, q for what is unused."""
    bias_arg = q if bias is None else bias if bias.is_floating_point() else bias.view(torch.uint8)
    seed_arg = seed_tensor(seed, q.device) if dropout_p > 0 else q
    return bias_arg, q if slopes is None else slopes, seed_arg


def dropout_args(dropout_p, drop_threshold):
    """(drop_threshold, drop_scale): keep iff philox >= drop_threshold, kept values scaled 1/(1-p)."""
    return int(drop_threshold), 1.0 / (1.0 - dropout_p) if dropout_p > 0 else 1.0


def flags(bias, causal, window, alibi_slopes, dropout_p):
    kind = BIAS_NONE if bias is None else BIAS_BOOL if bias.dtype.is_floating_point is False else BIAS_FLOAT
    return dict(BIAS_KIND=kind, CAUSAL=bool(causal), WINDOW_LEFT=window[0] >= 0, WINDOW_RIGHT=window[1] >= 0,
                HAS_ALIBI=alibi_slopes is not None, DROPOUT=dropout_p > 0.0)

"""Shared launch decisions of the row-wise kernels (softmax, layer_norm, rms_norm): block shapes
and warps per row length, program counts, and the deterministic reduction of per-program partial
sums (dweight / dbias) that the norm backward uses instead of atomics, and the norm kernels' tile
load/store helpers.

Every choice is a pure function of (row length, rows bucket, dtype size) and is cached in a dict,
so a call costs a dict lookup, and Triton compiles once per distinct choice, not per call.
"""

import torch
import triton
import triton.language as tl
from fusedformer.kernels import _device

# Programs per launch: grid axis 0 allows 2^31 - 1; kernels walk their tiles with a grid-stride
# loop, so capping the grid never drops rows (tests lower this to exercise the loop).
MAX_PROGRAMS = 1 << 20

# A row up to this many elements is held on chip and read once (fp32 registers: 16 warps x 32
# threads x 32 values); longer rows are walked in LOOP_BLOCK chunks.
MAX_FUSED_FWD = 16384
MAX_FUSED_BWD = 8192
LOOP_BLOCK = 4096
# Target elements per tile for short rows: several rows share a program, so a 64-wide row does
# not leave 31 of 32 lanes idle. Backward tiles are larger: its persistent programs (about one
# per SM) need enough bytes in flight per SM to cover memory latency.
TILE_ELEMENTS = 4096
TILE_ELEMENTS_BWD = 8192
MAX_BLOCK_M = 64
# dweight/dbias partials cost 8*G bytes per column against 3*M*e for dy, x, dx: G stays within
# this fraction of that traffic (and between 1 and 4 programs per SM).
PARTIAL_TRAFFIC = 0.05

_configs = {}


def next_pow2(n):
    return 1 << max(0, int(n) - 1).bit_length()


def row_config(n_rows, n_cols, elem_bytes, backward=False):
    """(BLOCK_M, BLOCK_N, SINGLE, num_warps) for a row-wise kernel over (n_rows, n_cols).

    SINGLE: the whole row fits in one BLOCK_N tile (read once). Otherwise BLOCK_M = 1 and the
    kernel loops over the row in LOOP_BLOCK chunks. Forward: four 16-byte vectors per thread
    before adding warps; backward keeps ~16 fp32 values per thread and array (it holds dy, x
    and the dweight/dbias accumulators at once)."""
    max_fused = MAX_FUSED_BWD if backward else MAX_FUSED_FWD
    rows_bucket = min(next_pow2(max(n_rows, 1)), MAX_BLOCK_M)
    key = (rows_bucket, n_cols, elem_bytes, backward, max_fused, LOOP_BLOCK)
    cfg = _configs.get(key)
    if cfg is None:
        block_n = next_pow2(max(n_cols, 1))
        single = block_n <= max_fused
        if not single:
            block_n = LOOP_BLOCK
        tile = TILE_ELEMENTS_BWD if backward else TILE_ELEMENTS
        block_m = max(1, min(tile // block_n, rows_bucket)) if single else 1
        per_thread = 16 if backward else max(1, 16 // elem_bytes) * 4
        num_warps = max(1, min(16, next_pow2(block_m * block_n // (32 * per_thread))))
        cfg = (block_m, block_n, single, num_warps)
        _configs[key] = cfg
    return cfg


def num_programs(n_tiles):
    return max(1, min(n_tiles, MAX_PROGRAMS))


def persistent_programs(n_tiles, n_rows, elem_bytes, device):
    """Programs G of a persistent backward that keeps per-program partial sums: 1 to 4 per SM
    (4 "SMs" on the CPU interpreter), bounded by PARTIAL_TRAFFIC. A pure function of the shape
    and the device, so the reduction order, and the result, never change between runs."""
    device = torch.device(device)
    sms = _device.properties(device).multi_processor_count if device.type == "cuda" else 4
    per_sm = int(PARTIAL_TRAFFIC * 3 * n_rows * elem_bytes / 8 / sms)
    return max(1, min(n_tiles, sms * max(1, min(4, per_sm))))


# reads G*N fp32 partials, writes N
@triton.jit
def _sum_partials_kernel(
    P,  # partial sums, (G, N) fp32, contiguous: row g is program g's sum over its rows
    OUT,  # result, (N,), the weight's dtype
    G,  # number of partial rows
    N,  # row length
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for g0 in range(0, G, BLOCK_G):
        g = g0 + tl.arange(0, BLOCK_G)
        ptrs = P + g.to(tl.int64)[:, None] * N + cols[None, :]
        acc += tl.sum(tl.load(ptrs, mask=(g < G)[:, None] & cmask[None, :], other=0.0), axis=0)
    tl.store(OUT + cols, acc.to(OUT.dtype.element_ty), mask=cmask)


def sum_partials(partial, out):
    """out[:] = partial.sum(0) in a fixed order (no atomics: bitwise reproducible)."""
    G, N = partial.shape
    block_n = min(64, next_pow2(N))  # N / 64 programs: the G rows of a wide weight in parallel
    _sum_partials_kernel[(triton.cdiv(N, block_n),)](partial, out, G, N, BLOCK_G=32, BLOCK_N=block_n,
                                                     num_warps=4)
    return out


# Tile helpers of the norm kernels: inlined by Triton, so they cost nothing at run time. rows and
# cols are int64/int32 index vectors, mask the (rows, cols) tile mask; loads return fp32.
@triton.jit
def load_tile(P, rows, stride, cols, mask):
    """P[rows, cols] (row stride `stride`, unit column stride) as fp32, 0 where masked."""
    return tl.load(P + rows[:, None] * stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def store_tile(P, rows, stride, cols, val, mask):
    """P[rows, cols] = val in P's dtype."""
    tl.store(P + rows[:, None] * stride + cols[None, :], val.to(P.dtype.element_ty), mask=mask)


@triton.jit
def load_vec(P, cols, cmask):
    """P[cols] of an (N,) vector (weight, bias) as fp32, 0 where masked."""
    return tl.load(P + cols, mask=cmask, other=0.0).to(tl.float32)


@triton.jit
def load_h(X, R, rows, sx, sr, cols, mask, HAS_RES: tl.constexpr):
    """h = x (+ residual) in fp32."""
    h = load_tile(X, rows, sx, cols, mask)
    if HAS_RES:
        h += load_tile(R, rows, sr, cols, mask)
    return h


@triton.jit
def scale_by_weight(v, W, cols, cmask, HAS_W: tl.constexpr):
    """v * w[None, :] (v itself without a weight)."""
    if HAS_W:
        v = v * load_vec(W, cols, cmask)[None, :]
    return v

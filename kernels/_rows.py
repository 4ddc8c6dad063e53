"""Shared launch decisions of the row-wise kernels (softmax, layer_norm, rms_norm): block shapes
and warps per row length, program counts, and the deterministic reduction of per-program partial
sums (dweight / dbias) that the norm backwards use instead of atomics.

Every choice is a pure function of (row length, rows bucket, dtype size) and is cached in a dict,
so a call costs a dict lookup, and Triton compiles once per distinct choice, not per call.
"""

import torch
import triton
import triton.language as tl

# Programs per launch: grid axis 0 allows 2^31 - 1; kernels walk their tiles with a grid-stride
# loop, so capping the grid never drops rows (tests lower this to exercise the loop).
MAX_PROGRAMS = 1 << 20

# A row up to this many elements is held on chip and read once (fp32 registers: 16 warps x 32
# threads x 32 values); longer rows are walked in LOOP_BLOCK chunks.
MAX_FUSED_FWD = 16384
MAX_FUSED_BWD = 8192
LOOP_BLOCK = 4096
# Target elements per program for short rows: several rows share a program, so a 64-wide row
# does not leave 31 of 32 lanes idle.
TILE_ELEMENTS = 4096
MAX_BLOCK_M = 64

_configs = {}
_sm_counts = {}


def next_pow2(n):
    return 1 << max(0, int(n) - 1).bit_length()


def row_config(n_rows, n_cols, elem_bytes, max_fused):
    """(BLOCK_M, BLOCK_N, SINGLE, num_warps) for a row-wise kernel over (n_rows, n_cols).

    SINGLE: the whole row fits in one BLOCK_N tile (one read). Otherwise BLOCK_M = 1 and the
    kernel loops over the row in BLOCK_N chunks. Loads are 16 bytes per thread when possible."""
    rows_bucket = min(next_pow2(max(n_rows, 1)), MAX_BLOCK_M)
    key = (rows_bucket, n_cols, elem_bytes, max_fused)
    cfg = _configs.get(key)
    if cfg is None:
        block_n = next_pow2(max(n_cols, 1))
        single = block_n <= max_fused
        if not single:
            block_n = LOOP_BLOCK
        block_m = max(1, min(TILE_ELEMENTS // block_n, rows_bucket)) if single else 1
        # 16-byte vectors per thread, a few vectors each: ~4 vectors per thread before more warps
        per_thread = max(1, 16 // elem_bytes) * 4
        num_warps = max(1, min(16, next_pow2(block_m * block_n // (32 * per_thread))))
        cfg = (block_m, block_n, single, num_warps)
        _configs[key] = cfg
    return cfg


def num_programs(n_tiles):
    return max(1, min(n_tiles, MAX_PROGRAMS))


def persistent_programs(n_tiles, device):
    """Programs for a persistent kernel that keeps per-program partial sums: a few per SM on a
    GPU (4 on the CPU interpreter). Fixed per device, so the reduction order, and the result,
    do not change from run to run."""
    key = str(device)
    count = _sm_counts.get(key)
    if count is None:
        dev = torch.device(device)
        count = torch.cuda.get_device_properties(dev).multi_processor_count * 4 if dev.type == "cuda" else 4
        _sm_counts[key] = count
    return max(1, min(n_tiles, count))


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
    block_n = min(256, next_pow2(N))
    _sum_partials_kernel[(triton.cdiv(N, block_n),)](partial, out, G, N, BLOCK_G=32, BLOCK_N=block_n,
                                                     num_warps=4)
    return out

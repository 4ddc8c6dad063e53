"""The tiles kernels/matmul_act.py's autotuner chooses from, the rule that prunes them to those that
fit (no spills, shared memory within the device's), and the rule that picks split-K's slices."""

import triton

from . import _autotune

# MODE 1 writes one bias-partials row per BLOCK_M rows, so its configs fix BLOCK_M
DH_BLOCK_M = 128

# (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps): the usual Hopper/Ampere GEMM tiles, then
# 128-row tiles for the recompute backward (MODE 1) of gated activations, and narrow-K tiles for
# fp32 "ieee" products (FMA units, operands in registers)
_TILES = [
    (128, 256, 64, 3, 8), (128, 128, 64, 3, 8), (128, 128, 64, 4, 8), (128, 128, 32, 4, 4),
    (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4), (64, 256, 64, 3, 8),
    (128, 64, 64, 3, 8), (64, 128, 16, 2, 8), (64, 64, 16, 2, 4), (32, 64, 32, 2, 4), (128, 32, 16, 2, 8),
]
MAX_LIVE = 64  # fp32 values per thread (MAX_LIVE_IEEE for ieee products); see fits
MAX_LIVE_IEEE = 88


def fits(config, elt, gated, ieee, smem=_autotune.SMEM_SM90, staged=0):
    """Whether a tile fits the dtype (element size ``elt``) without spilling or overflowing shared
    memory. W columns per tile: N' = BLOCK_N, twice that when gated (gate and up); ``staged``
    output tiles pass through shared memory (the TMA epilogue's, staged_tiles).

        smem = (num_stages * (BLOCK_M + N') * BLOCK_K + staged * BLOCK_M * BLOCK_N) * elt  <= smem
        live = (BLOCK_M * N' + ieee * BLOCK_K * (BLOCK_M + N')) / threads      <= 64 (88 ieee)

    Compiled for sm_90a (pointer path, bf16 and fp32-ieee, plain and gated, 44 tile builds) the
    shared memory formula is exact for bf16 and an upper bound for ieee; bf16 tiles with
    live <= 64 did not spill and those at 128 mostly did (4 B to 3 KB); ieee tiles at <= 88 did
    not, at >= 96 they did (0.9 KB to 17 KB, ptxas falling back to 32 registers at 128x256). The
    TMA epilogue's staging (sm_90a, bf16) is exact for the plain forward (y and preact: 2 x 32 KB
    at 128x128) and an upper bound for the gated one (3 stores staged in 2 tiles' space)."""
    bm, bn, bk = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.kwargs["BLOCK_K"]
    cols = bn * (2 if gated else 1)
    live = (bm * cols + ieee * bk * (bm + cols)) / (32 * config.num_warps)
    smem_ok = (config.num_stages * (bm + cols) * bk + staged * bm * bn) * elt <= smem
    return smem_ok and live <= (MAX_LIVE_IEEE if ieee else MAX_LIVE)


def staged_tiles(args):
    """Output tiles the TMA epilogue stages in shared memory for these kernel arguments: each
    store's (y, preact or dh halves) and the dy load's; split-K's fp32 partial tile (two 16-bit
    tiles' bytes), which the flattened TMA loop converts through shared memory before its stores."""
    if args["MODE"] == 2:
        return 2 if args.get("USE_TMA") else 0
    if not args.get("OUT_TMA"):  # a pointer epilogue (or a caller that never asks for TMA)
        return 0
    halves = 2 if args["GATED"] else 1
    if args["MODE"] == 0:
        return 1 + halves * bool(args["STORE_P"])
    return halves + bool(args["STORE_Y"]) + 1


def set_tma_blocks(nargs):
    """The descriptors' boxes for the config's tile (the descriptors are built before it is chosen)."""
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    if nargs["USE_TMA"]:
        nargs["X"].block_shape = [bm, bk]
        nargs["W"].block_shape = [bn, bk]
    if nargs["OUT_TMA"]:
        nargs["Y"].block_shape = [bm, bn]
        nargs["P"].block_shape = [bm, 1, bn]  # P is described as (M, halves, N_OUT): see _store_half
        if nargs["MODE"] == 1:
            nargs["DY"].block_shape = [bm, bn]


def configs():
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=s, num_warps=w,
                          pre_hook=set_tma_blocks) for bm, bn, bk, s, w in _TILES]


def prune(configs, named_args, **kwargs):
    """The GEMM family's rule: tiles that fit the dtype (fits); MODE 1 fixes BLOCK_M; small M
    takes at most 64-row tiles."""
    args = {**named_args, **kwargs}
    x = args["X"].base if hasattr(args["X"], "base") else args["X"]  # a TMA descriptor's tensor
    ieee = args["INPUT_PRECISION"] == "ieee"
    smem = _autotune.smem_limit(x.device)
    kept = [c for c in configs if fits(c, x.element_size(), args["GATED"], ieee, smem, staged_tiles(args))
            and (args["MODE"] != 1 or c.kwargs["BLOCK_M"] == DH_BLOCK_M)]
    small = [c for c in kept if c.kwargs["BLOCK_M"] <= 64]
    return small if args["M_BUCKET"] <= 64 and args["MODE"] != 1 and small else kept


# split-K: the output tile its rule counts (the small-M configs' widest), the fewest BLOCK_K steps
# a slice keeps (fewer leave the pipeline's prologue and the partials' traffic uncovered), at most
# this many slices, and only at or below this many rows
SPLIT_TILE = (64, 128)
SPLIT_MIN_STEPS = 4
MAX_SPLITS = 16
SPLIT_MAX_M = 64


def split_k(M, n_out, K, sms, tile=SPLIT_TILE, block_k=64, min_steps=SPLIT_MIN_STEPS):
    """K slices for an (M, K) x (K, n_out) GEMM: 1 unless M is decode-size and its output tiles
    leave SMs idle; then enough slices to fill them, each of at least ``min_steps`` K steps."""
    if M > SPLIT_MAX_M:
        return 1
    tiles = triton.cdiv(M, tile[0]) * triton.cdiv(n_out, tile[1])
    return max(1, min(sms // tiles, triton.cdiv(K, block_k) // min_steps, MAX_SPLITS))

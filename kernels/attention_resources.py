"""Which attention tile configs fit a call's dtype and head dims: the prune rules, applied before
anything is compiled (autotune's early_config_prune), one per kernel family.

Symbols: M = BLOCK_M, N = BLOCK_N, D/Dv = BLOCK_D/BLOCK_DV, e the element size in bytes, T = 32 *
num_warps threads, "streamed" the tiles loaded per loop step (forward: K and V, N x (D + Dv)).

- shared memory per block, bounded from above by
      e * (num_stages * streamed + M * N + resident)        (forward; resident Q, M x D)
  against the device's opt-in limit (227 KB sm_90, 163 KB sm_80).
- registers: the fp32 values each thread keeps live,
      (accumulator + scores + resident * e/4 + prefetched * e/4 + ieee * streamed) / T
  where "prefetched" is the next steps' streamed tiles (num_stages > 1), and fp32 "ieee" dots
  run on FMA units with both operands in registers. Forward limit 224 (100 for ieee dots): 128x128,
  8 warps, 2 stages at D = 128 (224) compiles to 254 registers, no spill, on sm_90a (4 B on
  sm_80); with dropout (+M x N draws, 288) it spilled 40 B and is pruned.
- warps: each warp owns at least 64 of the M x N scores (8 warps on a 16x16 tile spilled in
  dK/dV for every dtype, 4 to 132 B, with few values live).

The constants come from compiling configs for sm_90a with triton's ptxas (no GPU needed) and
reading shared memory, registers and spill bytes: 47 forward configs (D = 128 and 256; bf16,
fp32, fp32-ieee) and 48 backward ones (dK/dV and dQ; same dtypes). Every measured shared memory
lies under its bound. Forward: no bf16 or fp32 config the rule keeps spilled (fp32-ieee: 8 B at
16x32 / 8 warps / D = 256); every 16-bit one it prunes did (44 B to 1.6 KB), and so did the
pruned ieee tiles (1.4 KB at 32x32 / 4 warps / D = 128, up to 70 KB where ptxas fell back to
32 registers). Backward (below, limit 128 for 16-bit, 144 for fp32): no bf16 tile it keeps
spilled in either kernel, each of the six larger bf16 tiles it prunes at D = 128 did in dK/dV
(48 B to 1.2 KB); kept fp32 tiles spill at most 148 B (ptxas holds some to 128 registers).
fp32-ieee backward tiles take 16 query rows: a 32-row one spilled 452 B to 6.7 KB in dK/dV.
Since issue 18 the 16-bit backward at head dims <= 128 is no longer modelled: BWD_16BIT lists the
tiles measured spill-free, per kernel, load path (TMA or pointers), head-dim bucket and dropout;
the model above still rules fp32 and D = 256.
"""

from fusedformer.kernels._autotune import SMEM_SM90

MAX_LIVE_FWD = 224
MAX_LIVE_IEEE = 100  # forward, fp32-ieee
MAX_LIVE_BWD = {2: 128, 4: 144}  # by element size
MIN_SCORES_PER_WARP = 64
TMA_BARRIERS = 1024  # shared memory the TMA pipeline's mbarriers take (measured: 230400 = 229376 + 1024)

# 16-bit backward tiles at head dims <= 128 that compiled without spills, measured one by one
# (bf16 causal, triton 3.6 and its ptxas; head-dim bucket 64 or 128; without and with dropout):
# (M, N, warps, stages, SPLIT_DKDV). TMA tiles on sm_90a; pointer tiles on sm_90a and sm_80 both.
# dK/dV registers / spill bytes of the ones left out: 128x128 (two-pass, TMA) 255 / 508 B at
# D = 128, 144 B at D = 64; 128x64 (two-pass, TMA) 255 / 340 B; 64x128 one-pass 255 / 104 B;
# pointers at D = 128: 64x128 255 / 144-180 B, 32x128 / sm_80 255 / 56 B. dQ through TMA
# descriptors crashed triton 3.6's ptxas (12.8, segfault) on every wgmma tile, so dQ reads by
# pointers; dQ 128x64 / 8 warps spills on sm_80 (72 B at D = 128) but not on sm_90a.
_TMA_64 = {(64, 128, 8, 2, True), (64, 128, 8, 3, True), (64, 128, 8, 2, False), (32, 128, 8, 2, False),
           (64, 64, 4, 2, False)}
_PTR_64 = {(32, 128, 8, 2, False), (32, 64, 4, 2, False), (32, 32, 4, 2, False), (16, 32, 8, 1, False)}
_PTR_DROPOUT = {(32, 32, 8, 1, False), (32, 32, 4, 2, False)}
BWD_16BIT = {
    ("dkdv", True, 64, False): _TMA_64,
    ("dkdv", True, 64, True): _TMA_64,
    ("dkdv", True, 128, False): {(64, 128, 8, 2, True), (32, 128, 8, 2, False), (32, 128, 8, 2, True),
                                 (64, 64, 4, 2, True)},
    ("dkdv", True, 128, True): {(32, 128, 8, 2, True)},
    ("dkdv", False, 64, False): _PTR_64,
    ("dkdv", False, 64, True): _PTR_DROPOUT | {(16, 32, 8, 1, False)},
    ("dkdv", False, 128, False): _PTR_DROPOUT | {(16, 32, 8, 1, False)},
    ("dkdv", False, 128, True): _PTR_DROPOUT,
    ("dq", False, 64, False): {(128, 64, 8, 2), (64, 64, 8, 2), (32, 64, 4, 2), (32, 32, 4, 2), (32, 32, 8, 1),
                               (16, 32, 8, 1)},
    ("dq", False, 64, True): {(32, 64, 4, 2), (32, 32, 4, 2), (32, 32, 8, 1), (16, 32, 8, 1)},
    ("dq", False, 128, False): {(64, 64, 8, 2), (64, 64, 4, 2), (32, 64, 4, 2), (32, 32, 4, 2), (32, 32, 8, 1),
                                (16, 32, 8, 1)},
    ("dq", False, 128, True): {(64, 64, 8, 2), (32, 64, 4, 2), (32, 32, 4, 2), (32, 32, 8, 1), (16, 32, 8, 1)},
}
# With K/V through TMA descriptors, the forward's 2-stage wgmma tiles (BLOCK_M >= 64) crashed
# triton 3.6's ptxas (12.8, segfault): 128x128 / 8 warps and 64x32 / 4 warps at D = 128 (CUDA
# 13's ptxas compiles the same PTX: 221 registers, no spill, for the first); 3-stage and
# 1-warpgroup-free (BLOCK_M < 64) tiles compiled.


def _shape(config):
    return config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], 32 * config.num_warps, config.num_stages


def _warps_fit(config):
    return config.num_warps * MIN_SCORES_PER_WARP <= config.kwargs["BLOCK_M"] * config.kwargs["BLOCK_N"]


def fits_fwd(config, d, dv, elt, ieee, smem=SMEM_SM90, dropout=False, tma=False):
    """Forward tile: streams K, V (N x (D + Dv)); keeps acc (M x Dv), scores (M x N) and Q (M x D),
    and with dropout the tile's M x N Philox draws. With TMA the scores stay out of shared memory
    (wgmma takes P from registers; the pointer path's M x N is the slack its layout conversions
    take), and the pipeline adds its barriers."""
    m, n, threads, stages = _shape(config)
    streamed = n * (d + dv)
    live = m * (dv + n) + m * d * elt / 4 + (stages > 1) * streamed * elt / 4 + ieee * streamed + dropout * m * n
    limit = MAX_LIVE_IEEE if ieee else MAX_LIVE_FWD
    shared = elt * (stages * streamed + m * d) + (TMA_BARRIERS if tma else elt * m * n)
    if tma and stages == 2 and m >= 64:
        return False
    return _warps_fit(config) and shared <= smem and live / threads <= limit


def _fits_bwd_tile(m, n, threads, stages, d, dv, elt, smem):
    """dK/dV tile: streams Q, dO (M x (D + Dv)); keeps dK, dV (N x (D + Dv)) with K, V resident,
    and P, dP, dS (M x N)."""
    streamed, kept = m * (d + dv), n * (d + dv)
    live = kept * (1 + elt / 4) + 3 * m * n
    return elt * ((stages + 1) * streamed + m * n + kept) <= smem and live / threads <= MAX_LIVE_BWD[elt]


def fits_bwd(kernel, config, d, dv, elt, ieee, smem=SMEM_SM90, dropout=False, tma=False):
    """Backward tile of ``kernel`` ("dkdv" or "dq"). 16-bit at head dims <= 128: the measured
    table BWD_16BIT (and the shared memory bound). Otherwise (fp32, D = 256) the register model
    below, one-pass dK/dV only, and both orientations, as the dQ kernel is the dK/dV tile's
    mirror image (M query rows keep dQ and stream the keys)."""
    m, n, threads, stages = _shape(config)
    split = config.kwargs.get("SPLIT_DKDV", False)
    if elt == 2 and max(d, dv) <= 128:
        tile = (m, n, config.num_warps, stages) + ((split,) if kernel == "dkdv" else ())
        return tile in BWD_16BIT[kernel, tma, 64 if max(d, dv) <= 64 else 128, dropout] and _fits_bwd_tile(
            m, n, 1 << 30, stages, d, dv, elt, smem)
    if split or (ieee and m > 16):
        return False
    return _warps_fit(config) and all(_fits_bwd_tile(a, b, threads, stages, d, dv, elt, smem)
                                      for a, b in ((m, n), (n, m)))

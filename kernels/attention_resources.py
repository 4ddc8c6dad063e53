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
"""

from fusedformer.kernels._autotune import SMEM_SM90

MAX_LIVE_FWD = 224
MAX_LIVE_IEEE = 100  # forward, fp32-ieee
MAX_LIVE_BWD = {2: 128, 4: 144}  # by element size
MIN_SCORES_PER_WARP = 64


def _shape(config):
    return config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], 32 * config.num_warps, config.num_stages


def _warps_fit(config):
    return config.num_warps * MIN_SCORES_PER_WARP <= config.kwargs["BLOCK_M"] * config.kwargs["BLOCK_N"]


def fits_fwd(config, d, dv, elt, ieee, smem=SMEM_SM90, dropout=False):
    """Forward tile: streams K, V (N x (D + Dv)); keeps acc (M x Dv), scores (M x N) and Q (M x D),
    and with dropout the tile's M x N Philox draws."""
    m, n, threads, stages = _shape(config)
    streamed = n * (d + dv)
    live = m * (dv + n) + m * d * elt / 4 + (stages > 1) * streamed * elt / 4 + ieee * streamed + dropout * m * n
    limit = MAX_LIVE_IEEE if ieee else MAX_LIVE_FWD
    return _warps_fit(config) and elt * (stages * streamed + m * n + m * d) <= smem and live / threads <= limit


def _fits_bwd_tile(m, n, threads, stages, d, dv, elt, smem):
    """dK/dV tile: streams Q, dO (M x (D + Dv)); keeps dK, dV (N x (D + Dv)) with K, V resident,
    and P, dP, dS (M x N)."""
    streamed, kept = m * (d + dv), n * (d + dv)
    live = kept * (1 + elt / 4) + 3 * m * n
    return elt * ((stages + 1) * streamed + m * n + kept) <= smem and live / threads <= MAX_LIVE_BWD[elt]


def fits_bwd(config, d, dv, elt, ieee, smem=SMEM_SM90):
    """Backward tile: one config serves the dK/dV kernel and the dQ kernel, its mirror image (M
    query rows keep dQ and stream the keys), so both orientations must fit."""
    m, n, threads, stages = _shape(config)
    if ieee and m > 16:
        return False
    return _warps_fit(config) and all(_fits_bwd_tile(a, b, threads, stages, d, dv, elt, smem)
                                      for a, b in ((m, n), (n, m)))

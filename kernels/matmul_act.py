"""GEMM with a bias + activation epilogue: y = act(x @ W^T + b), the preact never re-read from memory.

Legend: M rows, K in-features, N = W's rows, N_OUT the output width (N, or N / 2 for gated
activations whose W stacks [gate; up]). One program computes a BLOCK_M x BLOCK_N tile of the
output; for a gated activation it holds two fp32 accumulators, gate columns [n, n + BLOCK_N) and
the matching up columns [N_OUT + n, ...), so act(gate) * up is formed in registers and only
N_OUT columns are written. Memory traffic (MODE 0): reads M*K + N*K (per tile row/column block),
writes M*N_OUT, plus M*N for the preact only when the backward will need it (STORE_P).

MODE 1 is the backward of a recompute: the same GEMM rebuilds the preact h tile, and the epilogue
turns it into the gradient dh without ever storing h:

    dh = dy * act'(h)                   gated: dgate = dy * up * act'(gate), dup = dy * act(gate)
    db partials[pid_m, :] = sum over the tile's rows of dh   (summed by the launcher: no atomics)

and optionally also writes y = act(h) (the FFN's hidden, which dW2 needs). dX = dh @ W and
dW = dh^T @ x are plain GEMMs left to cuBLAS by the backend.

Accumulation is fp32. fp32 inputs multiply in full fp32 ("ieee") unless ``ALLOW_TF32`` (set
from FUSEDFORMER_ALLOW_TF32=1, or assign the module attribute) allows tf32. On sm_90+ with
16-byte aligned rows (16-bit dtypes, K a multiple of 8) the operands stream through TMA
descriptors in a persistent kernel (one program per SM walking tiles in grouped order); else
masked pointer loads, where rows and columns past the edge wrap (loads stay in bounds) and
stores are masked. Configs are autotuned per (M bucket, N_OUT, K, mode, gated, dtypes) and the
choice is cached in memory and on disk (triton's cache dir).
"""

import functools
import os

import torch
import triton
import triton.language as tl

from . import _autotune
from .bias_act import act_fn, act_grad_fn, interpreted, kernel_activation, store_gated_grad

# fp32 operands: full-precision products unless allowed (parity with torch's default, which
# keeps torch.backends.cuda.matmul.allow_tf32 off)
ALLOW_TF32 = os.environ.get("FUSEDFORMER_ALLOW_TF32", "0") == "1"
# TMA + persistent kernel on sm_90+ (FUSEDFORMER_TMA=0 falls back to pointer loads)
USE_TMA = os.environ.get("FUSEDFORMER_TMA", "1") != "0"
# MODE 1 writes one bias-partials row per BLOCK_M rows, so its configs fix BLOCK_M
DH_BLOCK_M = 128


@triton.jit
def _matmul_act_kernel(
    X,  # input rows (M, K): a pointer, or with USE_TMA a descriptor of block [BLOCK_M, BLOCK_K]
    W,  # weight (N, K), [gate; up] when GATED: a pointer, or a descriptor of block [BLOCK_N, BLOCK_K]
    B,  # bias (N,); unused unless HAS_BIAS
    Y,  # MODE 0: act output (M, N_OUT); MODE 1: recomputed act output, when STORE_Y. Contiguous
    P,  # MODE 0: preact (M, N), when STORE_P; MODE 1: dh (M, N). Contiguous
    DY,  # MODE 1: upstream gradient (M, N_OUT)
    DB,  # MODE 1 with HAS_BIAS: fp32 bias-gradient partials (cdiv(M, BLOCK_M), N)
    M, N_OUT, K,
    stride_xm, stride_xk,  # strides of X (pointer path)
    stride_wn, stride_wk,  # strides of W (pointer path)
    stride_dym, stride_dyn,  # strides of DY
    M_BUCKET,  # autotuning key only (next power of two of M)
    MODE: tl.constexpr, ACT: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr,
    STORE_Y: tl.constexpr, STORE_P: tl.constexpr, USE_TMA: tl.constexpr, EVEN_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N_OUT, BLOCK_N)
    num_tiles = num_pid_m * num_pid_n
    n_total = 2 * N_OUT if GATED else N_OUT
    k_tiles = tl.cdiv(K, BLOCK_K)
    tiles_per_group = GROUP_M * num_pid_n
    # one tile per program, or (persistent grid) a strided walk over all tiles
    for tile in range(tl.program_id(0), num_tiles, tl.num_programs(0)):
        # grouped order: GROUP_M row blocks in flight share each weight tile in L2
        first_m = (tile // tiles_per_group) * GROUP_M
        group_m = min(num_pid_m - first_m, GROUP_M)
        pid_m = first_m + (tile % tiles_per_group) % group_m
        pid_n = (tile % tiles_per_group) // group_m
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if USE_TMA:
            # out-of-bounds rows/cols of a TMA box read as zeros; gate columns past N_OUT read up
            # rows, which only feed output columns the stores mask off
            for kt in range(k_tiles):
                x = X.load([pid_m * BLOCK_M, kt * BLOCK_K])
                w = W.load([pid_n * BLOCK_N, kt * BLOCK_K])
                acc = tl.dot(x, w.T, acc, input_precision=INPUT_PRECISION)
                if GATED:
                    w_up = W.load([N_OUT + pid_n * BLOCK_N, kt * BLOCK_K])
                    acc_up = tl.dot(x, w_up.T, acc_up, input_precision=INPUT_PRECISION)
        else:
            # wrapped indices keep every load in bounds without a row/column mask
            rm = (offs_m % M).to(tl.int64)
            rn = (offs_n % N_OUT).to(tl.int64)
            rk = tl.arange(0, BLOCK_K)
            x_ptrs = X + rm[:, None] * stride_xm + rk[None, :] * stride_xk  # (BLOCK_M, BLOCK_K)
            w_ptrs = W + rn[None, :] * stride_wn + rk[:, None] * stride_wk  # (BLOCK_K, BLOCK_N)
            w_up_ptrs = W + (rn + N_OUT)[None, :] * stride_wn + rk[:, None] * stride_wk
            for kt in range(k_tiles):
                if EVEN_K:
                    x = tl.load(x_ptrs)
                    w = tl.load(w_ptrs)
                else:
                    k_left = K - kt * BLOCK_K
                    x = tl.load(x_ptrs, mask=rk[None, :] < k_left, other=0.0)
                    w = tl.load(w_ptrs, mask=rk[:, None] < k_left, other=0.0)
                acc = tl.dot(x, w, acc, input_precision=INPUT_PRECISION)
                if GATED:
                    if EVEN_K:
                        w_up = tl.load(w_up_ptrs)
                    else:
                        w_up = tl.load(w_up_ptrs, mask=rk[:, None] < K - kt * BLOCK_K, other=0.0)
                    acc_up = tl.dot(x, w_up, acc_up, input_precision=INPUT_PRECISION)
                    w_up_ptrs += BLOCK_K * stride_wk
                x_ptrs += BLOCK_K * stride_xk
                w_ptrs += BLOCK_K * stride_wk

        # epilogue: bias, activation (or its gradient), masked stores
        rows = offs_m.to(tl.int64)
        col_ok = offs_n < N_OUT
        mask = (rows[:, None] < M) & col_ok[None, :]
        h = acc
        up = acc_up
        if HAS_BIAS:
            h += tl.load(B + offs_n, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            if GATED:
                up += tl.load(B + N_OUT + offs_n, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        y_ptrs = Y + rows[:, None] * N_OUT + offs_n[None, :]
        p_ptrs = P + rows[:, None] * n_total + offs_n[None, :]
        if MODE == 0:
            if GATED:
                y = act_fn(h, ACT) * up
            else:
                y = act_fn(h, ACT)
            tl.store(y_ptrs, y.to(Y.dtype.element_ty), mask=mask)
            if STORE_P:
                tl.store(p_ptrs, h.to(P.dtype.element_ty), mask=mask)
                if GATED:
                    tl.store(p_ptrs + N_OUT, up.to(P.dtype.element_ty), mask=mask)
        else:
            dy = tl.load(DY + rows[:, None] * stride_dym + offs_n[None, :] * stride_dyn, mask=mask,
                         other=0.0).to(tl.float32)
            db_ptrs = DB + pid_m.to(tl.int64) * n_total + offs_n
            if GATED:
                d_gate, d_up = store_gated_grad(p_ptrs, y_ptrs, dy, h, up, mask, N_OUT, ACT, STORE_Y)
                if HAS_BIAS:
                    tl.store(db_ptrs, tl.sum(tl.where(mask, d_gate, 0.0), axis=0), mask=col_ok)
                    tl.store(db_ptrs + N_OUT, tl.sum(tl.where(mask, d_up, 0.0), axis=0), mask=col_ok)
            else:
                dh = act_grad_fn(dy, h, ACT)
                tl.store(p_ptrs, dh.to(P.dtype.element_ty), mask=mask)
                if STORE_Y:
                    tl.store(y_ptrs, act_fn(h, ACT).to(Y.dtype.element_ty), mask=mask)
                if HAS_BIAS:
                    tl.store(db_ptrs, tl.sum(tl.where(mask, dh, 0.0), axis=0), mask=col_ok)


# --------------------------------------------------------------------------------------------
# configs and launch
# --------------------------------------------------------------------------------------------

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


def fits(config, elt, gated, ieee, smem=_autotune.SMEM_SM90):
    """Whether a tile fits the dtype (element size ``elt``) without spilling or overflowing shared
    memory. W columns per tile: N' = BLOCK_N, twice that when gated (gate and up).

        smem = num_stages * (BLOCK_M + N') * BLOCK_K * elt                    <= smem
        live = (BLOCK_M * N' + ieee * BLOCK_K * (BLOCK_M + N')) / threads      <= 64 (88 ieee)

    Compiled for sm_90a (pointer path, bf16 and fp32-ieee, plain and gated, 44 tile builds) the
    shared memory formula is exact for bf16 and an upper bound for ieee; bf16 tiles with
    live <= 64 did not spill and those at 128 mostly did (4 B to 3 KB); ieee tiles at <= 88 did
    not, at >= 96 they did (0.9 KB to 17 KB, ptxas falling back to 32 registers at 128x256)."""
    bm, bn, bk = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.kwargs["BLOCK_K"]
    cols = bn * (2 if gated else 1)
    live = (bm * cols + ieee * bk * (bm + cols)) / (32 * config.num_warps)
    smem_ok = config.num_stages * (bm + cols) * bk * elt <= smem
    return smem_ok and live <= (MAX_LIVE_IEEE if ieee else MAX_LIVE)


def _set_tma_blocks(nargs):
    if nargs["USE_TMA"]:
        nargs["X"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_K"]]
        nargs["W"].block_shape = [nargs["BLOCK_N"], nargs["BLOCK_K"]]


def _configs():
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=s, num_warps=w,
                          pre_hook=_set_tma_blocks) for bm, bn, bk, s, w in _TILES]


def _prune(configs, named_args, **kwargs):
    """The GEMM family's rule: tiles that fit the dtype (fits); MODE 1 fixes BLOCK_M; small M
    takes at most 64-row tiles."""
    args = {**named_args, **kwargs}
    x = args["X"].base if hasattr(args["X"], "base") else args["X"]  # a TMA descriptor's tensor
    ieee = args["INPUT_PRECISION"] == "ieee"
    smem = _autotune.smem_limit(x.device)
    kept = [c for c in configs if fits(c, x.element_size(), args["GATED"], ieee, smem)
            and (args["MODE"] == 0 or c.kwargs["BLOCK_M"] == DH_BLOCK_M)]
    small = [c for c in kept if c.kwargs["BLOCK_M"] <= 64]
    return small if args["M_BUCKET"] <= 64 and args["MODE"] == 0 and small else kept


_KEY = ["M_BUCKET", "N_OUT", "K", "MODE", "GATED", "ACT", "USE_TMA", "STORE_P", "STORE_Y"]
# the timings persist in triton's cache dir (a new process skips the tuning; _autotune makes that
# work with the TMA pre_hook), and nothing is tuned under CUDA graph capture
_tuned_kernel = _autotune.autotune(_configs(), _KEY, _prune, _autotune.smallest)(
    triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})(_matmul_act_kernel))

# the interpreter (CPU tests): one small config, no autotuning
_INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2}


@functools.cache
def _sm_count(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


def tma_eligible(x, weight):
    """Operands the TMA path takes: 16-bit, non-empty, unit inner stride, 16-byte aligned base and
    rows (fp32 keeps the pointer path: its 64-wide K boxes would exceed the 128-byte swizzle)."""
    es = x.element_size()
    return (x.dtype in (torch.float16, torch.bfloat16) and x.numel() > 0 and weight.numel() > 0
            and x.stride(1) == 1 and weight.stride(1) == 1 and (x.stride(0) * es) % 16 == 0
            and (weight.stride(0) * es) % 16 == 0 and x.data_ptr() % 16 == 0 and weight.data_ptr() % 16 == 0)


def _want_tma(x, weight, use_tma):
    if use_tma is None:
        use_tma = (USE_TMA and x.is_cuda and torch.cuda.get_device_capability(x.device)[0] >= 9)
    return bool(use_tma) and tma_eligible(x, weight)


def _input_precision(dtype):
    if dtype == torch.float32 and not ALLOW_TF32:
        return "ieee"
    return "tf32"  # the default; for 16-bit operands it has no effect


def _launch(x, weight, bias, activation, mode, y, p, grad_y, db, store_y, store_p, use_tma):
    from triton.tools.tensor_descriptor import TensorDescriptor

    act, gated = kernel_activation("matmul_act", activation)
    M, K = x.shape
    n_out = weight.shape[0] // 2 if gated else weight.shape[0]
    tma = _want_tma(x, weight, use_tma)
    X, W = x, weight
    if tma:
        # block shapes are placeholders: the config's pre_hook (or the interpreter config) sets them
        X = TensorDescriptor(x, list(x.shape), list(x.stride()), [16, 16])
        W = TensorDescriptor(weight, list(weight.shape), list(weight.stride()), [16, 16])
    dy = grad_y if grad_y is not None else y
    args = (X, W, bias if bias is not None else y, y, p, dy, db if db is not None else y, M, n_out, K,
            x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), dy.stride(0), dy.stride(1),
            triton.next_power_of_2(M))
    meta = dict(MODE=mode, ACT=act, GATED=gated, HAS_BIAS=bias is not None, STORE_Y=store_y, STORE_P=store_p,
                USE_TMA=tma, INPUT_PRECISION=_input_precision(x.dtype))
    if interpreted():
        cfg = dict(_INTERPRETER_CONFIG)
        if tma:
            X.block_shape = [cfg["BLOCK_M"], cfg["BLOCK_K"]]
            W.block_shape = [cfg["BLOCK_N"], cfg["BLOCK_K"]]
        tiles = triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(n_out, cfg["BLOCK_N"])
        # a persistent walk when TMA is on (as on the GPU), so the interpreter covers that loop
        grid = (max(1, min(tiles, 3)),) if tma else (tiles,)
        _matmul_act_kernel[grid](*args, **meta, EVEN_K=K % cfg["BLOCK_K"] == 0, **cfg)
        return
    # TMA path: persistent, one program per SM; pointer path: one program per tile
    programs = None
    if tma:
        programs = _sm_count(x.device.index if x.device.index is not None else torch.cuda.current_device())

    def grid(meta_):
        tiles = triton.cdiv(M, meta_["BLOCK_M"]) * triton.cdiv(n_out, meta_["BLOCK_N"])
        return (min(tiles, programs) if programs else tiles,)

    _tuned_kernel[grid](*args, **meta)


def _check(x, weight, activation):
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"matmul_act: x {tuple(x.shape)} and weight {tuple(weight.shape)} are not (M, K) and (N, K)")
    if kernel_activation("matmul_act", activation)[1] and weight.shape[0] % 2:
        raise ValueError(f"matmul_act: gated activation {activation!r} needs an even number of weight rows")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"matmul_act: x has dtype {x.dtype}; float16, bfloat16 or float32 only")


def matmul_act_forward(x, weight, bias, activation, *, store_preact=True, use_tma=None):
    """(y, preact or None) = act(x @ weight^T + bias) for x (M, K), weight (N, K), bias (N,).

    Gated activations give y (M, N / 2). preact (M, N) is written only when ``store_preact``.
    ``use_tma`` None: on sm_90+ when the operands allow it.
    """
    _check(x, weight, activation)
    gated = kernel_activation("matmul_act", activation)[1]
    M, N = x.shape[0], weight.shape[0]
    n_out = N // 2 if gated else N
    y = torch.empty(M, n_out, device=x.device, dtype=x.dtype)
    preact = torch.empty(M, N, device=x.device, dtype=x.dtype) if store_preact else None
    if M and n_out:
        _launch(x, weight, bias, activation, 0, y, preact if preact is not None else y, None, None, False,
                store_preact, use_tma)
    return y, preact


def matmul_act_dh(grad_y, x, weight, bias, activation, *, store_y=False, use_tma=None):
    """Recompute h = x @ weight^T + bias in a GEMM and return (dh, db, y) from its epilogue.

    dh (M, N) = dy * act'(h) in x's dtype (gated: [dgate | dup]); db (N,) fp32 column sums of dh
    when bias is given, else None; y = act(h) (M, N_OUT) when ``store_y``, else None.
    """
    _check(x, weight, activation)
    gated = kernel_activation("matmul_act", activation)[1]
    M, N = x.shape[0], weight.shape[0]
    n_out = N // 2 if gated else N
    dev = x.device
    dh = torch.empty(M, N, device=dev, dtype=x.dtype)
    y = torch.empty(M, n_out, device=dev, dtype=x.dtype) if store_y else None
    if not (M and n_out):
        return dh.zero_(), (torch.zeros(N, device=dev) if bias is not None else None), y
    block_m = _INTERPRETER_CONFIG["BLOCK_M"] if interpreted() else DH_BLOCK_M
    partials = torch.empty(triton.cdiv(M, block_m), N, device=dev, dtype=torch.float32) if bias is not None else None
    _launch(x, weight, bias, activation, 1, y if y is not None else dh, dh, grad_y, partials, store_y, False, use_tma)
    return dh, (partials.sum(0) if partials is not None else None), y

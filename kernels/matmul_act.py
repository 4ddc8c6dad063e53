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

MODE 2 is split-K for decode-size M, where there are fewer output tiles than SMs: program
(slice, tile) multiplies one of SPLITS K slices and writes its fp32 partial sums, once, to
(SPLITS, M, N); bias_act's epilogue kernels then add the slices in a fixed order (deterministic,
no atomics) and apply the same epilogue (forward, or dh / db / y for the recompute backward).

Accumulation is fp32. fp32 inputs multiply in full fp32 ("ieee") unless ``ALLOW_TF32`` (set
from FUSEDFORMER_ALLOW_TF32=1, or assign the module attribute) allows tf32. On sm_90+ with
16-byte aligned rows (16-bit dtypes, K a multiple of 8) the operands stream through TMA
descriptors in a persistent kernel (one program per SM walking tiles in grouped order, the walk
flattened into one software-pipelined loop so each epilogue overlaps the next tile's loads), and
when the output rows are aligned too (N_OUT a multiple of 8) the epilogue stores (and dy loads)
are TMA too (OUT_TMA); else masked pointer loads, where rows and columns past the edge wrap
(loads stay in bounds) and stores are masked. Configs are autotuned per (M bucket, N_OUT, K,
slices, mode, gated, dtypes) and the choice is cached in memory and on disk (triton's cache dir).
"""

import os

import torch
import triton
import triton.language as tl

from . import _autotune, _device
from .bias_act import (
    act_fn,
    act_grad_fn,
    bias_act_backward,
    bias_act_forward,
    gated_grad,
    interpreted,
    kernel_activation,
)
from .matmul_act_configs import DH_BLOCK_M, configs, prune, set_tma_blocks, split_k

# fp32 operands: full-precision products unless allowed (parity with torch's default, which
# keeps torch.backends.cuda.matmul.allow_tf32 off)
ALLOW_TF32 = os.environ.get("FUSEDFORMER_ALLOW_TF32", "0") == "1"
# TMA + persistent kernel on sm_90+ (FUSEDFORMER_TMA=0 falls back to pointer loads)
USE_TMA = os.environ.get("FUSEDFORMER_TMA", "1") != "0"


@triton.jit
def _tile_of(tile, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of output tile ``tile`` in grouped order: GROUP_M row blocks in flight share
    each weight tile in L2."""
    tiles_per_group = GROUP_M * num_pid_n
    first_m = (tile // tiles_per_group) * GROUP_M
    group_m = min(num_pid_m - first_m, GROUP_M)
    return first_m + (tile % tiles_per_group) % group_m, (tile % tiles_per_group) // group_m


@triton.jit
def _store_out(dst, value, m0, n0, rows, cols, stride, mask, OUT_TMA: tl.constexpr):
    """One BLOCK_M x BLOCK_N output tile at (m0, n0): a TMA store through descriptor ``dst``
    (the box is clipped at the tensor's edge), else a masked store at dst + rows * stride + cols."""
    if OUT_TMA:
        dst.store([m0, n0], value.to(dst.dtype))
    else:
        tl.store(dst + rows[:, None] * stride + cols[None, :], value.to(dst.dtype.element_ty), mask=mask)


@triton.jit
def _store_half(dst, value, half, m0, n0, rows, cols, n_total, N_OUT, mask, OUT_TMA: tl.constexpr):
    """A tile of the gate (half 0) or up (half 1) columns of a (M, n_total) output; with OUT_TMA
    ``dst`` describes it as (M, halves, N_OUT), so the gate box is clipped before the up columns."""
    if OUT_TMA:
        dst.store([m0, half, n0], tl.reshape(value.to(dst.dtype), (value.shape[0], 1, value.shape[1])))
    else:
        ptrs = dst + rows[:, None] * n_total + (cols + half * N_OUT)[None, :]
        tl.store(ptrs, value.to(dst.dtype.element_ty), mask=mask)


@triton.jit
def _matmul_act_kernel(
    X,  # input rows (M, K): a pointer, or with USE_TMA a descriptor of block [BLOCK_M, BLOCK_K]
    W,  # weight (N, K), [gate; up] when GATED: a pointer, or a descriptor of block [BLOCK_N, BLOCK_K]
    B,  # bias (N,); unused unless HAS_BIAS
    Y,  # MODE 0: act output (M, N_OUT); MODE 1: recomputed act output, when STORE_Y
    P,  # MODE 0: preact (M, N), when STORE_P; MODE 1: dh (M, N); MODE 2: fp32 partials (SPLITS, M, N)
    DY,  # MODE 1: upstream gradient (M, N_OUT)
    DB,  # MODE 1 with HAS_BIAS: fp32 bias-gradient partials (cdiv(M, BLOCK_M), N)
    M, N_OUT, K,
    stride_xm, stride_xk,  # strides of X (pointer path)
    stride_wn, stride_wk,  # strides of W (pointer path)
    stride_dym, stride_dyn,  # strides of DY (pointer epilogue)
    SPLITS,  # K slices (MODE 2), else 1
    M_BUCKET,  # autotuning key only (next power of two of M)
    MODE: tl.constexpr, ACT: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr,
    STORE_Y: tl.constexpr, STORE_P: tl.constexpr, USE_TMA: tl.constexpr, OUT_TMA: tl.constexpr,
    EVEN_K: tl.constexpr, INPUT_PRECISION: tl.constexpr, GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N_OUT, BLOCK_N)
    num_tiles = num_pid_m * num_pid_n
    n_total = 2 * N_OUT if GATED else N_OUT
    k_tiles = tl.cdiv(K, BLOCK_K)
    k_per_split = tl.cdiv(k_tiles, SPLITS)
    # one tile per program, or (persistent grid) a strided walk over all tiles and K slices; with
    # TMA the walk is flattened into one pipelined loop, so a tile's epilogue runs while the next
    # tile's first loads are in flight
    for work in tl.range(tl.program_id(0), num_tiles * SPLITS, tl.num_programs(0), flatten=USE_TMA):
        split = work // num_tiles
        pid_m, pid_n = _tile_of(work % num_tiles, num_pid_m, num_pid_n, GROUP_M)
        m0 = pid_m * BLOCK_M
        n0 = pid_n * BLOCK_N
        k_lo = split * k_per_split
        k_hi = min(k_lo + k_per_split, k_tiles)

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if USE_TMA:
            # out-of-bounds rows/cols of a TMA box read as zeros (so may the last slice's K steps);
            # gate columns past N_OUT read up rows, which only feed columns the stores mask off.
            # The same trip count every tile: what lets the compiler flatten the walk
            for step in range(k_per_split):
                kt = k_lo + step
                x = X.load([m0, kt * BLOCK_K])
                w = W.load([n0, kt * BLOCK_K])
                acc = tl.dot(x, w.T, acc, input_precision=INPUT_PRECISION)
                if GATED:
                    w_up = W.load([N_OUT + n0, kt * BLOCK_K])
                    acc_up = tl.dot(x, w_up.T, acc_up, input_precision=INPUT_PRECISION)
        else:
            # wrapped indices keep every load in bounds without a row/column mask
            rm = ((m0 + tl.arange(0, BLOCK_M)) % M).to(tl.int64)
            rn = ((n0 + tl.arange(0, BLOCK_N)) % N_OUT).to(tl.int64)
            rk = tl.arange(0, BLOCK_K)
            k0 = k_lo * BLOCK_K
            x_ptrs = X + rm[:, None] * stride_xm + (k0 + rk)[None, :] * stride_xk  # (BLOCK_M, BLOCK_K)
            w_ptrs = W + rn[None, :] * stride_wn + (k0 + rk)[:, None] * stride_wk  # (BLOCK_K, BLOCK_N)
            w_up_ptrs = W + (rn + N_OUT)[None, :] * stride_wn + (k0 + rk)[:, None] * stride_wk
            for kt in range(k_lo, k_hi):
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

        # epilogue: bias, activation (or its gradient), stores
        rows = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < N_OUT
        mask = (rows[:, None] < M) & col_ok[None, :]
        if MODE == 2:  # one K slice's fp32 partial sums; the epilogue pass adds the slices in order
            part = P + split.to(tl.int64) * M * n_total
            _store_half(part, acc, 0, m0, n0, rows, cols, n_total, N_OUT, mask, False)
            if GATED:
                _store_half(part, acc_up, 1, m0, n0, rows, cols, n_total, N_OUT, mask, False)
        else:
            h = acc
            up = acc_up
            if HAS_BIAS:
                h += tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
                if GATED:
                    up += tl.load(B + N_OUT + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            if MODE == 0:
                if GATED:
                    _store_out(Y, act_fn(h, ACT) * up, m0, n0, rows, cols, N_OUT, mask, OUT_TMA)
                else:
                    _store_out(Y, act_fn(h, ACT), m0, n0, rows, cols, N_OUT, mask, OUT_TMA)
                if STORE_P:
                    _store_half(P, h, 0, m0, n0, rows, cols, n_total, N_OUT, mask, OUT_TMA)
                    if GATED:
                        _store_half(P, up, 1, m0, n0, rows, cols, n_total, N_OUT, mask, OUT_TMA)
            else:
                if OUT_TMA:
                    dy = DY.load([m0, n0]).to(tl.float32)
                else:
                    dy = tl.load(DY + rows[:, None] * stride_dym + cols[None, :] * stride_dyn, mask=mask,
                                 other=0.0).to(tl.float32)
                db_ptrs = DB + pid_m.to(tl.int64) * n_total + cols
                if GATED:
                    a, d_gate, d_up = gated_grad(dy, h, up, ACT)
                    _store_half(P, d_gate, 0, m0, n0, rows, cols, n_total, N_OUT, mask, OUT_TMA)
                    _store_half(P, d_up, 1, m0, n0, rows, cols, n_total, N_OUT, mask, OUT_TMA)
                    if STORE_Y:
                        _store_out(Y, a * up, m0, n0, rows, cols, N_OUT, mask, OUT_TMA)
                    if HAS_BIAS:
                        tl.store(db_ptrs, tl.sum(tl.where(mask, d_gate, 0.0), axis=0), mask=col_ok)
                        tl.store(db_ptrs + N_OUT, tl.sum(tl.where(mask, d_up, 0.0), axis=0), mask=col_ok)
                else:
                    dh = act_grad_fn(dy, h, ACT)
                    _store_half(P, dh, 0, m0, n0, rows, cols, n_total, N_OUT, mask, OUT_TMA)
                    if STORE_Y:
                        _store_out(Y, act_fn(h, ACT), m0, n0, rows, cols, N_OUT, mask, OUT_TMA)
                    if HAS_BIAS:
                        tl.store(db_ptrs, tl.sum(tl.where(mask, dh, 0.0), axis=0), mask=col_ok)


# --------------------------------------------------------------------------------------------
# configs and launch
# --------------------------------------------------------------------------------------------

_KEY = ["M_BUCKET", "N_OUT", "K", "SPLITS", "MODE", "GATED", "ACT", "USE_TMA", "OUT_TMA", "STORE_P", "STORE_Y"]
# the timings persist in triton's cache dir (a new process skips the tuning; _autotune makes that
# work with the TMA pre_hook), and nothing is tuned under CUDA graph capture
_tuned_kernel = _autotune.autotune(configs(), _KEY, prune, _autotune.smallest)(
    triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})(_matmul_act_kernel))

# the interpreter (CPU tests): one small config, no autotuning
_INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2}


# what the interpreter pretends to run on, so small test shapes take the split-K path
_INTERPRETER_SMS = 16


def _sm_count(index):
    return _device.properties(index).multi_processor_count


def _programs_available(x):
    if interpreted():
        return _INTERPRETER_SMS
    return _sm_count(x.device.index if x.device.index is not None else torch.cuda.current_device())


def _auto_splits(x, n_out):
    M, K = x.shape
    if interpreted():
        cfg = _INTERPRETER_CONFIG
        return split_k(M, n_out, K, _INTERPRETER_SMS, (cfg["BLOCK_M"], cfg["BLOCK_N"]), cfg["BLOCK_K"], 2)
    return split_k(M, n_out, K, _programs_available(x))


def _tma_rows(*tensors):
    """Whether each 2-D tensor can be a TMA descriptor: unit inner stride, 16-byte aligned base and rows."""
    return all(t.stride(1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0
               for t in tensors)


def tma_eligible(x, weight):
    """Operands the TMA path takes: 16-bit, non-empty, TMA rows (fp32 keeps the pointer path: its
    64-wide K boxes would exceed the 128-byte swizzle)."""
    return (x.dtype in (torch.float16, torch.bfloat16) and x.numel() > 0 and weight.numel() > 0
            and _tma_rows(x, weight))


def _want_tma(x, weight, use_tma):
    if use_tma is None:
        use_tma = USE_TMA and x.is_cuda and _device.properties(x.device).major >= 9
    return bool(use_tma) and tma_eligible(x, weight)


def _input_precision(dtype):
    if dtype == torch.float32 and not ALLOW_TF32:
        return "ieee"
    return "tf32"  # the default; for 16-bit operands it has no effect


def _descriptor(t, shape=None, strides=None):
    from triton.tools.tensor_descriptor import TensorDescriptor

    # the box is a placeholder: the config's pre_hook (or the interpreter config) sets it
    box = [16] * len(shape or t.shape)
    return TensorDescriptor(t, list(shape or t.shape), list(strides or t.stride()), box)


def _launch(x, weight, bias, activation, mode, y, p, grad_y, db, store_y, store_p, use_tma, splits=1):
    act, gated = kernel_activation("matmul_act", activation)
    M, K = x.shape
    n_out = weight.shape[0] // 2 if gated else weight.shape[0]
    tma = _want_tma(x, weight, use_tma)
    dy = grad_y if grad_y is not None else y
    # the epilogue through TMA too: y and p written by this call (dy read) with aligned rows
    out_tma = tma and mode != 2 and _tma_rows(y, *([dy] if mode == 1 else []))
    X, W, Y, P, DY = x, weight, y, p, dy
    if tma:
        X, W = _descriptor(x), _descriptor(weight)
    if out_tma:
        Y = _descriptor(y)
        # (M, halves, N_OUT): gate and up halves of the preact / dh (p is y when nothing is stored)
        P = _descriptor(p, (M, p.shape[1] // n_out, n_out), (p.stride(0), n_out, 1))
        DY = _descriptor(dy) if mode == 1 else dy
    args = (X, W, bias if bias is not None else y, Y, P, DY, db if db is not None else y, M, n_out, K,
            x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), dy.stride(0), dy.stride(1), splits,
            triton.next_power_of_2(M))
    meta = dict(MODE=mode, ACT=act, GATED=gated, HAS_BIAS=bias is not None, STORE_Y=store_y, STORE_P=store_p,
                USE_TMA=tma, OUT_TMA=out_tma, INPUT_PRECISION=_input_precision(x.dtype))
    if interpreted():
        cfg = dict(_INTERPRETER_CONFIG)
        set_tma_blocks({**cfg, **meta, "X": X, "W": W, "Y": Y, "P": P, "DY": DY})
        work = triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(n_out, cfg["BLOCK_N"]) * splits
        # a persistent walk when TMA is on (as on the GPU), so the interpreter covers that loop
        grid = (max(1, min(work, 3)),) if tma else (work,)
        _matmul_act_kernel[grid](*args, **meta, EVEN_K=K % cfg["BLOCK_K"] == 0, **cfg)
        return
    # TMA path: persistent, one program per SM; pointer path: one program per (slice, tile)
    programs = _programs_available(x) if tma else None

    def grid(meta_):
        work = triton.cdiv(M, meta_["BLOCK_M"]) * triton.cdiv(n_out, meta_["BLOCK_N"]) * splits
        return (min(work, programs) if programs else work,)

    _tuned_kernel[grid](*args, **meta)


def _check(x, weight, activation):
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"matmul_act: x {tuple(x.shape)} and weight {tuple(weight.shape)} are not (M, K) and (N, K)")
    if kernel_activation("matmul_act", activation)[1] and weight.shape[0] % 2:
        raise ValueError(f"matmul_act: gated activation {activation!r} needs an even number of weight rows")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"matmul_act: x has dtype {x.dtype}; float16, bfloat16 or float32 only")


def _split_partials(x, weight, activation, splits, use_tma):
    """x @ weight^T as ``splits`` fp32 partial sums over slices of K, (splits, M, N) (MODE 2)."""
    part = torch.empty(splits, x.shape[0], weight.shape[0], device=x.device, dtype=torch.float32)
    _launch(x, weight, None, activation, 2, part, part, None, None, False, False, use_tma, splits)
    return part


def _n_out(x, weight, activation):
    """Validates the arguments; the output width (N, or N / 2 for a gated activation)."""
    _check(x, weight, activation)
    gated = kernel_activation("matmul_act", activation)[1]
    return weight.shape[0] // 2 if gated else weight.shape[0]


def _k_slices(x, n_out, splits):
    """The K slices to run: ``splits`` (a positive int), or split_k's rule when None."""
    if splits is None:
        return _auto_splits(x, n_out)
    if isinstance(splits, bool) or not isinstance(splits, int) or splits < 1:
        raise ValueError(f"matmul_act: splits must be None or a positive int, got {splits!r}")
    return splits


def matmul_act_forward(x, weight, bias, activation, *, store_preact=True, use_tma=None, splits=None):
    """(y, preact or None) = act(x @ weight^T + bias) for x (M, K), weight (N, K), bias (N,).

    Gated activations give y (M, N / 2). preact (M, N) is written only when ``store_preact``.
    ``use_tma`` None: on sm_90+ when the operands allow it. ``splits`` K slices (split-K), None:
    ``split_k``'s rule.
    """
    n_out = _n_out(x, weight, activation)
    M, N = x.shape[0], weight.shape[0]
    splits = _k_slices(x, n_out, splits)
    if splits > 1 and M and n_out:
        part = _split_partials(x, weight, activation, splits, use_tma)
        return bias_act_forward(part, bias, activation, store_preact, out_dtype=x.dtype)
    y = torch.empty(M, n_out, device=x.device, dtype=x.dtype)
    preact = torch.empty(M, N, device=x.device, dtype=x.dtype) if store_preact else None
    if M and n_out:
        _launch(x, weight, bias, activation, 0, y, preact if preact is not None else y, None, None, False,
                store_preact, use_tma)
    return y, preact


def matmul_act_dh(grad_y, x, weight, bias, activation, *, store_y=False, use_tma=None, splits=None):
    """Recompute h = x @ weight^T + bias in a GEMM and return (dh, db, y) from its epilogue.

    dh (M, N) = dy * act'(h) in x's dtype (gated: [dgate | dup]); db (N,) fp32 column sums of dh
    when bias is given, else None; y = act(h) (M, N_OUT) when ``store_y``, else None. ``splits``
    as matmul_act_forward's.
    """
    n_out = _n_out(x, weight, activation)
    M, N = x.shape[0], weight.shape[0]
    splits = _k_slices(x, n_out, splits)
    if splits > 1 and M and n_out:
        part = _split_partials(x, weight, activation, splits, use_tma)
        return bias_act_backward(grad_y, part, bias, activation, add_bias=True, bias_grad=bias is not None,
                                 store_y=store_y, out_dtype=x.dtype)
    dev = x.device
    dh = torch.empty(M, N, device=dev, dtype=x.dtype)
    y = torch.empty(M, n_out, device=dev, dtype=x.dtype) if store_y else None
    if not (M and n_out):
        return dh.zero_(), (torch.zeros(N, device=dev) if bias is not None else None), y
    block_m = _INTERPRETER_CONFIG["BLOCK_M"] if interpreted() else DH_BLOCK_M
    partials = torch.empty(triton.cdiv(M, block_m), N, device=dev, dtype=torch.float32) if bias is not None else None
    _launch(x, weight, bias, activation, 1, y if y is not None else dh, dh, grad_y, partials, store_y, False, use_tma)
    return dh, (partials.sum(0) if partials is not None else None), y

"""Layer norm and RMS norm over the last dim of (M, N) rows, forward and backward, with the
pre-norm block's fused residual add, fp32 math for fp16/bf16/fp32 tensors. One set of kernels
serves both norms: IS_RMS (a constexpr) drops the centering, the mean and the bias, so the RMS
variant compiles without them (as csrc/norm.cuh's RMS template parameter does).

Forward, h = x (+ residual), mean = sum(h) / N (0 for RMS norm):
    rstd = 1 / sqrt(sum((h - mean)^2) / N + eps)
    y = (h - mean) * rstd * w + b,   residual_out = h (in the residual's dtype)
Backward, xhat = (h - mean) * rstd and g = dy * w:
    dx = rstd * (g - sum(g) / N - xhat * sum(g * xhat) / N) (+ d_residual_out)
    (RMS norm: without the sum(g) / N term)
    dw = sum_rows(dy * xhat),  db = sum_rows(dy)

Memory traffic (elements): forward reads M*N (+ M*N residual) + 2N, writes M*N (+ M*N
residual_out) + 2M; backward reads 2*M*N (+ M*N d_residual_out) + N + 2M, writes M*N, plus
G*N fp32 partials per weight written and read once (G = persistent programs, a few per SM).
(RMS norm: no bias, no mean: N and M fewer.) A row longer than one block (N > MAX_FUSED_*) is
read twice: chunked mean/M2 (Chan's merge), then normalize; backward: a stats kernel reduces
each row to two floats, then a (G x column chunks) grid writes dx.

dw/db are deterministic: each persistent program sums its own rows (of its column chunk) in a
fixed order in registers and stores them once into its row of a (G, N) fp32 buffer, then
_rows.sum_partials adds the G rows in a fixed order. No atomics, no read-modify-write.
Rows may have any row stride (unit column stride); offsets are int64.
"""

import torch
import triton
import triton.language as tl
from fusedformer.kernels import _rows


@triton.jit
def _center(h, mean, mask, IS_RMS: tl.constexpr):
    """h - mean (0 where masked); h itself for RMS norm, whose masked lanes load as 0."""
    if IS_RMS:
        return h
    else:
        return tl.where(mask, h - mean[:, None], 0.0)


@triton.jit
def _store_y(Y, rows, sy, cols, cmask, mask, xhat, W, B, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """Y[rows, cols] = xhat * w + b."""
    y = _rows.scale_by_weight(xhat, W, cols, cmask, HAS_W)
    if HAS_B:
        y = y + _rows.load_vec(B, cols, cmask)[None, :]
    _rows.store_tile(Y, rows, sy, cols, y, mask)


@triton.jit
def _norm_fwd_kernel(
    X,  # input, (M, N), row stride sx
    R,  # residual, (M, N), row stride sr (read only when HAS_RES)
    W,  # weight, (N,) (read only when HAS_W)
    B,  # bias, (N,) (read only when HAS_B; never for RMS norm)
    Y,  # output, (M, N), row stride sy, x's dtype
    RES_OUT,  # h = x + residual, (M, N), row stride so, residual's dtype (written when HAS_RES)
    MEAN,  # (M,) fp32 (written unless IS_RMS)
    RSTD,  # (M,) fp32
    M, N,
    sx, sr, sy, so,  # row strides
    eps,
    IS_RMS: tl.constexpr, HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK_M: tl.constexpr,  # rows per tile (1 when not SINGLE)
    BLOCK_N: tl.constexpr,  # the whole row when SINGLE, else the chunk length
    SINGLE: tl.constexpr,
):
    n_tiles = tl.cdiv(M, BLOCK_M)
    for tile in range(tl.program_id(0).to(tl.int64), n_tiles, tl.num_programs(0)):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < M
        mean = tl.zeros([BLOCK_M], tl.float32)  # stays 0 for RMS norm
        if SINGLE:
            cols = tl.arange(0, BLOCK_N)
            cmask = cols < N
            mask = rmask[:, None] & cmask[None, :]
            h = _rows.load_h(X, R, rows, sx, sr, cols, mask, HAS_RES)
            if HAS_RES:
                _rows.store_tile(RES_OUT, rows, so, cols, h, mask)
            if not IS_RMS:
                mean = tl.sum(h, axis=1) / N
            d = _center(h, mean, mask, IS_RMS)
            rstd = tl.rsqrt(tl.sum(d * d, axis=1) / N + eps)
            _store_y(Y, rows, sy, cols, cmask, mask, d * rstd[:, None], W, B, HAS_W, HAS_B)
        else:
            # pass 1: m2 = sum((h - mean)^2), per-chunk mean and M2 merged with Chan's formula
            # (stable for large N); RMS norm: the plain sum of squares
            m2 = tl.zeros([BLOCK_M], tl.float32)
            n_prev = 0.0
            for start in range(0, N, BLOCK_N):
                cols = start + tl.arange(0, BLOCK_N)
                mask = rmask[:, None] & (cols < N)[None, :]
                h = _rows.load_h(X, R, rows, sx, sr, cols, mask, HAS_RES)
                if IS_RMS:
                    m2 += tl.sum(h * h, axis=1)
                else:
                    n_chunk = tl.sum((cols < N).to(tl.float32), axis=0)
                    mean_c = tl.sum(h, axis=1) / n_chunk
                    d = tl.where(mask, h - mean_c[:, None], 0.0)
                    delta = mean_c - mean
                    n_tot = n_prev + n_chunk
                    mean = mean + delta * (n_chunk / n_tot)
                    m2 = m2 + tl.sum(d * d, axis=1) + delta * delta * (n_prev * n_chunk / n_tot)
                    n_prev = n_tot
            rstd = tl.rsqrt(m2 / N + eps)
            # pass 2: recompute h in fp32 (not from the rounded residual_out), normalize, write
            for start in range(0, N, BLOCK_N):
                cols = start + tl.arange(0, BLOCK_N)
                cmask = cols < N
                mask = rmask[:, None] & cmask[None, :]
                h = _rows.load_h(X, R, rows, sx, sr, cols, mask, HAS_RES)
                if HAS_RES:
                    _rows.store_tile(RES_OUT, rows, so, cols, h, mask)
                xhat = _center(h, mean, mask, IS_RMS) * rstd[:, None]
                _store_y(Y, rows, sy, cols, cmask, mask, xhat, W, B, HAS_W, HAS_B)
        if not IS_RMS:
            tl.store(MEAN + rows, mean, mask=rmask)
        tl.store(RSTD + rows, rstd, mask=rmask)


@triton.jit
def _load_xhat(X, MEAN, RSTD, rows, sx, cols, rmask, mask, IS_RMS: tl.constexpr):
    """(xhat, rstd) of a tile of the forward's h: xhat fp32, 0 where masked."""
    rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
    if IS_RMS:
        mean = rstd  # unused: RMS norm does not center
    else:
        mean = tl.load(MEAN + rows, mask=rmask, other=0.0)
    xhat = _center(_rows.load_tile(X, rows, sx, cols, mask), mean, mask, IS_RMS) * rstd[:, None]
    return xhat, rstd


@triton.jit
def _norm_bwd_stats_kernel(
    DY, X, W, MEAN, RSTD,  # as _norm_bwd_kernel
    C1,  # (M,) fp32: sum(g * xhat) / N per row
    C2,  # (M,) fp32: sum(g) / N per row (written unless IS_RMS)
    M, N,
    sdy, sx,  # row strides
    IS_RMS: tl.constexpr, HAS_W: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The per-row reductions of dx for rows longer than one tile, walked in BLOCK_N chunks."""
    for tile in range(tl.program_id(0).to(tl.int64), tl.cdiv(M, BLOCK_M), tl.num_programs(0)):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < M
        c1 = tl.zeros([BLOCK_M], tl.float32)
        c2 = tl.zeros([BLOCK_M], tl.float32)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            cmask = cols < N
            mask = rmask[:, None] & cmask[None, :]
            xhat, _ = _load_xhat(X, MEAN, RSTD, rows, sx, cols, rmask, mask, IS_RMS)
            g = _rows.scale_by_weight(_rows.load_tile(DY, rows, sdy, cols, mask), W, cols, cmask, HAS_W)
            c1 += tl.sum(g * xhat, axis=1)
            if not IS_RMS:
                c2 += tl.sum(g, axis=1)
        tl.store(C1 + rows, c1 / N, mask=rmask)
        if not IS_RMS:
            tl.store(C2 + rows, c2 / N, mask=rmask)


@triton.jit
def _norm_bwd_kernel(
    DY,  # upstream gradient, (M, N), row stride sdy
    X,  # the normalized input h, (M, N), row stride sx
    W,  # weight, (N,) (read only when HAS_W)
    MEAN,  # (M,) fp32 (read unless IS_RMS)
    RSTD,  # (M,) fp32
    C1, C2,  # (M,) fp32 row reductions from _norm_bwd_stats_kernel (read only when not SINGLE)
    DRES,  # gradient of residual_out, (M, N), row stride sdr (read only when HAS_DRES)
    DX,  # input gradient, (M, N), row stride sdx
    DW_PART,  # (G, N) fp32 partial sums of dy * xhat, row = program (written when HAS_W)
    DB_PART,  # (G, N) fp32 partial sums of dy (written when HAS_B)
    M, N,
    sdy, sx, sdr, sdx,  # row strides
    IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_DRES: tl.constexpr,
    BLOCK_M: tl.constexpr,  # rows per tile (1 when not SINGLE)
    BLOCK_N: tl.constexpr,  # the whole row when SINGLE, else the column chunk of program_id(1)
    SINGLE: tl.constexpr,  # the tile holds whole rows: reduce them here, not in the stats kernel
):
    """Grid (G, column chunks): program (g, j) owns columns [j * BLOCK_N, (j + 1) * BLOCK_N) of
    every G-th row tile, and sums dw/db over them in registers: one store of its partial row."""
    pid = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    if HAS_W:
        w = _rows.load_vec(W, cols, cmask)
    dw_acc = tl.zeros([BLOCK_N], tl.float32)
    db_acc = tl.zeros([BLOCK_N], tl.float32)
    for tile in range(pid.to(tl.int64), tl.cdiv(M, BLOCK_M), tl.num_programs(0)):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < M
        mask = rmask[:, None] & cmask[None, :]
        dy = _rows.load_tile(DY, rows, sdy, cols, mask)
        xhat, rstd = _load_xhat(X, MEAN, RSTD, rows, sx, cols, rmask, mask, IS_RMS)
        if HAS_W:
            g = dy * w[None, :]
        else:
            g = dy
        if SINGLE:
            c1 = tl.sum(g * xhat, axis=1) / N
            if not IS_RMS:
                c2 = tl.sum(g, axis=1) / N
        else:
            c1 = tl.load(C1 + rows, mask=rmask, other=0.0)
            if not IS_RMS:
                c2 = tl.load(C2 + rows, mask=rmask, other=0.0)
        if not IS_RMS:
            g = g - c2[:, None]
        dx = (g - xhat * c1[:, None]) * rstd[:, None]
        if HAS_DRES:
            dx += _rows.load_tile(DRES, rows, sdr, cols, mask)
        _rows.store_tile(DX, rows, sdx, cols, dx, mask)
        if HAS_W:
            dw_acc += tl.sum(dy * xhat, axis=0)
        if HAS_B:
            db_acc += tl.sum(dy, axis=0)
    part = pid.to(tl.int64) * N
    if HAS_W:
        tl.store(DW_PART + part + cols, dw_acc, mask=cmask)
    if HAS_B:
        tl.store(DB_PART + part + cols, db_acc, mask=cmask)


# --------------------------------------------------------------------------------------------
# launchers: mean=None selects RMS norm (no centering, no bias)
# --------------------------------------------------------------------------------------------


def norm_fwd(x, weight, bias, eps, residual, y, residual_out, mean, rstd):
    """Fill y (M, N), rstd (M,) fp32, mean (M,) fp32 unless it is None (RMS norm; bias must then
    be None), and residual_out (M, N) when residual is given.

    x, residual, y, residual_out: 2-D with unit column stride, any row stride; weight, bias:
    (N,) or None. Returns (y, residual_out, mean, rstd)."""
    is_rms = mean is None
    if is_rms and bias is not None:
        raise ValueError("norm_fwd: bias must be None for RMS norm (mean=None)")
    M, N = x.shape
    block_m, block_n, single, warps = _rows.row_config(M, N, x.element_size())
    has_res = residual is not None
    grid = (_rows.num_programs(triton.cdiv(M, block_m)),)
    _norm_fwd_kernel[grid](
        x, residual if has_res else x, weight if weight is not None else x, bias if bias is not None else x,
        y, residual_out if has_res else y, rstd if is_rms else mean, rstd,
        M, N, x.stride(0), residual.stride(0) if has_res else 0, y.stride(0),
        residual_out.stride(0) if has_res else 0, eps,
        IS_RMS=is_rms, HAS_RES=has_res, HAS_W=weight is not None, HAS_B=bias is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, SINGLE=single, num_warps=warps)
    return y, residual_out, mean, rstd


def norm_bwd(grad_y, x, weight, mean, rstd, grad_residual_out, dx, dweight, dbias):
    """Fill dx (M, N), and dweight / dbias (N,): dweight is given exactly when weight is,
    dbias when the forward had a bias (None skips that reduction). mean None: RMS norm.

    grad_y, x, grad_residual_out, dx: 2-D with unit column stride, any row stride (grad_y may
    have row stride 0). Returns (dx, dweight, dbias)."""
    is_rms = mean is None
    M, N = x.shape
    block_m, block_n, single, warps = _rows.row_config(M, N, x.element_size(), backward=True)
    G = _rows.persistent_programs(triton.cdiv(M, block_m), M, x.element_size(), x.device)
    has_w, has_b, has_dres = weight is not None, dbias is not None, grad_residual_out is not None
    mean = rstd if is_rms else mean  # an unread placeholder for RMS norm
    w_arg = weight if has_w else x
    c1 = c2 = rstd  # unread when a tile holds whole rows
    if not single:
        c1 = torch.empty(M, dtype=torch.float32, device=x.device)
        c2 = c1 if is_rms else torch.empty(M, dtype=torch.float32, device=x.device)
        _norm_bwd_stats_kernel[(_rows.num_programs(M),)](
            grad_y, x, w_arg, mean, rstd, c1, c2, M, N, grad_y.stride(0), x.stride(0),
            IS_RMS=is_rms, HAS_W=has_w, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)
    dw_part = torch.empty((G, N), dtype=torch.float32, device=x.device) if has_w else rstd
    db_part = torch.empty((G, N), dtype=torch.float32, device=x.device) if has_b else rstd
    _norm_bwd_kernel[(G, triton.cdiv(N, block_n))](
        grad_y, x, w_arg, mean, rstd, c1, c2, grad_residual_out if has_dres else x, dx, dw_part, db_part,
        M, N, grad_y.stride(0), x.stride(0), grad_residual_out.stride(0) if has_dres else 0, dx.stride(0),
        IS_RMS=is_rms, HAS_W=has_w, HAS_B=has_b, HAS_DRES=has_dres,
        BLOCK_M=block_m, BLOCK_N=block_n, SINGLE=single, num_warps=warps)
    if has_w:
        _rows.sum_partials(dw_part, dweight)
    if has_b:
        _rows.sum_partials(db_part, dbias)
    return dx, dweight, dbias

"""RMS norm over the last dim of (M, N) rows, forward and backward, with the pre-norm block's
fused residual add, fp32 math for fp16/bf16/fp32 tensors.

Forward, h = x (+ residual):
    rstd = 1 / sqrt(sum(h^2) / N + eps),  y = h * rstd * w,  residual_out = h (residual's dtype)
Backward, xhat = h * rstd and g = dy * w:
    dx = rstd * (g - xhat * sum(g * xhat) / N) (+ d_residual_out),  dw = sum_rows(dy * xhat)

Memory traffic (elements): forward reads M*N (+ M*N residual) + N, writes M*N (+ M*N
residual_out) + M; backward reads 2*M*N (+ M*N d_residual_out) + N + M, writes M*N, plus G*N
fp32 partials written and read once (G = persistent programs, a few per SM). A row longer than
one block is read twice (sum of squares, then normalize; backward: reduction, then dx).

dw is deterministic: per-program partial rows summed in a fixed order (_rows.sum_partials), no
atomics. Rows may have any row stride (unit column stride); offsets are int64.
"""

import torch
import triton
import triton.language as tl
from fusedformer.kernels import _rows


@triton.jit
def _rms_norm_fwd_kernel(
    X,  # input, (M, N), row stride sx
    R,  # residual, (M, N), row stride sr (read only when HAS_RES)
    W,  # weight, (N,) (read only when HAS_W)
    Y,  # output, (M, N), row stride sy, x's dtype
    RES_OUT,  # h = x + residual, (M, N), row stride so, residual's dtype (written when HAS_RES)
    RSTD,  # (M,) fp32
    M, N,
    sx, sr, sy, so,  # row strides
    eps,
    HAS_RES: tl.constexpr, HAS_W: tl.constexpr,
    BLOCK_M: tl.constexpr,  # rows per tile (1 when not SINGLE)
    BLOCK_N: tl.constexpr,  # the whole row when SINGLE, else the chunk length
    SINGLE: tl.constexpr,
):
    n_tiles = tl.cdiv(M, BLOCK_M)
    for tile in range(tl.program_id(0).to(tl.int64), n_tiles, tl.num_programs(0)):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < M
        if SINGLE:
            cols = tl.arange(0, BLOCK_N)
            cmask = cols < N
            mask = rmask[:, None] & cmask[None, :]
            h = _rows.load_h(X, R, rows, sx, sr, cols, mask, HAS_RES)
            if HAS_RES:
                _rows.store_tile(RES_OUT, rows, so, cols, h, mask)
            rstd = tl.rsqrt(tl.sum(h * h, axis=1) / N + eps)
            y = _rows.scale_by_weight(h * rstd[:, None], W, cols, cmask, HAS_W)
            _rows.store_tile(Y, rows, sy, cols, y, mask)
        else:
            ss = tl.zeros([BLOCK_M], tl.float32)
            for start in range(0, N, BLOCK_N):
                cols = start + tl.arange(0, BLOCK_N)
                mask = rmask[:, None] & (cols < N)[None, :]
                h = _rows.load_h(X, R, rows, sx, sr, cols, mask, HAS_RES)
                ss += tl.sum(h * h, axis=1)
            rstd = tl.rsqrt(ss / N + eps)
            # recompute h in fp32 (not from the rounded residual_out), normalize, write
            for start in range(0, N, BLOCK_N):
                cols = start + tl.arange(0, BLOCK_N)
                cmask = cols < N
                mask = rmask[:, None] & cmask[None, :]
                h = _rows.load_h(X, R, rows, sx, sr, cols, mask, HAS_RES)
                if HAS_RES:
                    _rows.store_tile(RES_OUT, rows, so, cols, h, mask)
                y = _rows.scale_by_weight(h * rstd[:, None], W, cols, cmask, HAS_W)
                _rows.store_tile(Y, rows, sy, cols, y, mask)
        tl.store(RSTD + rows, rstd, mask=rmask)


@triton.jit
def _rms_norm_bwd_kernel(
    DY,  # upstream gradient, (M, N), row stride sdy
    X,  # the normalized input h, (M, N), row stride sx
    W,  # weight, (N,) (read only when HAS_W)
    RSTD,  # (M,) fp32
    DRES,  # gradient of residual_out, (M, N), row stride sdr (read only when HAS_DRES)
    DX,  # input gradient, (M, N), row stride sdx
    DW_PART,  # (G, N) fp32 partial sums of dy * xhat, row = program (written when HAS_W)
    M, N,
    sdy, sx, sdr, sdx,  # row strides
    HAS_W: tl.constexpr, HAS_DRES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE: tl.constexpr,
):
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(M, BLOCK_M)
    part = pid.to(tl.int64) * N
    if SINGLE:
        cols = tl.arange(0, BLOCK_N)
        cmask = cols < N
        if HAS_W:
            w = _rows.load_vec(W, cols, cmask)
        dw_acc = tl.zeros([BLOCK_N], tl.float32)
        for tile in range(pid.to(tl.int64), n_tiles, tl.num_programs(0)):
            rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
            rmask = rows < M
            mask = rmask[:, None] & cmask[None, :]
            dy = _rows.load_tile(DY, rows, sdy, cols, mask)
            x = _rows.load_tile(X, rows, sx, cols, mask)
            rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
            xhat = x * rstd[:, None]
            if HAS_W:
                g = dy * w[None, :]
            else:
                g = dy
            c1 = tl.sum(g * xhat, axis=1) / N
            dx = (g - xhat * c1[:, None]) * rstd[:, None]
            if HAS_DRES:
                dx += _rows.load_tile(DRES, rows, sdr, cols, mask)
            _rows.store_tile(DX, rows, sdx, cols, dx, mask)
            if HAS_W:
                dw_acc += tl.sum(dy * xhat, axis=0)
        if HAS_W:
            tl.store(DW_PART + part + cols, dw_acc, mask=cmask)
    else:
        # one row per tile; this program's partial row (zeroed by the launcher) is touched by
        # this program only, so load-add-store needs no atomics
        for tile in range(pid.to(tl.int64), n_tiles, tl.num_programs(0)):
            rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
            rmask = rows < M
            rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
            c1 = tl.zeros([BLOCK_M], tl.float32)
            for start in range(0, N, BLOCK_N):
                cols = start + tl.arange(0, BLOCK_N)
                cmask = cols < N
                mask = rmask[:, None] & cmask[None, :]
                dy = _rows.load_tile(DY, rows, sdy, cols, mask)
                x = _rows.load_tile(X, rows, sx, cols, mask)
                g = _rows.scale_by_weight(dy, W, cols, cmask, HAS_W)
                c1 += tl.sum(g * x * rstd[:, None], axis=1)
            c1 = c1 / N
            for start in range(0, N, BLOCK_N):
                cols = start + tl.arange(0, BLOCK_N)
                cmask = cols < N
                mask = rmask[:, None] & cmask[None, :]
                dy = _rows.load_tile(DY, rows, sdy, cols, mask)
                x = _rows.load_tile(X, rows, sx, cols, mask)
                xhat = x * rstd[:, None]
                g = _rows.scale_by_weight(dy, W, cols, cmask, HAS_W)
                dx = (g - xhat * c1[:, None]) * rstd[:, None]
                if HAS_DRES:
                    dx += _rows.load_tile(DRES, rows, sdr, cols, mask)
                _rows.store_tile(DX, rows, sdx, cols, dx, mask)
                if HAS_W:
                    _rows.add_to_partial(DW_PART, part, cols, cmask, tl.sum(dy * xhat, axis=0))


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------


def rms_norm_fwd(x, weight, eps, residual, y, residual_out, rstd):
    """Fill y (M, N), rstd (M,) fp32, and residual_out (M, N) when residual is given.

    x, residual, y, residual_out: 2-D with unit column stride, any row stride; weight: (N,) or
    None. Returns (y, residual_out, rstd)."""
    M, N = x.shape
    block_m, block_n, single, warps = _rows.row_config(M, N, x.element_size())
    has_res = residual is not None
    grid = (_rows.num_programs(triton.cdiv(M, block_m)),)
    _rms_norm_fwd_kernel[grid](
        x, residual if has_res else x, weight if weight is not None else x,
        y, residual_out if has_res else y, rstd,
        M, N, x.stride(0), residual.stride(0) if has_res else 0, y.stride(0),
        residual_out.stride(0) if has_res else 0, eps,
        HAS_RES=has_res, HAS_W=weight is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, SINGLE=single, num_warps=warps)
    return y, residual_out, rstd


def rms_norm_bwd(grad_y, x, weight, rstd, grad_residual_out, dx, dweight):
    """Fill dx (M, N) and dweight (N,) (given exactly when weight is). grad_y, x,
    grad_residual_out, dx: 2-D with unit column stride, any row stride. Returns (dx, dweight)."""
    M, N = x.shape
    block_m, block_n, single, warps = _rows.row_config(M, N, x.element_size(), backward=True)
    G = _rows.persistent_programs(triton.cdiv(M, block_m), M, x.element_size(), x.device)
    has_w, has_dres = weight is not None, grad_residual_out is not None
    alloc = torch.empty if single else torch.zeros  # the looped path accumulates into its rows
    dw_part = alloc((G, N), dtype=torch.float32, device=x.device) if has_w else rstd
    _rms_norm_bwd_kernel[(G,)](
        grad_y, x, weight if has_w else x, rstd, grad_residual_out if has_dres else x, dx, dw_part,
        M, N, grad_y.stride(0), x.stride(0), grad_residual_out.stride(0) if has_dres else 0, dx.stride(0),
        HAS_W=has_w, HAS_DRES=has_dres,
        BLOCK_M=block_m, BLOCK_N=block_n, SINGLE=single, num_warps=warps)
    if has_w:
        _rows.sum_partials(dw_part, dweight)
    return dx, dweight

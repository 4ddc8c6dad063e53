"""Softmax along any dim, forward and backward, in fp32 registers for fp16/bf16/fp32 tensors.

    y  = exp(x - max(x)) / sum(exp(x - max(x)))          along the softmax dim, length N
    dx = y * (dy - sum(dy * y))

Memory traffic: forward reads M*N and writes M*N (M = numel / N rows) when a row fits in one
block; of a longer row the first MAX_FUSED_FWD elements stay in registers and only the rest is
read twice (online max and sum, then normalize and write). Backward reads
y and dy and writes dx (3*M*N); a longer row reads y and dy twice.

Layout, without a transposing copy: the softmax dim has stride s_c; every other dim is collapsed
into at most two row groups (a, b) with strides s_a, s_b, so element (a, b, c) sits at
a*s_a + b*s_b + c*s_c. Two tile shapes:
  rows kernel    [BLOCK_M rows, BLOCK_N cols], reduced along axis 1: when s_c is the unit stride
                 (softmax over the last dim), each row is one contiguous vectorized read.
  columns kernel [BLOCK_N, BLOCK_B], reduced along axis 0, for a unit-stride b (softmax over a
                 non-last dim of a contiguous tensor): each load spans BLOCK_B contiguous
                 elements of b instead of striding by s_c.
Both kernels take a grid-stride loop over their tiles, so any number of rows fits any grid.
Shape legend: M rows (n_a * n_b), N softmax length.
"""

import triton
import triton.language as tl
from fusedformer.kernels import _rows

# Columns kernel: b-lanes per tile, and how many softmax positions one tile holds on chip.
BLOCK_B = 32
COLUMN_TILE = 8192


# Math shared by the rows (AXIS=1) and columns (AXIS=0) kernels; tl.expand_dims(v, AXIS) is the
# v[:, None] / v[None, :] broadcast of the per-row (per-lane) values, so inlining costs nothing.
@triton.jit
def _softmax_tile(x, AXIS: tl.constexpr):
    """softmax of a tile that holds the whole softmax dim (masked entries -inf)."""
    e = tl.exp(x - tl.expand_dims(tl.max(x, axis=AXIS), AXIS))
    return e / tl.expand_dims(tl.sum(e, axis=AXIS), AXIS)


@triton.jit
def _online_max_sum(m, s, x, AXIS: tl.constexpr):
    """Fold chunk x into the running max m and sum s of exp(x - m): (m, s) after the chunk."""
    m_new = tl.maximum(m, tl.max(x, axis=AXIS))
    # a chunk of all -inf so far must add 0, not exp(-inf - -inf) = NaN
    m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
    s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(x - tl.expand_dims(m_safe, AXIS)), axis=AXIS)
    return m_new, s


@triton.jit
def _softmax_grad(dy, y, dot, AXIS: tl.constexpr):
    """dx = y * (dy - sum(dy * y)), with dot = sum(dy * y) per row (lane)."""
    return y * (dy - tl.expand_dims(dot, AXIS))


@triton.jit
def _normalized(x, m, s, AXIS: tl.constexpr):
    """exp(x - m) / s, with m and s the per-row (per-lane) max and sum of exp(x - m)."""
    return tl.exp(x - tl.expand_dims(m, AXIS)) / tl.expand_dims(s, AXIS)


# Tiles: a rows tile holds BLOCK_M rows (a, b) across axis 0 and walks the softmax dim along axis 1;
# a columns tile holds one a and BLOCK_B lanes of b across axis 1 and walks it along axis 0. Past
# the tile's decomposition both run the same forward (backward) body with AXIS the walked axis.
@triton.jit
def _row_tile(tile, n_rows, n_b, BLOCK_M: tl.constexpr):
    """Row group indices (a, b) of the rows of ``tile``, and which rows exist (< n_rows)."""
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    return rows // n_b, rows % n_b, rows < n_rows


@triton.jit
def _column_tile(tile, n_bt, n_b, BLOCK_B: tl.constexpr):
    """a of ``tile``, its BLOCK_B lanes b, and which lanes exist (< n_b); n_bt tiles per a."""
    b = (tile % n_bt) * BLOCK_B + tl.arange(0, BLOCK_B)
    return tile // n_bt, b, b < n_b


@triton.jit
def _chunk(start, N, lanes, BLOCK_N: tl.constexpr, AXIS: tl.constexpr):
    """Softmax positions start .. start + BLOCK_N - 1 laid along AXIS (int64, so c * stride cannot
    overflow), and the mask of those < N on the existing lanes."""
    c = tl.expand_dims(start + tl.arange(0, BLOCK_N).to(tl.int64), 1 - AXIS)
    return c, (c < N) & tl.expand_dims(lanes, AXIS)


@triton.jit
def _load_x(x_ptr, c, sxc, mask):
    """x at softmax positions c in fp32, -inf where masked (so it adds nothing to max and sum)."""
    return tl.load(x_ptr + c * sxc, mask=mask, other=-float("inf")).to(tl.float32)


@triton.jit
def _load_dy_y(dy_ptr, y_ptr, c, sdc, syc, mask):
    """dy and y at softmax positions c in fp32, 0 where masked (so they add nothing to the dot)."""
    dy = tl.load(dy_ptr + c * sdc, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + c * syc, mask=mask, other=0.0).to(tl.float32)
    return dy, y


@triton.jit
def _forward_tile(x_ptr, y_ptr, lanes, N, sxc, syc, LANES: tl.constexpr, BLOCK_N: tl.constexpr,
                  SINGLE: tl.constexpr, HEAD: tl.constexpr, AXIS: tl.constexpr):
    """y = softmax(x) over the LANES rows of one tile (``lanes``: which exist), x_ptr / y_ptr each
    row's start. Not SINGLE: online max and sum, then normalize; the first HEAD positions (0: none)
    are read once and held in registers between the two passes."""
    if SINGLE:
        c, mask = _chunk(0, N, lanes, BLOCK_N, AXIS)
        y = _softmax_tile(_load_x(x_ptr, c, sxc, mask), AXIS)
        tl.store(y_ptr + c * syc, y.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        m = tl.full([LANES], -float("inf"), tl.float32)
        s = tl.zeros([LANES], tl.float32)
        if HEAD > 0:
            head_c = tl.expand_dims(tl.arange(0, HEAD).to(tl.int64), 1 - AXIS)
            head_mask = tl.expand_dims(lanes, AXIS)  # N > HEAD on this path
            head = _load_x(x_ptr, head_c, sxc, head_mask)
            m, s = _online_max_sum(m, s, head, AXIS)
        for start in range(HEAD, N, BLOCK_N):
            c, mask = _chunk(start, N, lanes, BLOCK_N, AXIS)
            m, s = _online_max_sum(m, s, _load_x(x_ptr, c, sxc, mask), AXIS)
        # an all -inf row keeps m = -inf here and gives NaN, as torch does
        if HEAD > 0:
            y_head = _normalized(head, m, s, AXIS)
            tl.store(y_ptr + head_c * syc, y_head.to(y_ptr.dtype.element_ty), mask=head_mask)
        for start in range(HEAD, N, BLOCK_N):
            c, mask = _chunk(start, N, lanes, BLOCK_N, AXIS)
            y = _normalized(_load_x(x_ptr, c, sxc, mask), m, s, AXIS)
            tl.store(y_ptr + c * syc, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_tile(dy_ptr, y_ptr, dx_ptr, lanes, N, sdc, syc, sxc, LANES: tl.constexpr, BLOCK_N: tl.constexpr,
                   SINGLE: tl.constexpr, AXIS: tl.constexpr):
    """dx = y * (dy - sum(dy * y)) over the LANES rows of one tile, as ``_forward_tile``; not
    SINGLE: the dot first, then a second pass writes dx."""
    if SINGLE:
        c, mask = _chunk(0, N, lanes, BLOCK_N, AXIS)
        dy, y = _load_dy_y(dy_ptr, y_ptr, c, sdc, syc, mask)
        dot = tl.sum(dy * y, axis=AXIS)
        tl.store(dx_ptr + c * sxc, _softmax_grad(dy, y, dot, AXIS).to(dx_ptr.dtype.element_ty), mask=mask)
    else:
        dot = tl.zeros([LANES], tl.float32)
        for start in range(0, N, BLOCK_N):
            c, mask = _chunk(start, N, lanes, BLOCK_N, AXIS)
            dy, y = _load_dy_y(dy_ptr, y_ptr, c, sdc, syc, mask)
            dot += tl.sum(dy * y, axis=AXIS)
        for start in range(0, N, BLOCK_N):
            c, mask = _chunk(start, N, lanes, BLOCK_N, AXIS)
            dy, y = _load_dy_y(dy_ptr, y_ptr, c, sdc, syc, mask)
            tl.store(dx_ptr + c * sxc, _softmax_grad(dy, y, dot, AXIS).to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _softmax_fwd_rows_kernel(
    X,  # input, element (a, b, c) at a*sxa + b*sxb + c*sxc
    Y,  # output, element (a, b, c) at a*sya + b*syb + c*syc
    n_rows,  # M = n_a * n_b
    n_b,  # size of row group b (row r is (r // n_b, r % n_b))
    N,  # softmax length
    sxa, sxb, sxc,  # strides of X
    sya, syb, syc,  # strides of Y
    BLOCK_M: tl.constexpr,  # rows per tile
    BLOCK_N: tl.constexpr,  # columns per tile (the whole row when SINGLE)
    SINGLE: tl.constexpr,  # one read per row; else the online two-pass loop
    HEAD: tl.constexpr,  # not SINGLE: the first HEAD columns, held in registers between the passes
):
    for tile in range(tl.program_id(0).to(tl.int64), tl.cdiv(n_rows, BLOCK_M), tl.num_programs(0)):
        a, b, rows = _row_tile(tile, n_rows, n_b, BLOCK_M)
        _forward_tile(X + (a * sxa + b * sxb)[:, None], Y + (a * sya + b * syb)[:, None], rows, N, sxc, syc,
                      BLOCK_M, BLOCK_N, SINGLE, HEAD, 1)


@triton.jit
def _softmax_fwd_cols_kernel(
    X,  # input, element (a, b, c) at a*sxa + b*sxb + c*sxc; sxb is the unit stride
    Y,  # output, element (a, b, c) at a*sya + b*syb + c*syc
    n_a,  # size of row group a
    n_b,  # size of row group b (the lanes of a tile)
    N,  # softmax length
    sxa, sxb, sxc,  # strides of X
    sya, syb, syc,  # strides of Y
    BLOCK_N: tl.constexpr,  # softmax positions per tile (all N when SINGLE)
    BLOCK_B: tl.constexpr,  # b lanes per tile
    SINGLE: tl.constexpr,
):
    n_bt = tl.cdiv(n_b, BLOCK_B)
    for tile in range(tl.program_id(0).to(tl.int64), n_a * n_bt, tl.num_programs(0)):
        a, b, lanes = _column_tile(tile, n_bt, n_b, BLOCK_B)
        _forward_tile(X + a * sxa + (b * sxb)[None, :], Y + a * sya + (b * syb)[None, :], lanes, N, sxc, syc,
                      BLOCK_B, BLOCK_N, SINGLE, 0, 0)


@triton.jit
def _softmax_bwd_rows_kernel(
    DY,  # upstream gradient, element (a, b, c) at a*sda + b*sdb + c*sdc
    Y,  # forward output, strides sya, syb, syc
    DX,  # input gradient, strides sxa, sxb, sxc
    n_rows, n_b, N,  # as the forward rows kernel
    sda, sdb, sdc,
    sya, syb, syc,
    sxa, sxb, sxc,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SINGLE: tl.constexpr,
):
    for tile in range(tl.program_id(0).to(tl.int64), tl.cdiv(n_rows, BLOCK_M), tl.num_programs(0)):
        a, b, rows = _row_tile(tile, n_rows, n_b, BLOCK_M)
        _backward_tile(DY + (a * sda + b * sdb)[:, None], Y + (a * sya + b * syb)[:, None],
                       DX + (a * sxa + b * sxb)[:, None], rows, N, sdc, syc, sxc, BLOCK_M, BLOCK_N, SINGLE, 1)


@triton.jit
def _softmax_bwd_cols_kernel(
    DY,  # upstream gradient, strides sda, sdb, sdc
    Y,  # forward output, strides sya, syb, syc
    DX,  # input gradient, strides sxa, sxb, sxc
    n_a, n_b, N,  # as the forward columns kernel
    sda, sdb, sdc,
    sya, syb, syc,
    sxa, sxb, sxc,
    BLOCK_N: tl.constexpr,
    BLOCK_B: tl.constexpr,
    SINGLE: tl.constexpr,
):
    n_bt = tl.cdiv(n_b, BLOCK_B)
    for tile in range(tl.program_id(0).to(tl.int64), n_a * n_bt, tl.num_programs(0)):
        a, b, lanes = _column_tile(tile, n_bt, n_b, BLOCK_B)
        _backward_tile(DY + a * sda + (b * sdb)[None, :], Y + a * sya + (b * syb)[None, :],
                       DX + a * sxa + (b * sxb)[None, :], lanes, N, sdc, syc, sxc, BLOCK_B, BLOCK_N, SINGLE, 0)


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------


def collapse(shape, dim, *tensors):
    """Describe every tensor (all of ``shape``) as (n_a, n_b, N) with per-tensor strides
    ((s_a, s_b, s_c), ...): the dims other than ``dim`` merge where every tensor allows it.
    Returns (n_a, n_b, N, strides) or None when more than two row groups remain. ``dim`` may be
    negative, as torch's; every tensor must have ``shape`` (the kernels index them all by it)."""
    if not -len(shape) <= dim < len(shape):
        raise ValueError(f"softmax: dim {dim} is out of range for a {len(shape)}-D tensor")
    dim %= len(shape)
    for t in tensors:
        if t.shape != shape:
            raise ValueError(f"softmax: every tensor must have shape {tuple(shape)}, got {tuple(t.shape)}")
    strides = [t.stride() for t in tensors]
    groups = []  # [size, [stride per tensor]]
    for d, size in enumerate(shape):
        if d == dim or size == 1:
            continue
        st = [s[d] for s in strides]
        if groups and all(prev == size * cur for prev, cur in zip(groups[-1][1], st)) and \
                _adjacent(shape, dim, groups[-1][2], d):
            groups[-1][0] *= size
            groups[-1][1] = st
            groups[-1][2] = d
        else:
            groups.append([size, st, d])
    if len(groups) > 2:
        return None
    while len(groups) < 2:
        groups.insert(0, [1, [0] * len(tensors), -1])
    (n_a, sa, _), (n_b, sb, _) = groups
    return n_a, n_b, shape[dim], [(sa[i], sb[i], s[dim]) for i, s in enumerate(strides)]


def _adjacent(shape, dim, prev, d):
    """Dims prev < d merge only if nothing but size-1 dims sit between them (never ``dim``)."""
    return all(shape[k] == 1 and k != dim for k in range(prev + 1, d))


def _use_columns(n_b, s_b, s_c):
    # the columns tile pays off when b, not the softmax dim, is the contiguous one
    return s_c != 1 and s_b == 1 and n_b > 1


def _columns_config(n_b, N):
    block_b = min(BLOCK_B, _rows.next_pow2(n_b))
    block_n = _rows.next_pow2(N)
    single = block_n * block_b <= COLUMN_TILE
    if not single:
        block_n = max(1, COLUMN_TILE // block_b)
    num_warps = max(1, min(8, _rows.next_pow2(block_n * block_b // 512)))
    return block_b, block_n, single, num_warps


def held_head(elem_bytes):
    """(HEAD, num_warps) of a row longer than one tile: the columns it keeps in registers are the
    longest row one tile holds, launched with that tile's warps."""
    return _rows.MAX_FUSED_FWD, _rows.row_config(1, _rows.MAX_FUSED_FWD, elem_bytes)[3]


def forward_rows_config(n_rows, N, elem_bytes):
    """_rows.row_config's (BLOCK_M, BLOCK_N, SINGLE, num_warps) plus HEAD (BLOCK_N when SINGLE)."""
    block_m, block_n, single, warps = _rows.row_config(n_rows, N, elem_bytes)
    if single:
        return block_m, block_n, single, warps, block_n
    head, head_warps = held_head(elem_bytes)
    return block_m, block_n, single, head_warps, head


def softmax_fwd(x, y, dim):
    """y[:] = softmax(x, dim). x: fp16/bf16/fp32, read through its strides when they collapse to
    at most two row groups (see ``collapse``), else from a contiguous copy; y: contiguous, or any
    layout of x's shape and dtype that collapses with x. Returns y."""
    desc = collapse(x.shape, dim, x, y)
    if desc is None:  # one layout check per call: the caller need not make its own
        x = x.contiguous()
        desc = collapse(x.shape, dim, x, y)
    if desc is None:
        raise ValueError("softmax_fwd: y's layout has more than two row groups; pass a contiguous y")
    n_a, n_b, N, ((sxa, sxb, sxc), (sya, syb, syc)) = desc
    if _use_columns(n_b, sxb, sxc):
        block_b, block_n, single, warps = _columns_config(n_b, N)
        grid = (_rows.num_programs(n_a * triton.cdiv(n_b, block_b)),)
        _softmax_fwd_cols_kernel[grid](x, y, n_a, n_b, N, sxa, sxb, sxc, sya, syb, syc,
                                       BLOCK_N=block_n, BLOCK_B=block_b, SINGLE=single, num_warps=warps)
    else:
        n_rows = n_a * n_b
        block_m, block_n, single, warps, head = forward_rows_config(n_rows, N, x.element_size())
        grid = (_rows.num_programs(triton.cdiv(n_rows, block_m)),)
        _softmax_fwd_rows_kernel[grid](x, y, n_rows, n_b, N, sxa, sxb, sxc, sya, syb, syc,
                                       BLOCK_M=block_m, BLOCK_N=block_n, SINGLE=single, HEAD=head, num_warps=warps)
    return y


def softmax_bwd(grad_y, y, dx, dim):
    """dx[:] = y * (grad_y - sum(grad_y * y, dim)). Same layout rules as ``softmax_fwd`` (grad_y
    and y copied contiguous when they do not collapse together); grad_y may be broadcast (stride
    0). Returns dx."""
    desc = collapse(y.shape, dim, grad_y, y, dx)
    if desc is None:  # one layout check per call: the caller need not make its own
        grad_y, y = grad_y.contiguous(), y.contiguous()
        desc = collapse(y.shape, dim, grad_y, y, dx)
    if desc is None:
        raise ValueError("softmax_bwd: dx's layout has more than two row groups; pass a contiguous dx")
    n_a, n_b, N, (sd, sy, sx) = desc
    if _use_columns(n_b, sy[1], sy[2]):
        block_b, block_n, single, warps = _columns_config(n_b, N)
        grid = (_rows.num_programs(n_a * triton.cdiv(n_b, block_b)),)
        _softmax_bwd_cols_kernel[grid](grad_y, y, dx, n_a, n_b, N, *sd, *sy, *sx,
                                       BLOCK_N=block_n, BLOCK_B=block_b, SINGLE=single, num_warps=warps)
    else:
        n_rows = n_a * n_b
        block_m, block_n, single, warps = _rows.row_config(n_rows, N, y.element_size(), backward=True)
        grid = (_rows.num_programs(triton.cdiv(n_rows, block_m)),)
        _softmax_bwd_rows_kernel[grid](grad_y, y, dx, n_rows, n_b, N, *sd, *sy, *sx,
                                       BLOCK_M=block_m, BLOCK_N=block_n, SINGLE=single, num_warps=warps)
    return dx

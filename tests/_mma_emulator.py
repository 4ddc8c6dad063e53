"""A lane-level model of the warp instructions csrc/attention.cu uses, as the PTX ISA defines
them: ldmatrix.sync.aligned.m8n8{.x1,.x2,.x4}{,.trans}.shared.b16, the fragments of
mma.sync.aligned.m16n8k16.row.col (f16/bf16 in, f32 accumulate) and __shfl_xor_sync.

Register files are numpy arrays whose lane axis is explicit: a fragment of R 32-bit registers,
each holding two b16 halves, is (..., 32, R, 2); four f32 accumulators are (..., 32, 4); a
per-lane scalar is (..., 32). Leading axes are anything the caller vectorizes over (batch,
head, warp). Values are held as numbers (float32 or float64), already rounded to what the
registers hold; the caller does the rounding (see _attention_emulator.Numerics).

Every layout is one small function returning, per (lane, register, half), the (row, col) of the
element it holds, with the ISA's formula beside it. mma() builds the 16x16 A, 16x8 B and C
matrices from the lanes' fragments through those functions, multiplies, and hands D back
through the C layout: a lane model, not a shortcut.
"""

import numpy as np

LANES = np.arange(32)
FULL_MASK = 0xFFFFFFFF


def group_id(lane):
    return lane >> 2  # ISA: groupID = %laneid >> 2


def thread_id_in_group(lane):
    return lane % 4  # ISA: threadID_in_group = %laneid % 4


def _lane_reg_half(regs):
    """lane, reg, half index grids of shape (32, regs, 2); element i of the ISA is 2 * reg + half."""
    return np.meshgrid(LANES, np.arange(regs), np.arange(2), indexing="ij")


def a_layout():
    """(row, col) in the 16x16 A matrix of element a_i, i = 2 * reg + half, each (32, 4, 2).
    ISA (m16n8k16, .f16/.bf16 A):
      row = groupID for a_i with 0 <= i < 2 or 4 <= i < 6, groupID + 8 otherwise
      col = threadID_in_group * 2 + (i & 1), + 8 for a_i with i >= 4"""
    lane, reg, half = _lane_reg_half(4)
    i = 2 * reg + half
    row = group_id(lane) + np.where((i < 2) | ((i >= 4) & (i < 6)), 0, 8)
    col = thread_id_in_group(lane) * 2 + (i & 1) + np.where(i >= 4, 8, 0)
    return row, col


def b_layout():
    """(row k, col n) in the 16x8 B matrix of element b_i, i = 2 * reg + half, each (32, 2, 2).
    ISA (m16n8k16, .f16/.bf16 B):
      row = threadID_in_group * 2 + (i & 1), + 8 for b_i with i >= 2
      col = groupID"""
    lane, reg, half = _lane_reg_half(2)
    i = 2 * reg + half
    row = thread_id_in_group(lane) * 2 + (i & 1) + np.where(i >= 2, 8, 0)
    col = group_id(lane)
    return row, col


def c_layout():
    """(row, col) in the 16x8 C/D matrix of accumulator c_i, each (32, 4).
    ISA (m16n8k16, .f32 C/D):
      row = groupID for c_i with i < 2, groupID + 8 otherwise
      col = threadID_in_group * 2 + (i & 1)"""
    lane, i = np.meshgrid(LANES, np.arange(4), indexing="ij")
    row = group_id(lane) + np.where(i < 2, 0, 8)
    col = thread_id_in_group(lane) * 2 + (i & 1)
    return row, col


def ldmatrix_layout(trans):
    """(row, col) in one stored 8x8 b16 matrix of the two halves a lane receives, each (32, 2).
    ISA (ldmatrix .m8n8 .b16): lane holds row = %laneid >> 2, cols (%laneid % 4) * 2 + {0, 1};
    with .trans the matrix is read column-major, so the lane gets stored (col, row) instead."""
    lane, half = np.meshgrid(LANES, np.arange(2), indexing="ij")
    row, col = lane >> 2, (lane % 4) * 2 + half
    return (col, row) if trans else (row, col)


A_ROW, A_COL = a_layout()
B_ROW, B_COL = b_layout()
C_ROW, C_COL = c_layout()


def ldmatrix(smem, addr, num, trans=False):
    """ldmatrix.sync.aligned.m8n8.x{num}{.trans}.shared.b16 of every warp at once.

    smem: (..., S) one block's shared memory in b16 elements; addr: (..., 32) each lane's element
    address. ISA: lanes 8q .. 8q+7 give the addresses of rows 0..7 of matrix q (q < num; the
    other lanes' addresses are ignored); each row is 8 contiguous b16 (16 bytes, 16-byte aligned).
    Returns the (..., 32, num, 2) fragment: register q of a lane holds matrix q per
    ldmatrix_layout. Raises on misaligned or out-of-bounds row addresses, as the GPU faults."""
    assert num in (1, 2, 4)
    rows = np.asarray(addr)[..., : 8 * num]  # (..., 8 * num): matrix q's row r is lane 8q + r
    assert np.all(rows % 8 == 0), "ldmatrix: a row address is not 16-byte aligned"
    assert rows.min() >= 0 and rows.max() + 8 <= smem.shape[-1], "ldmatrix: row outside shared memory"
    lead = np.broadcast_shapes(smem.shape[:-1], rows.shape[:-1])
    smem = np.broadcast_to(smem, lead + smem.shape[-1:])
    rows = np.broadcast_to(rows, lead + rows.shape[-1:])
    mats = np.take_along_axis(smem, (rows[..., None] + np.arange(8)).reshape(lead + (-1,)), axis=-1)
    mats = mats.reshape(lead + (num, 8, 8))  # (..., q, row, col) as stored
    row, col = ldmatrix_layout(trans)  # (32, 2)
    frag = mats[..., :, row, col]  # (..., num, 32, 2)
    return np.moveaxis(frag, -3, -2)  # (..., 32, num, 2)


def _gather(frag, row, col, shape):
    """The matrix whose element (row[l, ...], col[l, ...]) is frag[..., l, ...]."""
    m = np.zeros(frag.shape[: frag.ndim - row.ndim] + shape, dtype=frag.dtype)
    m[..., row, col] = frag
    return m


def mma_m16n8k16(c, a, b):
    """mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32 {c}, {a}, {b}, {c}.

    c (..., 32, 4) accumulators, a (..., 32, 4, 2), b (..., 32, 2, 2) fragments. Returns the new
    (..., 32, 4) accumulators D = A B + C, in c's dtype (the products of 16-bit inputs are exact
    there; float32 then rounds the sums, as the tensor core's f32 accumulation)."""
    A = _gather(a.astype(c.dtype), A_ROW, A_COL, (16, 16))
    B = _gather(b.astype(c.dtype), B_ROW, B_COL, (16, 8))
    C = _gather(c, C_ROW, C_COL, (16, 8))
    D = A @ B + C
    return D[..., C_ROW, C_COL]


def shfl_xor(v, lane_mask, member_mask=FULL_MASK):
    """__shfl_xor_sync(member_mask, v, lane_mask) on a (..., 32) per-lane value: lane l reads lane
    l ^ lane_mask. The kernel only shuffles with every lane active."""
    assert member_mask == FULL_MASK
    return v[..., LANES ^ lane_mask]

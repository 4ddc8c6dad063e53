"""csrc/attention.cu, thread by thread, on a CPU: the forward, delta and backward kernels written
again in numpy with the same tiles, loops, per-lane index arithmetic, ldmatrix addresses, mma
fragments and shuffles, over the lane model of _mma_emulator. A wrong index, lane mapping or
shuffle partner in the .cu must be copied here to go unnoticed, so keep the two in step: each
function names the kernel code it mirrors, and each statement keeps the kernel's expression.

Vectorized over blockIdx.y/z (heads, batches: one block each, no grid-stride) and over warps
and lanes; blockIdx.x is a Python loop. Not modelled: timing (cp.async groups, barriers; the
code waits before every read), FTZ and the approximate exp2f/log2f of --use_fast_math.
"""

import types

import numpy as np
from _device_memory import SharedMemory
from _mma_emulator import LANES, ldmatrix, mma_m16n8k16, shfl_xor

# attention.cu: kBM, kBN, kWarps, kThreads, kLog2e, kLn2
kBM, kBN, kWarps = 64, 64, 4
kThreads = kWarps * 32
kLog2e, kLn2 = 1.4426950408889634, 0.6931471805599453
kScoreFloor = -1.0e5  # attention.cu: finite log2-domain scores are clamped here

WARP = np.arange(kWarps)[:, None]  # (4, 1): threadIdx.x / 32
LANE = LANES[None, :]  # (1, 32): threadIdx.x % 32
G, TIG = LANE >> 2, LANE & 3  # g = lane >> 2, tig = lane & 3
TID = np.arange(kThreads)  # threadIdx.x
# a per-fragment-element axis pair (n-tile nt, accumulator e) after the (warp, lane) axes
NT8, E = np.arange(8)[:, None], np.arange(4)[None, :]


def carve(*arrays):  # attention.cu: SmemPtrs / SmemBytes over a layout's take<U>(n) calls
    """The byte offset of each (n, bytes of U) array placed one after another, and the size."""
    offsets, at = [], 0
    for n, size in arrays:
        offsets.append(at)
        at += n * size
    return offsets, at


def fwd_smem(D, elem):  # attention.cu: FwdSmem<T, D> (q, k, v) and smem_bytes
    return carve((kBM * (D + 8), elem), (kBN * (D + 8), elem), (kBN * (D + 8), elem))


def bwd_smem(D, elem):  # attention.cu: BwdSmem<T, D> (k, v, q, dout, ds, lse, delta) and smem_bytes
    return carve((kBN * (D + 8), elem), (kBN * (D + 8), elem), (kBM * (D + 8), elem), (kBM * (D + 8), elem),
                 (kBN * (kBM + 8), elem), (kBM, 4), (kBM, 4))


def lane_axes(x):
    """A (4, 32) per-thread value against (..., 4, 32, nt, e) fragment-element grids."""
    return x[..., None, None]


def ldsm_x4(smem, addr):  # attention.cu: ldsm_x4
    return ldmatrix(smem.data, addr, 4)


def ldsm_x4_t(smem, addr):  # attention.cu: ldsm_x4_t
    return ldmatrix(smem.data, addr, 4, trans=True)


def mma16816(c, a, b):  # attention.cu: mma16816<T>
    return mma_m16n8k16(c, a, b)


def accumulators_as_a(num, acc, kt):
    """attention.cu: warp_pb's `const uint32_t pa[4] = {pack2<T>(pm[2kt][0], pm[2kt][1]), ...}` (forward P V,
    backward dV += P^T dO and dK += dS^T Q): n-tiles 2kt, 2kt + 1 of an (..., 32, n, 4) accumulator
    as the A fragment (..., 32, 4, 2) of k-step kt."""
    lo, hi = acc[..., 2 * kt, :], acc[..., 2 * kt + 1, :]
    return np.stack([num.pack2(lo[..., 0], lo[..., 1]), num.pack2(lo[..., 2], lo[..., 3]),
                     num.pack2(hi[..., 0], hi[..., 1]), num.pack2(hi[..., 2], hi[..., 3])], axis=-2)


def head_offsets(p, b, h):  # attention.cu: head_ptrs<T> (element offsets into q, k, v)
    kvh = h // (p.H // p.Hkv)
    return b * p.q_sb + h * p.q_sh, b * p.k_sb + kvh * p.k_sh, b * p.v_sb + kvh * p.v_sh


def warp_abt(num, smem, sA, sB, D, nt, lead):
    """attention.cu: warp_abt<T, D, NT>: A B^T for each warp, A its 16 rows of sA, B the first 8 nt
    rows of sB, both (rows, D) shared tiles with pitch D + 8; returned as (*lead, nt, 4) accumulators."""
    pitch = D + 8
    acc = np.zeros(lead + (nt, 4), num.acc)
    for kk in range(D // 16):
        a = ldsm_x4(smem, sA + (WARP * 16 + LANE % 16) * pitch + kk * 16 + (LANE // 16) * 8)
        for nt2 in range(nt // 2):
            b = ldsm_x4(smem, sB + (nt2 * 16 + LANE % 8 + (LANE // 16) * 8) * pitch + kk * 16 + ((LANE // 8) % 2) * 8)
            acc[..., 2 * nt2, :] = mma16816(acc[..., 2 * nt2, :], a, b[..., 0:2, :])
            acc[..., 2 * nt2 + 1, :] = mma16816(acc[..., 2 * nt2 + 1, :], a, b[..., 2:4, :])
    return acc


def mma_k_step(smem, acc, a, sB, kt, D):
    """attention.cu: mma_k_step<T, D>: acc += A B over k-step kt in place, A's fragment a, B rows
    16kt..16kt+15 of the (rows, D) shared tile sB, read transposed."""
    for dt2 in range(D // 16):
        f = ldsm_x4_t(smem, sB + (kt * 16 + LANE % 8 + ((LANE // 8) % 2) * 8) * (D + 8) + dt2 * 16 + (LANE // 16) * 8)
        acc[..., 2 * dt2, :] = mma16816(acc[..., 2 * dt2, :], a, f[..., 0:2, :])
        acc[..., 2 * dt2 + 1, :] = mma16816(acc[..., 2 * dt2 + 1, :], a, f[..., 2:4, :])


def warp_pb(num, smem, acc, pm, sB, D):
    """attention.cu: warp_pb<T, D, NT>: acc += P B in place, P (16, 8 NT) held in accumulators pm
    (..., NT, 4), B the first 8 NT rows of sB."""
    for kt in range(pm.shape[-2] // 2):
        mma_k_step(smem, acc, accumulators_as_a(num, pm, kt), sB, kt, D)


def load_tile(smem, s, g, g_off, r0, L, ld, D):
    """attention.cu: load_tile<T, D>: rows [r0, r0 + 64) of an (L, D) matrix with row stride ld
    at g + g_off (g_off (B, H): per block) into shared tile s with pitch D + 8, rows >= L zero."""
    kChunks = D // 8
    for c0 in range(0, 64 * kChunks, kThreads):  # for (c = threadIdx.x; c < 64 * kChunks; c += kThreads)
        c = c0 + TID
        r, col = c // kChunks, (c % kChunks) * 8
        ok = r0 + r < L
        src = g_off[..., None] + (r0 + r) * ld + col  # cp_async16(..., ok ? g + (r0 + r) * ld + col : g, ok)
        vals = g.load(src, mask=ok, width=8)  # zero-filled where !ok
        smem.store(s + r * (D + 8) + col, vals, width=8)


def bias_at(bias, b, h):  # attention.cu: bias_at -> (kind, buffer, element offset (B, H), sq, sk)
    return types.SimpleNamespace(kind=bias.kind, buf=bias.buf, off=b * bias.sb + h * bias.sh, sq=bias.sq,
                                 sk=bias.sk)


def score2(p, bias_bh, qk, i, j):
    """attention.cu: score2: the log2-domain score of query i, key j, or -inf where masked.
    qk (B, H, 4, 32, n, 4); i, j broadcast against it."""
    num = p.num
    masked = (j >= p.Lk) | (p.causal & (j > i))
    s = qk * p.scale * num.f(kLog2e)
    if bias_bh.kind != 0:
        read = ~masked & (i < p.Lq)  # the early return: no mask element is read for masked keys
        off = bias_bh.off[:, :, None, None, None, None] + i * bias_bh.sq + j * bias_bh.sk
        val = bias_bh.buf.load(np.broadcast_to(off, s.shape), mask=np.broadcast_to(read, s.shape))
        if bias_bh.kind == 1:
            masked = masked | (read & (val == 0))
        else:
            masked = masked | (read & (val == -np.inf))  # only a true -inf masks a key
            with np.errstate(over="ignore", invalid="ignore"):  # a float32 overflow, as on the GPU
                s = s + np.where(read, val * num.f(kLog2e), 0)
    with np.errstate(invalid="ignore"):
        s = np.where(s < num.f(kScoreFloor), num.f(kScoreFloor), s)  # NaN stays NaN
    return np.where(masked, -np.inf, s).astype(num.acc)


def attn_fwd_kernel(p, D, block_x):
    """attention.cu: attn_fwd_kernel<T, D> for blockIdx.x = block_x and every (b, h)."""
    num, pitch = p.num, D + 8
    offsets, size = fwd_smem(D, 2)
    smem = SharedMemory((p.B, p.H), size // 2, num.acc)
    sQ, sK, sV = (at // 2 for at in offsets)  # in elements of T
    m0 = block_x * kBM
    b, h = np.arange(p.B)[:, None], np.arange(p.H)[None, :]  # for_each_head: every (b, h) at once
    qb, kb, vb = head_offsets(p, b, h)
    bias = bias_at(p.bias, b, h)
    load_tile(smem, sQ, p.q, qb, m0, p.Lq, p.q_sl, D)
    qf = [ldsm_x4(smem, sQ + (WARP * 16 + LANE % 16) * pitch + kk * 16 + (LANE // 16) * 8) for kk in range(D // 16)]
    lead = (p.B, p.H, kWarps, 32)
    o = np.zeros(lead + (D // 8, 4), num.acc)
    mrow, lrow = np.full(lead + (2,), -np.inf, num.acc), np.zeros(lead + (2,), num.acc)  # rows g and g + 8
    n_end = (m0 + kBM if m0 + kBM < p.Lk else p.Lk) if p.causal else p.Lk
    for n0 in range(0, n_end, kBN):
        load_tile(smem, sK, p.k, kb, n0, p.Lk, p.k_sl, D)
        load_tile(smem, sV, p.v, vb, n0, p.Lk, p.v_sl, D)
        s = np.zeros(lead + (kBN // 8, 4), num.acc)
        for kk in range(D // 16):
            for nt2 in range(kBN // 16):
                kf = ldsm_x4(smem, sK + (nt2 * 16 + LANE % 8 + (LANE // 16) * 8) * pitch
                             + kk * 16 + ((LANE // 8) % 2) * 8)
                s[..., 2 * nt2, :] = mma16816(s[..., 2 * nt2, :], qf[kk], kf[..., 0:2, :])
                s[..., 2 * nt2 + 1, :] = mma16816(s[..., 2 * nt2 + 1, :], qf[kk], kf[..., 2:4, :])
        i = m0 + lane_axes(WARP * 16 + G) + (E >> 1) * 8
        j = n0 + NT8 * 8 + lane_axes(TIG) * 2 + (E & 1)
        s = score2(p, bias, s, i, j)
        for r in range(2):  # online softmax for row g + 8r
            mx = np.fmax.reduce(np.fmax(s[..., 2 * r], s[..., 2 * r + 1]), axis=-1)
            mx = np.fmax(mx, shfl_xor(mx, 1))
            mx = np.fmax(mx, shfl_xor(mx, 2))
            m_new = np.fmax(mrow[..., r], mx)
            m_use = np.where(m_new == -np.inf, 0, m_new).astype(num.acc)  # all masked so far: keep p = 0
            alpha = np.exp2(mrow[..., r] - m_use)
            mrow[..., r] = m_new
            s[..., 2 * r: 2 * r + 2] = np.exp2(s[..., 2 * r: 2 * r + 2] - m_use[..., None, None])
            rs = s[..., 2 * r: 2 * r + 2].sum(axis=(-2, -1))
            lrow[..., r] = lrow[..., r] * alpha + rs  # this thread's columns only; summed over the quad at the end
            o[..., 2 * r: 2 * r + 2] *= alpha[..., None, None]
        warp_pb(num, smem, o, s, sV, D)  # O += P V
    bh = (b * p.H + h)[..., None, None]
    for r in range(2):
        l = lrow[..., r]
        l = l + shfl_xor(l, 1)
        l = l + shfl_xor(l, 2)
        with np.errstate(divide="ignore"):
            inv = np.where(l > 0, 1 / l, 0).astype(num.acc)
            lse = np.where(l > 0, (mrow[..., r] + np.log2(l)) * num.f(kLn2), -np.inf)
        i = m0 + WARP * 16 + G + r * 8
        orow = (bh * p.Lq + i) * D
        for dt in range(D // 8):
            p.o.store(orow + dt * 8 + TIG * 2, num.pack2(o[..., dt, 2 * r] * inv, o[..., dt, 2 * r + 1] * inv),
                      mask=i < p.Lq, width=2)
        p.lse.store(bh * p.Lq + i, num.round("float", lse), mask=(i < p.Lq) & (TIG == 0))


def attn_bwd_delta_kernel(num, dout, out, delta, rows, D):
    """attention.cu: attn_bwd_delta_kernel<T>, 256-thread blocks, a warp per row, all blocks at once."""
    blocks = (rows + 7) // 8
    row = (np.arange(blocks)[:, None] * (256 // 32) + np.arange(8)).reshape(-1, 1)  # (warps, 1)
    live = row < rows
    s = np.zeros((row.shape[0], 32), num.acc)
    for d0 in range(0, D, 32):  # for (d = threadIdx.x % 32; d < D; d += 32)
        d = d0 + LANE
        ok = live & (d < D)
        s = s + dout.load(row * D + d, mask=ok) * out.load(row * D + d, mask=ok)
    for o in (16, 8, 4, 2, 1):  # common.cuh: warp_sum
        s = s + shfl_xor(s, o)
    delta.store(row + 0 * LANE, num.round("float", s), mask=live & (LANE == 0))


def attn_bwd_kernel(p, D, block_x):
    """attention.cu: attn_bwd_kernel<T, D> for blockIdx.x = block_x and every (b, h)."""
    num = p.num
    offsets, _ = bwd_smem(D, 2)
    sK, sV, sQ, sdO, sdS, lse_at, _ = (at // 2 for at in offsets)  # in elements of T; sdS holds dS^T
    smem = SharedMemory((p.B, p.H), lse_at, num.acc)  # the T arrays; sLse, sDelta are modelled apart
    n0 = block_x * kBN
    b, h = np.arange(p.B)[:, None], np.arange(p.H)[None, :]  # for_each_head: every (b, h) at once
    qb, kb, vb = head_offsets(p, b, h)
    bh = b * p.H + h
    dob = bh * p.Lq * D
    bias = bias_at(p.bias, b, h)
    load_tile(smem, sK, p.k, kb, n0, p.Lk, p.k_sl, D)
    load_tile(smem, sV, p.v, vb, n0, p.Lk, p.v_sl, D)
    lead = (p.B, p.H, kWarps, 32)
    dk, dv = np.zeros(lead + (D // 8, 4), num.acc), np.zeros(lead + (D // 8, 4), num.acc)  # this warp's 16 keys
    for m0 in range(n0 if p.causal else 0, p.Lq, kBM):  # causal: queries i >= n0 only
        load_tile(smem, sQ, p.q, qb, m0, p.Lq, p.q_sl, D)
        load_tile(smem, sdO, p.dout, dob, m0, p.Lq, D, D)
        t = np.arange(kBM)  # for (t = threadIdx.x; t < kBM; t += kThreads)
        i = m0 + t
        l = p.lse.load(bh[..., None] * p.Lq + i, mask=i < p.Lq, fill=-np.inf)
        sLse = np.where(l == -np.inf, np.inf, l * num.f(kLog2e)).astype(num.acc)  # (B, H, kBM), log2 domain
        sDelta = p.delta.load(bh[..., None] * p.Lq + i, mask=i < p.Lq)
        # S^T = K Q^T: rows are this warp's keys, columns the block's 64 queries
        st = warp_abt(num, smem, sK, sQ, D, kBM // 8, lead)
        il = NT8 * 8 + lane_axes(TIG) * 2 + (E & 1)  # (1, 32, 8, 4): query of st[nt][e] in the block
        j = n0 + lane_axes(WARP * 16 + G) + (E >> 1) * 8
        st = np.exp2(score2(p, bias, st, m0 + il, j) - sLse[:, :, il])  # P^T = exp2(S^T - lse)
        warp_pb(num, smem, dv, st, sdO, D)  # dV += P^T dO
        dpt = warp_abt(num, smem, sV, sdO, D, kBM // 8, lead)  # dP^T = V dO^T
        # dS^T = P^T * (dP^T - delta), kept in registers for dK and in shared memory for dQ
        dpt = (st * (dpt - sDelta[:, :, NT8 * 8 + lane_axes(TIG) * 2 + (E & 1)])).astype(num.acc)
        for nt in range(kBM // 8):
            for r in range(2):
                smem.store(sdS + (WARP * 16 + G + r * 8) * (kBM + 8) + nt * 8 + TIG * 2,
                           num.pack2(dpt[..., nt, 2 * r], dpt[..., nt, 2 * r + 1]), width=2)
        warp_pb(num, smem, dk, dpt, sQ, D)  # dK += dS^T Q
        # dQ (this warp's 16 queries) = dS K, read dS through a transposing ldmatrix of dS^T
        dq = np.zeros(lead + (D // 8, 4), num.acc)
        for kt in range(kBN // 16):
            a = ldsm_x4_t(smem, sdS + (kt * 16 + LANE % 8 + (LANE // 16) * 8) * (kBM + 8)
                          + WARP * 16 + ((LANE // 8) % 2) * 8)
            mma_k_step(smem, dq, a, sK, kt, D)
        for r in range(2):
            i = m0 + WARP * 16 + G + r * 8
            dqrow = (bh[..., None, None] * p.Lq + i) * D
            for dt in range(D // 8):
                p.dq.atomic_add(dqrow + dt * 8 + TIG * 2, dq[..., dt, 2 * r] * p.scale, mask=i < p.Lq)
                p.dq.atomic_add(dqrow + dt * 8 + TIG * 2 + 1, dq[..., dt, 2 * r + 1] * p.scale, mask=i < p.Lq)
    for r in range(2):
        j = n0 + WARP * 16 + G + r * 8
        row = (bh[..., None, None] * p.Lk + j) * D
        for dt in range(D // 8):
            p.dk.store(row + dt * 8 + TIG * 2,
                       np.stack([dk[..., dt, 2 * r] * p.scale, dk[..., dt, 2 * r + 1] * p.scale], -1),
                       mask=j < p.Lk, width=2)
            p.dv.store(row + dt * 8 + TIG * 2, np.stack([dv[..., dt, 2 * r], dv[..., dt, 2 * r + 1]], -1),
                       mask=j < p.Lk, width=2)

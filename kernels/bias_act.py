"""Bias + activation as one elementwise pass over a matmul output h = x @ W^T (the general path).

Forward: preact = h + b, y = act(preact) (gated: y = act(gate) * up with gate = preact[:, :F],
up = preact[:, F:]). Reads M*N, writes M*N_out (+ M*N for the saved preact, written in place over
h). Backward, with the same symbols:

    dh   = dy * act'(h)                       (elementwise)
    dgate = dy * up * act'(gate),  dup = dy * act(gate)        (gated)
    db   = sum_rows(dh)

reads M*N_out + M*N, writes M*N. db is reduced deterministically: each program writes the
column sums of its ROW_BLOCKS * BLOCK_M rows to its own row of an fp32 partials buffer, which
the launcher sums (no atomics). The activation functions here are shared with kernels/matmul_act.py.

Activations: the ACT code of their elementwise function (fusedformer.vocabulary's kernel ids) and
GATED. Math runs in float32 (float64 for float64 inputs).
"""

import torch
import triton
import triton.language as tl
from fusedformer.kernels import interpreted
from fusedformer.vocabulary import ACTIVATIONS, ELEMENTWISE

# the ACT constexpr of the switch in act_fn / act_grad_fn: vocabulary's kernel ids
IDENTITY, RELU, GELU, GELU_TANH, SILU = (tl.constexpr(ELEMENTWISE[name].kernel_id)
                                         for name in ("identity", "relu", "gelu", "gelu_tanh", "silu"))


def kernel_activation(op, activation):
    """(ACT, GATED) constexprs of a fused activation; ValueError naming ``op`` for any other."""
    act = ACTIVATIONS.get(activation)
    if act is None or not act.fused:
        raise ValueError(f"{op}: unknown activation {activation!r}")
    return act.function.kernel_id, act.gated


_INV_SQRT_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
_GELU_TANH_C = tl.constexpr(0.044715)


@triton.jit
def _tanh(z):
    # 1 - 2 / (exp(2z) + 1): exp overflowing to inf gives exactly 1, underflow exactly -1
    return 1.0 - 2.0 / (tl.exp(2.0 * z) + 1.0)


@triton.jit
def _sigmoid(h):
    return 1.0 / (1.0 + tl.exp(-h))


@triton.jit
def act_fn(h, ACT: tl.constexpr):
    """act(h) for activation code ACT, in h's (float32 / float64) dtype."""
    if ACT == RELU:
        return tl.where(h < 0, 0.0, h)  # NaN < 0 is false: NaN stays NaN, as torch.relu
    elif ACT == GELU:
        return 0.5 * h * (1.0 + tl.erf(h * _INV_SQRT_2))
    elif ACT == GELU_TANH:
        t = _tanh(_SQRT_2_OVER_PI * (h + _GELU_TANH_C * h * h * h))
        return 0.5 * h * (1.0 + t)
    elif ACT == SILU:
        return h * _sigmoid(h)
    else:
        return h


@triton.jit
def act_grad_fn(dy, h, ACT: tl.constexpr):
    """dL/dh = dy * act'(h); relu's is a select, as torch's threshold_backward (and vocabulary's
    relu grad): 0 where h <= 0 even for a NaN dy, dy elsewhere, a NaN h included."""
    if ACT == RELU:
        return tl.where(h <= 0, 0.0, dy)
    elif ACT == GELU:
        return dy * (0.5 * (1.0 + tl.erf(h * _INV_SQRT_2)) + h * tl.exp(-0.5 * h * h) * _INV_SQRT_2PI)
    elif ACT == GELU_TANH:
        t = _tanh(_SQRT_2_OVER_PI * (h + _GELU_TANH_C * h * h * h))
        return dy * (0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_TANH_C * h * h))
    elif ACT == SILU:
        s = _sigmoid(h)
        return dy * (s * (1.0 + h * (1.0 - s)))
    else:
        return dy


@triton.jit
def gated_grad(dy, gate, up, ACT: tl.constexpr):
    """For y = act(gate) * up: (act(gate), dgate, dup) in the compute dtype."""
    a = act_fn(gate, ACT)
    return a, act_grad_fn(dy * up, gate, ACT), dy * a


@triton.jit
def store_gated_grad(dh_ptrs, y_ptrs, dy, gate, up, mask, N_OUT, ACT: tl.constexpr, STORE_Y: tl.constexpr):
    """For y = act(gate) * up: stores dh = [dgate | dup] (dup N_OUT after dgate) and, when
    STORE_Y, y; returns (dgate, dup) in the compute dtype."""
    a, d_gate, d_up = gated_grad(dy, gate, up, ACT)
    tl.store(dh_ptrs, d_gate.to(dh_ptrs.dtype.element_ty), mask=mask)
    tl.store(dh_ptrs + N_OUT, d_up.to(dh_ptrs.dtype.element_ty), mask=mask)
    if STORE_Y:
        tl.store(y_ptrs, (a * up).to(y_ptrs.dtype.element_ty), mask=mask)
    return d_gate, d_up


@triton.jit
def _load_summed(ptrs, stride_hs, SPLITS, mask, CD: tl.constexpr):
    """The sum of SPLITS tiles stride_hs elements apart (a split-K GEMM's partials), added in a
    fixed order: the same bits on every run."""
    h = tl.load(ptrs, mask=mask, other=0.0).to(CD)
    for s in range(1, SPLITS):
        h += tl.load(ptrs + s * stride_hs, mask=mask, other=0.0).to(CD)
    return h


@triton.jit
def _bias_act_fwd_kernel(
    H,  # matmul output x @ W^T, (M, N) with N = N_OUT, or 2 * N_OUT when GATED ([gate | up]);
    # or SPLITS partial sums of it, stride_hs elements apart
    B,  # bias (N,); unused unless HAS_BIAS
    Y,  # output act(H + B), (M, N_OUT) contiguous
    P,  # saved preact H + B, (M, N) contiguous (may be H itself); unused unless STORE_PREACT
    M, N_OUT,
    stride_hs, stride_hm, stride_hn,  # strides of H
    SPLITS,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, GATED: tl.constexpr, STORE_PREACT: tl.constexpr,
    CD: tl.constexpr,  # compute dtype
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N_OUT
    mask = (rows[:, None] < M) & col_ok[None, :]
    n_total = 2 * N_OUT if GATED else N_OUT
    h_ptrs = H + rows[:, None] * stride_hm + cols[None, :] * stride_hn
    h = _load_summed(h_ptrs, stride_hs, SPLITS, mask, CD)
    if HAS_BIAS:
        h += tl.load(B + cols, mask=col_ok, other=0.0).to(CD)[None, :]
    if GATED:
        up = _load_summed(h_ptrs + N_OUT * stride_hn, stride_hs, SPLITS, mask, CD)
        if HAS_BIAS:
            up += tl.load(B + N_OUT + cols, mask=col_ok, other=0.0).to(CD)[None, :]
        y = act_fn(h, ACT) * up
    else:
        y = act_fn(h, ACT)
    tl.store(Y + rows[:, None] * N_OUT + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    if STORE_PREACT:
        p_ptrs = P + rows[:, None] * n_total + cols[None, :]
        tl.store(p_ptrs, h.to(P.dtype.element_ty), mask=mask)
        if GATED:
            tl.store(p_ptrs + N_OUT, up.to(P.dtype.element_ty), mask=mask)


@triton.jit
def _bias_act_bwd_kernel(
    DY,  # upstream gradient, (M, N_OUT), unit column stride
    H,  # preact (M, N), unit column stride; without the bias when ADD_BIAS (a recomputed x @ W^T, or SPLITS partial
    # sums of it stride_hs elements apart)
    B,  # bias (N,); read only when ADD_BIAS
    DH,  # gradient w.r.t. preact, (M, N) contiguous
    Y,  # recomputed act output (M, N_OUT) contiguous; written only when STORE_Y
    DB,  # bias-gradient partials, (cdiv(M, BLOCK_M * ROW_BLOCKS), N) in CD; written only when BIAS_GRAD
    M, N_OUT,
    stride_dym,  # row stride of DY
    stride_hs, stride_hm,  # slice and row strides of H
    SPLITS,
    ADD_BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr, STORE_Y: tl.constexpr,
    ACT: tl.constexpr, GATED: tl.constexpr, CD: tl.constexpr,
    ROW_BLOCKS: tl.constexpr,  # BLOCK_M-row blocks per program: fewer, larger bias partials
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N_OUT
    n_total = 2 * N_OUT if GATED else N_OUT
    if ADD_BIAS:
        b_gate = tl.load(B + cols, mask=col_ok, other=0.0).to(CD)[None, :]
        if GATED:
            b_up = tl.load(B + N_OUT + cols, mask=col_ok, other=0.0).to(CD)[None, :]
    db_gate = tl.zeros((BLOCK_N,), dtype=CD)
    db_up = tl.zeros((BLOCK_N,), dtype=CD)
    for i in range(ROW_BLOCKS):
        rows = (pid_m.to(tl.int64) * ROW_BLOCKS + i) * BLOCK_M + tl.arange(0, BLOCK_M)
        mask = (rows[:, None] < M) & col_ok[None, :]
        dy = tl.load(DY + rows[:, None] * stride_dym + cols[None, :], mask=mask, other=0.0).to(CD)
        h_ptrs = H + rows[:, None] * stride_hm + cols[None, :]
        dh_ptrs = DH + rows[:, None] * n_total + cols[None, :]
        y_ptrs = Y + rows[:, None] * N_OUT + cols[None, :]
        if GATED:
            gate = _load_summed(h_ptrs, stride_hs, SPLITS, mask, CD)
            up = _load_summed(h_ptrs + N_OUT, stride_hs, SPLITS, mask, CD)
            if ADD_BIAS:
                gate += b_gate
                up += b_up
            d_gate, d_up = store_gated_grad(dh_ptrs, y_ptrs, dy, gate, up, mask, N_OUT, ACT, STORE_Y)
            if BIAS_GRAD:
                # summed before rounding to DH's dtype: closer to the float64 oracle
                db_gate += tl.sum(tl.where(mask, d_gate, 0.0), axis=0)
                db_up += tl.sum(tl.where(mask, d_up, 0.0), axis=0)
        else:
            if ACT == IDENTITY and not STORE_Y:
                dh = dy  # identity: the preact is never read
            else:
                h = _load_summed(h_ptrs, stride_hs, SPLITS, mask, CD)
                if ADD_BIAS:
                    h += b_gate
                dh = act_grad_fn(dy, h, ACT)
                if STORE_Y:
                    tl.store(y_ptrs, act_fn(h, ACT).to(Y.dtype.element_ty), mask=mask)
            tl.store(dh_ptrs, dh.to(DH.dtype.element_ty), mask=mask)
            if BIAS_GRAD:
                db_gate += tl.sum(tl.where(mask, dh, 0.0), axis=0)
    if BIAS_GRAD:
        db_ptrs = DB + pid_m.to(tl.int64) * n_total + cols
        tl.store(db_ptrs, db_gate, mask=col_ok)
        if GATED:
            tl.store(db_ptrs + N_OUT, db_up, mask=col_ok)


def _compute_dtype(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _blocks(n_out):
    if interpreted():
        return 16, 32
    return 32, min(128, triton.next_power_of_2(max(n_out, 16)))


def _grid(M, n_out, block_m, block_n):
    grid_n = triton.cdiv(n_out, block_n)
    if grid_n > 65535:
        raise ValueError(f"bias_act: output width {n_out} is too wide for the grid (at most {65535 * block_n})")
    return (triton.cdiv(M, block_m), grid_n)


def _row_blocks(M, n_out, block_m, block_n):
    """Row blocks per backward program: up to 8 (partials 8x smaller) while >= 1024 programs remain."""
    if interpreted():
        return 2  # the interpreter walks the loop too
    rb = 8
    while rb > 1 and triton.cdiv(M, block_m * rb) * triton.cdiv(n_out, block_n) < 1024:
        rb //= 2
    return rb


def _splits(h):
    """(K slices, their stride) of a matmul output: 2-D (M, N), or a split-K GEMM's 3-D partial
    sums (SPLITS, M, N), which the kernels add in order."""
    return (h.shape[0], h.stride(0)) if h.dim() == 3 else (1, 0)


def bias_act_forward(h, bias, activation, store_preact=True, out_dtype=None):
    """y = act(h + bias) over a matmul output ``h`` (M, N) of any strides, or the sum of its
    split-K partials (SPLITS, M, N).

    Returns (y, preact or None). preact is written in place over ``h`` when ``h`` is contiguous,
    2-D and already of ``out_dtype``, so the forward allocates only y.
    """
    act, gated = kernel_activation("bias_act", activation)
    M, N = h.shape[-2:]
    splits, stride_hs = _splits(h)
    n_out = N // 2 if gated else N
    out_dtype = out_dtype or h.dtype
    y = torch.empty(M, n_out, device=h.device, dtype=out_dtype)
    preact = None
    if store_preact:
        in_place = h.dim() == 2 and h.is_contiguous() and h.dtype == out_dtype
        preact = h if in_place else torch.empty(M, N, device=h.device, dtype=out_dtype)
    if M == 0 or n_out == 0:
        if preact is not None and preact is not h:
            h = h.sum(0) if splits > 1 else h
            preact.copy_(h + bias if bias is not None else h)
        return y, preact
    block_m, block_n = _blocks(n_out)
    _bias_act_fwd_kernel[_grid(M, n_out, block_m, block_n)](
        h, bias if bias is not None else h, y, preact if preact is not None else y, M, n_out,
        stride_hs, h.stride(-2), h.stride(-1), splits,
        HAS_BIAS=bias is not None, ACT=act, GATED=gated, STORE_PREACT=store_preact,
        CD=_compute_dtype(out_dtype), BLOCK_M=block_m, BLOCK_N=block_n)
    return y, preact


def bias_act_backward(grad_y, h, bias, activation, *, add_bias=False, bias_grad=False, store_y=False,
                      out_dtype=None):
    """dh = dy * act'(preact) and, when ``bias_grad``, db = sum_rows(dh) (fp32, deterministic).

    ``h`` is the saved preact, or with ``add_bias`` a recomputed x @ W^T (or its split-K partials
    (SPLITS, M, N)) to which ``bias`` is added here. ``store_y`` also returns the activation
    output act(preact) (for a recompute).
    Returns (dh, db or None, y or None); dh and y in ``out_dtype`` (default h's), db in fp32.
    """
    act, gated = kernel_activation("bias_act", activation)
    # unit column strides: compiled for a run-time one the backward spilled (sm_90a swiglu: 188 B
    # per thread, 255 registers; 248 and none with unit strides), so a strided dy or h is copied
    grad_y, h = (t if t.stride(-1) == 1 else t.contiguous() for t in (grad_y, h))
    M, N = h.shape[-2:]
    splits, stride_hs = _splits(h)
    n_out = N // 2 if gated else N
    out_dtype = out_dtype or h.dtype
    dev = h.device
    cd = torch.float64 if out_dtype == torch.float64 else torch.float32
    dh = torch.empty(M, N, device=dev, dtype=out_dtype)
    y = torch.empty(M, n_out, device=dev, dtype=out_dtype) if store_y else None
    block_m, block_n = _blocks(n_out)
    if M == 0 or n_out == 0:
        return dh.zero_(), (torch.zeros(N, device=dev, dtype=cd) if bias_grad else None), y
    row_blocks = _row_blocks(M, n_out, block_m, block_n)
    grid = _grid(M, n_out, block_m * row_blocks, block_n)
    partials = torch.empty(grid[0], N, device=dev, dtype=cd) if bias_grad else None
    _bias_act_bwd_kernel[grid](
        grad_y, h, bias if bias is not None else h, dh, y if y is not None else dh,
        partials if partials is not None else dh, M, n_out,
        grad_y.stride(0), stride_hs, h.stride(-2), splits,
        ADD_BIAS=add_bias and bias is not None, BIAS_GRAD=bias_grad, STORE_Y=store_y,
        ACT=act, GATED=gated, CD=_compute_dtype(out_dtype), ROW_BLOCKS=row_blocks, BLOCK_M=block_m,
        BLOCK_N=block_n)
    db = partials.sum(0) if bias_grad else None
    return dh, db, y

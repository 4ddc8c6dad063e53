"""ff.scaled_dot_product_attention: torch's SDPA semantics, plus sliding windows and ALiBi.

Shape legend: B batch (all leading dims flattened), H query heads, Hkv key/value heads,
Lq/Lk query/key lengths, D head dim, Dv value head dim.
"""

import math

import torch

from fusedformer import backends
from fusedformer._backends.tables import ATTENTION
from fusedformer.ops._checks import (
    FLOAT_DTYPES,
    check_attention_options,
    check_float,
    check_same_device,
    check_same_dtype,
)
from fusedformer.ops._dispatch import call, custom_op, differentiable, reshaped
from fusedformer.vocabulary import compute_dtype

OP = ATTENTION.name


def _empty_attention(q, v):
    B, H, Lq, _ = q.shape
    out = q.new_zeros(B, H, Lq, v.shape[-1])
    return out, torch.full((B, H, Lq), float("-inf"), dtype=compute_dtype(q), device=q.device)


def _no_output(q, k, v):
    """Nothing to compute: no query row, no key, or no value feature (out is zeros, or empty)."""
    return q.shape[0] * q.shape[1] * q.shape[2] == 0 or k.shape[2] == 0 or v.shape[-1] == 0


def _runner(backend, q):
    """The backend that runs q: head dim 0 (every score 0, plus the mask: torch gives the mean of
    the attended values) goes to the reference, whose matmuls handle it; kernels need a head dim."""
    return "reference" if q.shape[-1] == 0 else backend


@custom_op("attention_fwd")
def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, causal: bool,
                  scale: float, dropout_p: float, seed: torch.Tensor | None, window_left: int,
                  window_right: int, alibi_slopes: torch.Tensor | None, backend: str
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, H, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv) -> (out (B, H, Lq, Dv), lse (B, H, Lq))."""
    if _no_output(q, k, v):
        return _empty_attention(q, v)
    out, lse = ATTENTION.implementation(_runner(backend, q)).attention_forward(
        q, k, v, bias, causal, scale, dropout_p, seed, (window_left, window_right), alibi_slopes)
    return out, lse


@attention_fwd.register_fake
def _(q, k, v, bias, causal, scale, dropout_p, seed, window_left, window_right, alibi_slopes, backend):
    B, H, Lq, _ = q.shape
    return q.new_empty(B, H, Lq, v.shape[-1]), q.new_empty(B, H, Lq, dtype=compute_dtype(q))


@custom_op("attention_bwd")
def attention_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  bias: torch.Tensor | None, out: torch.Tensor, lse: torch.Tensor, causal: bool, scale: float,
                  dropout_p: float, seed: torch.Tensor | None, window_left: int, window_right: int,
                  alibi_slopes: torch.Tensor | None, bias_requires_grad: bool, backend: str
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dq, dk, dv, dbias in the bias's shape, or an empty tensor)."""
    if _no_output(q, k, v):
        dbias = torch.zeros_like(bias) if bias_requires_grad and bias is not None else q.new_empty(0)
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), dbias
    dq, dk, dv, dbias = ATTENTION.implementation(_runner(backend, q)).attention_backward(
        grad_out, q, k, v, bias, out, lse, causal, scale, dropout_p, seed,
        (window_left, window_right), alibi_slopes, bias_requires_grad)
    return dq, dk, dv, dbias if dbias is not None else q.new_empty(0)


@attention_bwd.register_fake
def _(grad_out, q, k, v, bias, out, lse, causal, scale, dropout_p, seed, window_left, window_right,
      alibi_slopes, bias_requires_grad, backend):
    dbias = bias.new_empty(bias.shape) if bias_requires_grad and bias is not None else q.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dbias


def _setup_context(ctx, inputs, output):
    q, k, v, bias, causal, scale, dropout_p, seed, wl, wr, alibi, backend = inputs
    ctx.args = (causal, scale, dropout_p)
    ctx.window = (wl, wr)
    ctx.backend = backend
    ctx.save_for_backward(q, k, v, bias, output[0], output[1], seed, alibi)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, bias, out, lse, seed, alibi = ctx.saved_tensors
    causal, scale, dropout_p = ctx.args
    bias_grad = bool(ctx.needs_input_grad[3]) and bias is not None and bias.is_floating_point()
    dq, dk, dv, dbias = call(attention_bwd, grad_out, q, k, v, bias, out, lse, causal, scale, dropout_p, seed,
                                      *ctx.window, alibi, bias_grad, ctx.backend)
    return dq, dk, dv, dbias if bias_grad else None, None, None, None, None, None, None, None, None


_attention_fwd = differentiable(attention_fwd, _setup_context, _backward)


# --------------------------------------------------------------------------------------------
# validation and layout: (..., H, L, E) tensors -> (B, H, L, E)
# --------------------------------------------------------------------------------------------


def _as_bhld(t):
    """(..., H, L, E) -> (B, H, L, E), leading dims flattened; 2-D/3-D inputs get size-1 dims."""
    while t.dim() < 4:
        t = t.unsqueeze(0)
    return t.reshape(-1, *t.shape[-3:]) if t.dim() > 4 else t


def _mask_as_4d(mask, batch_shape, H, Lq, Lk):
    """Broadcastable (..., H|1, Lq|1, Lk|1) mask -> 4-D (B|1, H|1, Lq|1, Lk|1), no copy unless a
    >4-D batch broadcasts only partly."""
    full = (*batch_shape, H, Lq, Lk)
    if mask.dim() > len(full):
        raise ValueError(f"attention: attn_mask has {mask.dim()} dims, more than the {len(full)} of the "
                         f"scores {full}")
    shape = (1,) * (len(full) - mask.dim()) + tuple(mask.shape)
    for have, want in zip(shape, full):
        if have not in (1, want):
            raise ValueError(f"attention: attn_mask of shape {tuple(mask.shape)} does not broadcast to the "
                             f"scores' shape {full} (batch..., heads, Lq, Lk)")
    mask = reshaped(mask, shape)
    nb = len(batch_shape)
    batch = shape[:nb]
    if all(b == 1 for b in batch):
        return reshaped(mask, (1, *shape[nb:]))
    if tuple(batch) != tuple(batch_shape):
        mask = mask.expand(*batch_shape, *shape[nb:])
    return mask if nb == 1 else mask.reshape(-1, *shape[nb:])


def _heads(t):
    return t.shape[-3] if t.dim() >= 3 else 1


def _output_heads(query, key, value, enable_gqa):
    """(H, Hkv): the output's heads and the key/value heads the backends read, by torch's rules.
    Without enable_gqa the head dims broadcast like any batch dim (a single kv head is read as
    such: multi-query attention without a copy). With it, query heads must be a multiple of the
    key heads and of the value heads (each repeated to match, as torch's repeat_interleave)."""
    hq, hk, hv = _heads(query), _heads(key), _heads(value)
    if not isinstance(enable_gqa, bool):
        raise TypeError(f"attention: enable_gqa must be a bool, got {type(enable_gqa).__name__}")
    if hk == hq and hv == hq:  # the common case, and broadcast_shapes costs ~25k instructions
        return hq, hq
    if enable_gqa:
        for name, h in (("key", hk), ("value", hv)):
            if h == 0 or hq % h:
                raise ValueError(f"attention: with enable_gqa, query heads ({hq}) must be a multiple of {name} "
                                 f"heads ({h})")
        return hq, hk if hk == hv else hq
    try:
        (H,) = torch.broadcast_shapes((hq,), (hk,), (hv,))
    except RuntimeError:
        raise ValueError(f"attention: query has {hq} heads but key/value have {hk}/{hv}, which do not broadcast; "
                         "pass enable_gqa=True for grouped-query attention") from None
    return H, 1 if hk == hv == 1 else H


def _batch_shape(query, key, value):
    """The broadcast of the three tensors' dims before (heads, L, E), as torch's matmuls broadcast them."""
    batch = query.shape[:-3]
    if key.shape[:-3] == batch and value.shape[:-3] == batch:  # the common case, without broadcast_shapes
        return tuple(batch)
    try:
        return tuple(torch.broadcast_shapes(query.shape[:-3], key.shape[:-3], value.shape[:-3]))
    except RuntimeError:
        raise ValueError(f"attention: batch dims do not broadcast: query {tuple(query.shape[:-3])}, key "
                         f"{tuple(key.shape[:-3])}, value {tuple(value.shape[:-3])}") from None


def _to_heads(t, batch, heads):
    """t (..., h, L, E) as (*batch, heads, L, E): broadcast (a view) when h is 1 or ``heads``,
    else each head repeated heads // h times (enable_gqa with unequal key and value heads)."""
    h = _heads(t)
    if h not in (1, heads):
        t = t.repeat_interleave(heads // h, dim=-3)
    elif h == heads and t.shape[:-3] == batch:
        return t  # already that shape: an expand that changes nothing still costs ~15k instructions
    return t.expand(*batch, heads, *t.shape[-2:])


def _validate(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, window_size, alibi_slopes):
    """Returns (batch shape, H, Hkv) of the broadcast inputs."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        check_float(OP, name, t)
        if t.dim() < 2:
            raise ValueError(f"attention: {name} must have at least 2 dims (..., L, E), got shape {tuple(t.shape)}")
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(f"attention: attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            raise TypeError(f"attention: attn_mask has dtype {attn_mask.dtype}; expected bool (True = attend) "
                            "or a float additive mask")
    check_same_dtype(OP, "query", query, key=key, value=value)
    check_same_device(OP, "query", query, key=key, value=value, attn_mask=attn_mask, alibi_slopes=alibi_slopes)
    if query.shape[-1] != key.shape[-1]:
        raise ValueError(f"attention: query head dim {query.shape[-1]} != key head dim {key.shape[-1]}")
    if key.shape[-2] != value.shape[-2]:
        raise ValueError(f"attention: key length {key.shape[-2]} != value length {value.shape[-2]}")
    batch = _batch_shape(query, key, value)
    H, Hkv = _output_heads(query, key, value, enable_gqa)
    check_attention_options(OP, dropout_p, is_causal, scale, window_size, alibi_slopes, heads=H,
                            batch=math.prod(batch))
    return batch, H, Hkv


def _plain_call(query, key, value, dropout_p, is_causal, scale, enable_gqa):
    """Whether the call (without mask, window and ALiBi) is the common valid one: q, k, v plain
    4-D tensors of one float dtype on one device, of one batch and head dim, k and v of one length
    and head count (q's, or with enable_gqa a divisor of it), Dv = D, nothing empty, no dropout,
    is_causal a bool, scale None or a float. Told in a few attribute reads: the checks one by one
    (_validate) cost as much as torch's whole call. False sends the call through every check."""
    if not (type(key) is torch.Tensor and type(value) is torch.Tensor and type(is_causal) is bool
            and type(enable_gqa) is bool and type(dropout_p) in (float, int) and dropout_p == 0
            and (scale is None or type(scale) is float)):
        return False
    dtype, device = query.dtype, query.device
    if (dtype not in FLOAT_DTYPES or key.dtype is not dtype or value.dtype is not dtype or query.ndim != 4
            or key.ndim != 4 or value.ndim != 4 or key.device != device or value.device != device):
        return False
    (b, h, lq, d), (bk, hk, lk, dk), (bv, hv, lv, dv) = query.shape, key.shape, value.shape
    return (b == bk == bv and d == dk == dv and lk == lv and hk == hv
            and (h == hk or enable_gqa and hk > 0 and h % hk == 0)
            and b * h * lq * lk * d > 0)


def scaled_dot_product_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False, *,
                                 backend: str | None = None, window_size: tuple[int, int] | None = None,
                                 alibi_slopes: torch.Tensor | None = None) -> torch.Tensor:
    """torch.nn.functional.scaled_dot_product_attention, computed by a fusedformer backend.

    query (..., Hq, Lq, E), key (..., Hkv, Lk, E), value (..., Hkv, Lk, Ev), their leading dims
    (heads included) broadcast against each other as torch's (a 3-D query against 4-D key/value,
    one kv head for all query heads); with ``enable_gqa`` Hq is a multiple of Hkv. ``attn_mask`` is a
    bool mask (True = attend) or a float mask added to the scores, broadcastable to
    (..., Hq, Lq, Lk); a float mask that requires grad gets its gradient. ``is_causal`` keeps key
    j <= query i (top-left aligned, as torch) and may be combined with ``attn_mask``. Rows with
    no key left to attend give zeros (and zero gradients), never NaN.

    Extensions (keyword-only): ``window_size=(left, right)`` keeps i - left <= j <= i + right
    (-1: unbounded); ``alibi_slopes`` (Hq,) or (batch, Hq) adds -slope * |i - j| in-kernel.
    Dropout is drawn from Philox seeded by torch's default generator, so torch.manual_seed
    reproduces it (the mask differs from torch's own dropout stream). Returns (..., Hq, Lq, Ev) in
    the inputs' dtype.

    Backends: reference everything, any float dtype; torch on a CPU, without dropout, Ev = E; triton
    everything in float32/float16/bfloat16, head dims up to 256; cuda float16/bfloat16, head dims
    64 and 128, masks, causal and GQA (no dropout, window, ALiBi or float-mask gradient).
    """
    if type(query) is torch.Tensor and attn_mask is None and window_size is None and alibi_slopes is None:
        impl = backends.lean_choice(OP, query, backend)  # the lean path (see backends.lean_choice)
        if impl is not None and _plain_call(query, key, value, dropout_p, is_causal, scale, enable_gqa):
            try:
                return impl.attention_lean(query, key, value, is_causal,
                                           1.0 / math.sqrt(query.shape[-1]) if scale is None else scale)
            except Exception:  # refused: the full path's checks name the argument
                pass
    batch_shape, H, Hkv = _validate(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                                    window_size, alibi_slopes)
    if dropout_p == 1.0:  # torch's dropout of every weight: zeros (NaN stays NaN), zero gradients
        return scaled_dot_product_attention(query, key, value, attn_mask, 0.0, is_causal, scale, enable_gqa,
                                            backend=backend, window_size=window_size, alibi_slopes=alibi_slopes) * 0.0
    # torch's output: the broadcast shape, as many dims as the largest input (a 2-D call has no heads)
    rank = max(query.dim(), key.dim(), value.dim())
    out_shape = (*batch_shape, H, query.shape[-2], value.shape[-1])[-rank:]
    q = _as_bhld(_to_heads(query, batch_shape, H))
    k, v = (_as_bhld(_to_heads(t, batch_shape, Hkv)) for t in (key, value))
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    bias = _mask_as_4d(attn_mask, batch_shape, H, Lq, Lk) if attn_mask is not None else None
    slopes = None
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(torch.float32) if q.dtype != torch.float64 else alibi_slopes
        slopes = slopes.reshape(-1, H) if slopes.dim() == 2 else slopes
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(D) if D > 0 else 1.0
    wl, wr = window_size if window_size is not None else (-1, -1)
    dropout_p = float(dropout_p)
    # drawn on q's device and handed to the kernels as a tensor: a captured CUDA graph redraws it per replay
    seed = torch.randint(0, 2**62, (), dtype=torch.int64, device=q.device) if dropout_p > 0.0 else None
    # backends judge support on the forward's arguments; the seed's value never matters there
    args = (q, k, v, bias, is_causal, scale, dropout_p, None, (wl, wr), slopes)
    name = backends.select(OP, q.device, args, backend)
    out, _ = _attention_fwd(q, k, v, bias, is_causal, scale, dropout_p, seed, wl, wr, slopes, name)
    return reshaped(out, out_shape)

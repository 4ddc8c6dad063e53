"""ff.varlen_attention: attention over packed variable-length sequences (flash-attn's varlen layout).

Shape legend: T_q/T_k total query/key tokens of all sequences, B sequences, H query heads,
Hkv kv heads (H a multiple of Hkv), D head dim, Dv value head dim.
"""

import math

import torch

from fusedformer import backends
from fusedformer._backends.tables import VARLEN_ATTENTION
from fusedformer.ops._checks import check_attention_options, check_float, check_same_device, check_same_dtype
from fusedformer.ops._dispatch import call, custom_op, differentiable
from fusedformer.vocabulary import compute_dtype

OP = VARLEN_ATTENTION.name


@custom_op("varlen_attention_fwd")
def varlen_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                         cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, causal: bool,
                         scale: float, dropout_p: float, seed: torch.Tensor | None, window_left: int,
                         window_right: int, alibi_slopes: torch.Tensor | None, backend: str
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """q (T_q, H, D), k (T_k, Hkv, D), v (T_k, Hkv, Dv) -> (out (T_q, H, Dv), lse (H, T_q))."""
    out, lse = VARLEN_ATTENTION.implementation(backend).varlen_attention_forward(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, dropout_p,
        seed, (window_left, window_right), alibi_slopes)
    return out, lse


@varlen_attention_fwd.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, dropout_p, seed,
      window_left, window_right, alibi_slopes, backend):
    return q.new_empty(q.shape[0], q.shape[1], v.shape[-1]), q.new_empty(q.shape[1], q.shape[0], dtype=compute_dtype(q))


@custom_op("varlen_attention_bwd")
def varlen_attention_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int,
                         max_seqlen_k: int, out: torch.Tensor, lse: torch.Tensor, causal: bool, scale: float,
                         dropout_p: float, seed: torch.Tensor | None, window_left: int, window_right: int,
                         alibi_slopes: torch.Tensor | None, backend: str
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dq, dk, dv)."""
    dq, dk, dv = VARLEN_ATTENTION.implementation(backend).varlen_attention_backward(
        grad_out, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, out, lse, causal, scale,
        dropout_p, seed, (window_left, window_right), alibi_slopes)
    return dq, dk, dv


@varlen_attention_bwd.register_fake
def _(grad_out, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, out, lse, causal, scale,
      dropout_p, seed, window_left, window_right, alibi_slopes, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, dropout_p, seed, wl, wr, alibi, backend = inputs
    ctx.args = (max_q, max_k, causal, scale, dropout_p)
    ctx.window = (wl, wr)
    ctx.backend = backend
    ctx.save_for_backward(q, k, v, cu_q, cu_k, output[0], output[1], seed, alibi)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, cu_q, cu_k, out, lse, seed, alibi = ctx.saved_tensors
    max_q, max_k, causal, scale, dropout_p = ctx.args
    dq, dk, dv = call(varlen_attention_bwd, grad_out, q, k, v, cu_q, cu_k, max_q, max_k, out, lse, causal, scale,
                                      dropout_p, seed, *ctx.window, alibi, ctx.backend)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None, None, None, None


_varlen_attention_fwd = differentiable(varlen_attention_fwd, _setup_context, _backward)


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------


def _check_cu(name, cu, total, max_seqlen, max_name):
    if cu.dtype not in (torch.int32, torch.int64) or cu.dim() != 1 or cu.numel() < 1:
        raise ValueError(f"{OP}: {name} must be a 1-D int32 tensor of B + 1 offsets, got dtype {cu.dtype} and "
                         f"shape {tuple(cu.shape)}")
    if torch.compiler.is_compiling():
        return
    values = cu.tolist()
    if values[0] != 0 or values[-1] != total:
        raise ValueError(f"{OP}: {name} must start at 0 and end at the token count {total}, got "
                         f"{values[0]}..{values[-1]}")
    lengths = [b - a for a, b in zip(values, values[1:])]
    if any(n < 0 for n in lengths):
        raise ValueError(f"{OP}: {name} must be non-decreasing")
    if lengths and max(lengths) > max_seqlen:
        raise ValueError(f"{OP}: {max_name}={max_seqlen} is less than the longest sequence ({max(lengths)})")


def _validate(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, is_causal, scale, window_size, alibi_slopes):
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float(OP, name, t)
        if t.dim() != 3:
            raise ValueError(f"{OP}: {name} must be (total_tokens, heads, head_dim), got shape {tuple(t.shape)}")
    check_same_dtype(OP, "q", q, k=k, v=v)
    check_same_device(OP, "q", q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, alibi_slopes=alibi_slopes)
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"{OP}: q head dim {q.shape[-1]} != k head dim {k.shape[-1]}")
    if k.shape[:2] != v.shape[:2]:
        raise ValueError(f"{OP}: k {tuple(k.shape)} and v {tuple(v.shape)} differ in tokens or heads")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"{OP}: q heads ({q.shape[1]}) must be a multiple of k/v heads ({k.shape[1]})")
    for name, value in (("max_seqlen_q", max_q), ("max_seqlen_k", max_k)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise TypeError(f"{OP}: {name} must be a non-negative int, got {value!r}")
    _check_cu("cu_seqlens_q", cu_q, q.shape[0], max_q, "max_seqlen_q")
    _check_cu("cu_seqlens_k", cu_k, k.shape[0], max_k, "max_seqlen_k")
    if cu_q.numel() != cu_k.numel():
        raise ValueError(f"{OP}: cu_seqlens_q has {cu_q.numel()} entries but cu_seqlens_k has {cu_k.numel()}")
    check_attention_options(OP, dropout_p, is_causal, scale, window_size, alibi_slopes, heads=q.shape[1],
                            batch=cu_q.numel() - 1)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, dropout_p: float = 0.0,
                     is_causal: bool = False, scale: float | None = None, *,
                     window_size: tuple[int, int] | None = None, alibi_slopes: torch.Tensor | None = None,
                     backend: str | None = None) -> torch.Tensor:
    """Attention over packed sequences, as flash-attn's ``flash_attn_varlen_func``.

    q (total_q, H, D), k (total_k, Hkv, D), v (total_k, Hkv, Dv), H a multiple of Hkv (GQA).
    Sequence b owns q rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` and k/v rows
    ``cu_seqlens_k[b]:cu_seqlens_k[b+1]`` (int32, B + 1 entries from 0); ``max_seqlen_*`` are the
    longest lengths. Each sequence is attended on its own with scaled_dot_product_attention's
    rules (causal top-left aligned, ``window_size=(left, right)``, ``alibi_slopes`` (H,) or (B, H),
    dropout drawn with seed + b). Returns (total_q, H, Dv).

    Backends: reference and triton (as scaled_dot_product_attention); torch on a CPU, without
    dropout, Dv = D; not cuda.
    """
    _validate(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, is_causal, scale,
              window_size, alibi_slopes)
    if dropout_p == 1.0:  # every weight dropped: zeros (NaN stays NaN), zero gradients, as torch's dropout
        return varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, 0.0, is_causal,
                                scale, window_size=window_size, alibi_slopes=alibi_slopes, backend=backend) * 0.0
    D = q.shape[-1]
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(D) if D > 0 else 1.0
    wl, wr = window_size if window_size is not None else (-1, -1)
    dropout_p = float(dropout_p)
    slopes = None
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(torch.float32) if q.dtype != torch.float64 else alibi_slopes
    seed = torch.randint(0, 2**62, (), dtype=torch.int64, device=q.device) if dropout_p > 0.0 else None
    # the kernels read the offsets through a raw pointer: int32 and contiguous, as flash-attn's
    cu_q, cu_k = (cu.to(torch.int32).contiguous() for cu in (cu_seqlens_q, cu_seqlens_k))
    args = (q, k, v, cu_q, cu_k, max_seqlen_q, max_seqlen_k, is_causal, scale, dropout_p, None, (wl, wr), slopes)
    name = backends.select(OP, q.device, args, backend)
    out, _ = _varlen_attention_fwd(q, k, v, cu_q, cu_k, max_seqlen_q, max_seqlen_k, is_causal, scale, dropout_p,
                                  seed, wl, wr, slopes, name)
    return out

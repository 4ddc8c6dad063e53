"""torch attention: torch's CPU flash-attention kernel and its backward
(aten::_scaled_dot_product_flash_attention_for_cpu[_backward], what F.scaled_dot_product_attention
runs on a CPU); same contract as reference.py.

The kernel returns the log-sum-exp, so the backward reads it instead of recomputing the forward,
and nothing of size Lq x Lk is kept. It reads strided q/k/v, grouped-query heads, a float mask
broadcast over batch and heads (in q's dtype or float32) and causal together with a mask. Around it:

- a bool mask becomes an additive float mask of its own (broadcast) shape; a sliding window or
  ALiBi becomes one materialized additive mask (.., Lq, Lk): still far less than the reference,
  the other backend on a CPU, stores;
- rows with no key to attend come out of the kernel as out 0, lse 0, and so do rows whose scores
  are all NaN. Rows with lse exactly 0 are re-derived from their own scores (cheap: such rows
  are rare), giving the contract's lse -inf for empty rows and NaN out and lse for NaN rows;
- the gradient of a float mask (the kernel has none) is torch's softmax backward of the
  probabilities rebuilt from the lse: Lq x Lk, as that gradient itself is.
"""

import torch
from torch.nn.attention import SDPBackend

from fusedformer.vocabulary import attention_mask_bias, compute_dtype, expand_kv

aten = torch.ops.aten

# Whether the CPU flash kernel reads grouped-query heads: torch 2.13's does, torch 2.5's reads past
# the end of k and v. Asked once, of torch's own choice for a grouped SDPA call.
_KERNEL_READS_GQA = torch._fused_sdp_choice(torch.empty(1, 2, 1, 8), *[torch.empty(1, 1, 1, 8)] * 2,
                                            enable_gqa=True) == SDPBackend.FLASH_ATTENTION.value


def unsupported(q, k, v, bias, causal, scale, dropout_p=0.0, seed=None, window=(-1, -1), alibi_slopes=None):
    """Why torch's kernels cannot compute these forward arguments exactly, or None."""
    if q.device.type != "cpu":
        return (f"torch attention runs torch's CPU flash kernel, the one that returns the log-sum-exp the "
                f"backward needs; torch's SDPA on {q.device.type} returns none")
    if dropout_p > 0.0:
        return "dropout: torch's dropout stream is not fusedformer's Philox stream"
    if v.shape[-1] != q.shape[-1]:
        return f"torch's CPU flash kernel needs the value head dim ({v.shape[-1]}) equal to the query's ({q.shape[-1]})"
    return None


def _kernel_mask(q, k, bias, causal, window, alibi_slopes):
    """(additive mask or None, is_causal) for the kernel: everything the forward adds to the scores."""
    if tuple(window) != (-1, -1) or alibi_slopes is not None:
        # torch has no in-kernel window or ALiBi: one materialized mask carries them and causal
        mask = attention_mask_bias(q.shape[2], k.shape[2], bias, causal, window, alibi_slopes, q.device,
                                   compute_dtype(q))
        return mask, False
    if bias is None:
        return None, causal
    if bias.dtype == torch.bool:
        return torch.zeros(bias.shape, dtype=q.dtype, device=q.device).masked_fill_(~bias, float("-inf")), causal
    if bias.dtype not in (q.dtype, compute_dtype(q)):  # the kernel takes q's dtype or float32
        return bias.to(compute_dtype(q)), causal
    return bias, causal


def _fix_rows_without_scores(q, k, out, lse, mask, causal, scale):
    """Give rows the kernel wrote as empty (lse exactly 0) their contract values: lse = -inf when
    no key is allowed, out and lse NaN when the scores are NaN. In place."""
    # no zero, the common case: one reduction and one host read. count_nonzero costs half of all()
    # (10k instructions against 21k on a tiny lse) and a third of == then any()
    if lse.count_nonzero().item() == lse.numel():
        return
    suspects = lse == 0
    b, h, i = suspects.nonzero(as_tuple=True)
    cd = compute_dtype(q)
    kv_head = h // (q.shape[1] // k.shape[1])
    scores = scale * torch.einsum("nd,nkd->nk", q[b, h, i].to(cd), k[b, kv_head].to(cd))
    Lk = k.shape[2]
    if mask is not None:
        scores = scores + mask.expand(*q.shape[:3], Lk)[b, h, i].to(cd)
    if causal:
        scores = scores.masked_fill(torch.arange(Lk, device=q.device)[None, :] > i[:, None], float("-inf"))
    true_lse = torch.logsumexp(scores, dim=-1)
    empty_or_nan = torch.isneginf(true_lse) | torch.isnan(true_lse)
    b, h, i, true_lse = b[empty_or_nan], h[empty_or_nan], i[empty_or_nan], true_lse[empty_or_nan]
    lse[b, h, i] = true_lse.to(lse.dtype)
    out[b, h, i] = torch.where(torch.isnan(true_lse), float("nan"), 0.0)[:, None].to(out.dtype)


def _unit_last_stride(*tensors):
    """torch's CPU flash kernel reads the last dim as contiguous (a strided head dim gives NaN or
    garbage; F.scaled_dot_product_attention copies such inputs first): copy the ones that are not."""
    # is_contiguous() first: a third of stride(-1)'s cost, and the common case
    return [t if t is None or t.is_contiguous() or t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()
            for t in tensors]


def _kernel_kv(q, k, v):
    """k and v as the kernel can read them: repeated to q's heads where it reads no grouped heads."""
    if _KERNEL_READS_GQA or k.shape[1] == q.shape[1]:
        return k, v
    group = q.shape[1] // k.shape[1]
    return expand_kv(k, group), expand_kv(v, group)


def attention_forward(q, k, v, bias, causal, scale, dropout_p=0.0, seed=None, window=(-1, -1), alibi_slopes=None):
    reason = unsupported(q, k, v, bias, causal, scale, dropout_p, seed, window, alibi_slopes)
    if reason:
        raise ValueError(f"attention (torch): {reason}")
    mask, is_causal = _kernel_mask(q, k, bias, causal, window, alibi_slopes)
    return _flash_forward(q, k, v, mask, is_causal, scale)


def attention_lean(q, k, v, causal, scale):
    """attention_forward's out for the ops' lean call (no mask, dropout, window or ALiBi; the op
    checked the rest), without its support check: only the device is left to refuse."""
    if not q.is_cpu:
        raise ValueError(f"attention (torch): {unsupported(q, k, v, None, causal, scale)}")
    return _flash_forward(q, k, v, None, causal, scale)[0]


def _flash_forward(q, k, v, mask, is_causal, scale):
    """(out, lse) of torch's CPU flash kernel, with the contract's empty and NaN rows."""
    q, k, v, mask = _unit_last_stride(q, k, v, mask)
    # torch's Python binding: the same aten kernel as aten's op overload packet, ~20k instructions less per call
    out, lse = torch._scaled_dot_product_flash_attention_for_cpu(q, *_kernel_kv(q, k, v), 0.0, is_causal,
                                                                 attn_mask=mask, scale=scale)
    _fix_rows_without_scores(q, k, out, lse, mask, is_causal, scale)
    return out, lse


def _bias_gradient(grad_out, q, k, v, mask, is_causal, scale, bias):
    """dbias: dS = P * (dP - rowsum(dP * P)) (torch's softmax backward) summed to the bias's shape,
    with P = softmax(S) rebuilt from the scores (0 in rows with no key) and dP = dO V^T. dS is the
    one Lq x Lk tensor, as large as a full bias's gradient itself."""
    cd = compute_dtype(q)
    group = q.shape[1] // k.shape[1]
    total = attention_mask_bias(q.shape[2], k.shape[2], mask, is_causal, (-1, -1), None, q.device, cd)
    s = torch.matmul(q.to(cd), expand_kv(k.to(cd), group).transpose(-1, -2)).mul_(scale).add_(total)
    # softmax, not exp(S - lse): with scores in the hundreds, lse's rounding would enter every P
    p = torch.softmax(s, dim=-1).masked_fill_(torch.isneginf(s).all(dim=-1, keepdim=True), 0.0)
    dp = torch.matmul(grad_out.to(cd), expand_kv(v.to(cd), group).transpose(-1, -2))
    ds = torch._softmax_backward_data(dp, p, -1, cd)
    return ds.sum_to_size(bias.shape).to(bias.dtype)


def attention_backward(grad_out, q, k, v, bias, out, lse, causal, scale, dropout_p=0.0, seed=None, window=(-1, -1),
                       alibi_slopes=None, bias_requires_grad=False):
    reason = unsupported(q, k, v, bias, causal, scale, dropout_p, seed, window, alibi_slopes)
    if reason:
        raise ValueError(f"attention (torch): {reason}")
    mask, is_causal = _kernel_mask(q, k, bias, causal, window, alibi_slopes)
    grad_out, q, k, v, out, mask = _unit_last_stride(grad_out, q, k, v, out, mask)
    # the kernel's own convention for empty rows (lse 0: all probabilities exp(-inf - 0) = 0),
    # which the forward replaced by the contract's -inf
    lse = lse.masked_fill(torch.isneginf(lse), 0.0)
    kernel_k, kernel_v = _kernel_kv(q, k, v)
    dq, dk, dv = aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad_out, q, kernel_k, kernel_v, out, lse, 0.0, is_causal, attn_mask=mask, scale=scale)
    if kernel_k is not k:  # each kv head's gradient: the sum over the query heads it was repeated to
        dk, dv = (d.reshape(*k.shape[:2], -1, *k.shape[2:]).sum(2) for d in (dk, dv))
    dbias = None
    if bias_requires_grad and bias is not None and bias.dtype != torch.bool:
        dbias = _bias_gradient(grad_out, q, k, v, mask, is_causal, scale, bias)
    return dq, dk, dv, dbias

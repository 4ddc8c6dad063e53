"""Pure-PyTorch forward and backward of every op: the CPU path and the oracle of every test.

This module is the ``reference`` backend: it implements every op family's table
(``fusedformer/_backends/tables.py``) with the same names and signatures as the Triton and CUDA
backends. Backward passes are written out by hand (no autograd), so each kernel's backward is
checked against an independent derivation, and autograd of plain PyTorch checks this file in turn
(tests/test_reference.py). What the backends share with it (the activations' math, the Philox
dropout stream, the compute-dtype rule) lives in ``fusedformer.vocabulary``.

Low-precision inputs are computed in float32 and cast back, as the kernels do; float64 stays
float64, which is how the tests build their oracle.

Shape legend: B batch, H query heads, G = H // Hkv (GQA group), Lq/Lk query/key lengths,
D head dim (Dv for values), M rows, N row length, K/F GEMM inner/outer sizes.
"""

import torch

from fusedformer.vocabulary import (
    ACTIVATIONS,
    attention_dropout_keep,
    attention_mask_bias,
    compute_dtype,
    expand_kv,
    varlen_slopes,
    varlen_spans,
)

# --------------------------------------------------------------------------------------------
# softmax
# --------------------------------------------------------------------------------------------


def softmax_forward(x, dim):
    """y = exp(x - max) / sum(exp(x - max)) along ``dim``. All -inf rows give NaN, as torch."""
    xf = x.to(compute_dtype(x))
    m = xf.amax(dim=dim, keepdim=True) if xf.shape[dim] > 0 else xf.sum(dim=dim, keepdim=True)
    e = torch.exp(xf - m)
    return (e / e.sum(dim=dim, keepdim=True)).to(x.dtype)


def softmax_backward(grad_y, y, dim):
    """dx = y * (dy - sum(dy * y))."""
    yf, gf = y.to(compute_dtype(y)), grad_y.to(compute_dtype(y))
    return (yf * (gf - (gf * yf).sum(dim=dim, keepdim=True))).to(y.dtype)


# --------------------------------------------------------------------------------------------
# layer norm and RMS norm, over the last dim of a 2-D (M, N) input
# --------------------------------------------------------------------------------------------


def _add_residual(x, residual):
    """The pre-norm block's h = x + residual; h is kept in the residual's dtype."""
    if residual is None:
        return x.to(compute_dtype(x)), None
    h = x.to(compute_dtype(x)) + residual.to(compute_dtype(x))
    return h, h.to(residual.dtype)


def layer_norm_forward(x, weight, bias, eps, residual=None):
    """y = (h - mean) * rstd * weight + bias, h = x (+ residual), rstd = 1 / sqrt(var + eps).

    Returns (y, residual_out, mean, rstd): residual_out is h (None without residual), mean and
    rstd are float32 (float64 for float64 input) of shape (M,).
    """
    h, residual_out = _add_residual(x, residual)
    mean = h.mean(dim=-1)
    var = ((h - mean[:, None]) ** 2).mean(dim=-1)
    rstd = torch.rsqrt(var + eps)
    y = (h - mean[:, None]) * rstd[:, None]
    if weight is not None:
        y = y * weight.to(h.dtype)
    if bias is not None:
        y = y + bias.to(h.dtype)
    return y.to(x.dtype), residual_out, mean, rstd


def layer_norm_backward(grad_y, x, weight, bias, mean, rstd, grad_residual_out=None):
    """With xhat = (x - mean) * rstd and g = dy * weight:
    dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) (+ grad_residual_out),
    dweight = sum_rows(dy * xhat), dbias = sum_rows(dy).

    ``x`` is the normalized input: h = x + residual when the forward had a residual.
    """
    cd = compute_dtype(x)
    xf, dy = x.to(cd), grad_y.to(cd)
    xhat = (xf - mean[:, None].to(cd)) * rstd[:, None].to(cd)
    g = dy * weight.to(cd) if weight is not None else dy
    dx = rstd[:, None].to(cd) * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))
    if grad_residual_out is not None:
        dx = dx + grad_residual_out.to(cd)
    dweight = (dy * xhat).sum(0).to(weight.dtype) if weight is not None else None
    dbias = dy.sum(0).to(bias.dtype) if bias is not None else None
    return dx.to(x.dtype), dweight, dbias


def rms_norm_forward(x, weight, eps, residual=None):
    """y = h * rstd * weight, rstd = 1 / sqrt(mean(h^2) + eps). Returns (y, residual_out, rstd)."""
    h, residual_out = _add_residual(x, residual)
    rstd = torch.rsqrt((h * h).mean(dim=-1) + eps)
    y = h * rstd[:, None]
    if weight is not None:
        y = y * weight.to(h.dtype)
    return y.to(x.dtype), residual_out, rstd


def rms_norm_backward(grad_y, x, weight, rstd, grad_residual_out=None):
    """With xhat = x * rstd and g = dy * weight: dx = rstd * (g - xhat * mean(g * xhat)),
    dweight = sum_rows(dy * xhat)."""
    cd = compute_dtype(x)
    xf, dy = x.to(cd), grad_y.to(cd)
    xhat = xf * rstd[:, None].to(cd)
    g = dy * weight.to(cd) if weight is not None else dy
    dx = rstd[:, None].to(cd) * (g - xhat * (g * xhat).mean(-1, keepdim=True))
    if grad_residual_out is not None:
        dx = dx + grad_residual_out.to(cd)
    dweight = (dy * xhat).sum(0).to(weight.dtype) if weight is not None else None
    return dx.to(x.dtype), dweight


# --------------------------------------------------------------------------------------------
# linear_act: y = act(x @ W^T + b), act from vocabulary.ACTIVATIONS
# --------------------------------------------------------------------------------------------

def linear_act_forward(x, weight, bias, activation):
    """y = act(x @ weight^T + bias) for x (M, K), weight (N, K), bias (N,) or None.

    Returns (y, preact) with preact = x @ weight^T + bias (M, N) in x's dtype, saved for the
    backward. Gated activations give y of width N // 2.
    """
    cd = compute_dtype(x)
    h = x.to(cd) @ weight.to(cd).t()
    if bias is not None:
        h = h + bias.to(cd)
    return ACTIVATIONS[activation].forward(h).to(x.dtype), h.to(x.dtype)


def linear_act_backward(grad_y, x, weight, bias, preact, activation):
    """dh = act'(h) * dy; dx = dh @ weight, dweight = dh^T @ x, dbias = sum_rows(dh).

    ``preact`` may be None: it is then recomputed from x, weight and bias.
    """
    cd = compute_dtype(x)
    if preact is None:
        h = x.to(cd) @ weight.to(cd).t()
        if bias is not None:
            h = h + bias.to(cd)
    else:
        h = preact.to(cd)
    dh = ACTIVATIONS[activation].backward(grad_y.to(cd), h)
    dx = dh @ weight.to(cd)
    dweight = dh.t() @ x.to(cd)
    dbias = dh.sum(0).to(bias.dtype) if bias is not None else None
    return dx.to(x.dtype), dweight.to(weight.dtype), dbias


def feed_forward(x, w1, b1, w2, b2, activation):
    """act(x @ w1^T + b1) @ w2^T + b2, the transformer's position-wise MLP (forward only)."""
    hidden, _ = linear_act_forward(x, w1, b1, activation)
    y, _ = linear_act_forward(hidden, w2, b2, "identity")
    return y


# --------------------------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------------------------


def _attention_probs(q, k, bias, causal, scale, window, alibi_slopes):
    """Returns (s, p, lse) in the compute dtype; rows with nothing to attend get p = 0, lse = -inf."""
    cd = compute_dtype(q)
    B, H, Lq, _ = q.shape
    Lk = k.shape[2]
    k = expand_kv(k.to(cd), H // k.shape[1])
    s = scale * (q.to(cd) @ k.transpose(-1, -2))
    s = s + attention_mask_bias(Lq, Lk, bias, causal, window, alibi_slopes, q.device, cd)
    lse = torch.logsumexp(s, dim=-1) if Lk > 0 else torch.full((B, H, Lq), float("-inf"), dtype=cd, device=q.device)
    dead = torch.isneginf(lse)
    # softmax, not exp(s - lse): when every score of a row is huge (a mask row filled with
    # finfo.min), lse has no room for the log(Lk) that normalizes it and each p would be 1
    p = torch.where(dead[..., None], 0.0, torch.softmax(s, dim=-1))
    return s, p, lse


def _dropout_scale(q, k, dropout_p, seed, dropout_mask):
    """keep / (1 - p) as a (B, H, Lq, Lk) tensor, or None without dropout."""
    if dropout_p <= 0.0:
        return None
    B, H, Lq, _ = q.shape
    if dropout_mask is None:
        dropout_mask = attention_dropout_keep(int(seed), B, H, Lq, k.shape[2], dropout_p, q.device)
    return dropout_mask.to(compute_dtype(q)) / (1.0 - dropout_p)


def attention_forward(q, k, v, bias, causal, scale, dropout_p=0.0, seed=None, window=(-1, -1),
                      alibi_slopes=None, dropout_mask=None):
    """out = dropout(softmax(scale * q k^T + bias)) v, with lse = logsumexp of those scores.

    q (B, H, Lq, D); k (B, Hkv, Lk, D); v (B, Hkv, Lk, Dv); H a multiple of Hkv (GQA: query head
    h reads kv head h // (H // Hkv)). ``bias`` is None, a bool mask (True = attend) or a float
    additive bias, 4-D and broadcastable to (B, H, Lq, Lk). ``causal`` keeps j <= i (top-left
    aligned, as torch). ``window`` = (left, right) keeps i - left <= j <= i + right (-1: no
    limit). ``alibi_slopes`` (H,) or (B, H) adds -slope * |i - j|. Dropout keeps the elements
    of ``attention_dropout_keep(seed, ...)`` (or the given bool ``dropout_mask``) and scales by
    1 / (1 - p). Rows with no key to attend give 0 and lse = -inf. Returns (out, lse), lse
    float32 (float64 for float64 input) of shape (B, H, Lq).
    """
    _, p, lse = _attention_probs(q, k, bias, causal, scale, window, alibi_slopes)
    drop = _dropout_scale(q, k, dropout_p, seed, dropout_mask)
    if drop is not None:
        p = p * drop
    cd = compute_dtype(q)
    out = p @ expand_kv(v.to(cd), q.shape[1] // v.shape[1])
    return out.to(q.dtype), lse


def _sum_to_shape(t, shape):
    """Sum a (B, H, Lq, Lk) gradient over the dims a broadcast bias had as size 1."""
    dims = [d for d, n in enumerate(shape) if n == 1 and t.shape[d] != 1]
    return t.sum(dim=dims, keepdim=True) if dims else t


def attention_backward(grad_out, q, k, v, bias, out, lse, causal, scale, dropout_p=0.0, seed=None,
                       window=(-1, -1), alibi_slopes=None, bias_requires_grad=False, dropout_mask=None):
    """With P = softmax(S), Z = P * keep / (1 - p) and delta = rowsum(P * dP) (= rowsum(dO * O)):
    dV = Z^T dO, dZ = dO V^T, dP = dZ * keep / (1 - p), dS = P * (dP - delta),
    dQ = scale * dS K, dK = scale * dS^T Q, dbias = dS summed over the bias's broadcast dims.
    GQA sums dK, dV over each kv head's group. Returns (dq, dk, dv, dbias); dbias is None unless
    ``bias_requires_grad`` (a float bias only)."""
    cd = compute_dtype(q)
    B, H, Lq, _ = q.shape
    Hkv = k.shape[1]
    group = H // Hkv
    _, p, _ = _attention_probs(q, k, bias, causal, scale, window, alibi_slopes)
    drop = _dropout_scale(q, k, dropout_p, seed, dropout_mask)
    z = p * drop if drop is not None else p
    do = grad_out.to(cd)
    kx, vx = expand_kv(k.to(cd), group), expand_kv(v.to(cd), group)
    dv = z.transpose(-1, -2) @ do
    dp = do @ vx.transpose(-1, -2)
    if drop is not None:
        dp = dp * drop
    # rowsum(P * dP) = rowsum(dO * O) in exact arithmetic, but from the unrounded P: O may be bf16
    delta = (p * dp).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    dq = scale * (ds @ kx)
    dk = scale * (ds.transpose(-1, -2) @ q.to(cd))
    if group > 1:
        dk = dk.view(B, Hkv, group, *dk.shape[2:]).sum(2)
        dv = dv.view(B, Hkv, group, *dv.shape[2:]).sum(2)
    dbias = None
    if bias_requires_grad and bias is not None and bias.dtype != torch.bool:
        dbias = _sum_to_shape(ds, bias.shape).to(bias.dtype)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dbias


# --------------------------------------------------------------------------------------------
# varlen attention: packed sequences, each attended on its own
# --------------------------------------------------------------------------------------------


def varlen_attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale,
                             dropout_p=0.0, seed=None, window=(-1, -1), alibi_slopes=None):
    """Attention over packed sequences: q (total_q, H, D), k (total_k, Hkv, D), v (total_k, Hkv, Dv);
    sequence b is rows cu_seqlens_q[b]:cu_seqlens_q[b+1] of q and cu_seqlens_k[b]:cu_seqlens_k[b+1]
    of k and v (int32 (B+1,), starting at 0). Each sequence is ``attention_forward`` with batch 1,
    no bias, the same causal/window/scale, ``alibi_slopes`` (H,) or its row b of (B, H), and
    dropout seed ``seed + b``. ``max_seqlen_*`` bound the lengths (the kernels size their grids
    by them). Returns (out (total_q, H, Dv), lse (H, total_q) float32, float64 for float64)."""
    total_q, H, _ = q.shape
    out = q.new_zeros(total_q, H, v.shape[-1])
    lse = torch.full((H, total_q), float("-inf"), dtype=compute_dtype(q), device=q.device)
    for b, (qs, qe, ks, ke) in enumerate(varlen_spans(cu_seqlens_q, cu_seqlens_k)):
        if qe == qs or ke == ks:
            continue
        o, l = attention_forward(q[qs:qe].transpose(0, 1)[None], k[ks:ke].transpose(0, 1)[None],
                                 v[ks:ke].transpose(0, 1)[None], None, causal, scale, dropout_p,
                                 None if seed is None else int(seed) + b, window, varlen_slopes(alibi_slopes, b))
        out[qs:qe] = o[0].transpose(0, 1)
        lse[:, qs:qe] = l[0]
    return out, lse


def varlen_attention_backward(grad_out, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, out,
                              lse, causal, scale, dropout_p=0.0, seed=None, window=(-1, -1), alibi_slopes=None):
    """Gradients of ``varlen_attention_forward``: each sequence's ``attention_backward``.
    Returns (dq (total_q, H, D), dk (total_k, Hkv, D), dv (total_k, Hkv, Dv))."""
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for b, (qs, qe, ks, ke) in enumerate(varlen_spans(cu_seqlens_q, cu_seqlens_k)):
        if qe == qs or ke == ks:
            continue
        g = attention_backward(grad_out[qs:qe].transpose(0, 1)[None], q[qs:qe].transpose(0, 1)[None],
                               k[ks:ke].transpose(0, 1)[None], v[ks:ke].transpose(0, 1)[None], None,
                               out[qs:qe].transpose(0, 1)[None], lse[:, qs:qe][None], causal, scale, dropout_p,
                               None if seed is None else int(seed) + b, window, varlen_slopes(alibi_slopes, b))
        dq[qs:qe] = g[0][0].transpose(0, 1)
        dk[ks:ke] = g[1][0].transpose(0, 1)
        dv[ks:ke] = g[2][0].transpose(0, 1)
    return dq, dk, dv

"""MultiheadAttention: torch.nn.MultiheadAttention on ff.scaled_dot_product_attention.

Shape legend: N batch, L query length, S key length, E embed dim, H heads, D = E / H head dim.
"""

import torch
import torch.nn.functional as F

from fusedformer.ops import linear_act, scaled_dot_product_attention, softmax


def _check_mask(name, mask):
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"MultiheadAttention: {name} must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(f"MultiheadAttention: {name} has dtype {mask.dtype}; expected bool (True = NOT allowed) "
                        "or a float mask added to the scores")


def merge_masks(attn_mask_NHLS, key_padding_mask_NS, dtype):
    """torch.nn's masks (bool True = NOT allowed, or float added) -> one SDPA mask (bool True =
    attend, or float added), broadcastable to (N, H, L, S); None when there is none."""
    masks = [m for m in (attn_mask_NHLS, key_padding_mask_NS[:, None, None, :]
                         if key_padding_mask_NS is not None else None) if m is not None]
    if not masks:
        return None
    if all(m.dtype == torch.bool for m in masks):
        allowed = ~masks[0]
        for m in masks[1:]:
            allowed = allowed & ~m
        return allowed
    total = None
    for m in masks:
        m = torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, float("-inf")) \
            if m.dtype == torch.bool else m.to(dtype)
        total = m if total is None else total + m
    return total


def attention_weights(q_NHLD, k_NHSD, v_NHSD, mask, is_causal, dropout_p, training, backend):
    """The explicit path behind need_weights=True: P = softmax(q k^T / sqrt(D) + mask), out = P v.
    Rows with no key left to attend get P = 0 (and zero gradients), as in the fused kernels."""
    scale = q_NHLD.shape[-1] ** -0.5
    scores = (q_NHLD * scale) @ k_NHSD.transpose(-2, -1)
    L, S = scores.shape[-2:]
    if is_causal:
        causal = torch.ones(L, S, dtype=torch.bool, device=scores.device).tril()
        mask = causal if mask is None else (mask & causal if mask.dtype == torch.bool else
                                            mask.masked_fill(~causal, float("-inf")))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    dead = torch.isneginf(scores).all(dim=-1, keepdim=True)
    # dead rows are softmaxed as zeros, then zeroed: no NaN forward or backward
    probs = softmax(scores.masked_fill(dead, 0.0), -1, backend=backend).masked_fill(dead, 0.0)
    probs = F.dropout(probs, dropout_p, training)
    return probs @ v_NHSD, probs


class MultiheadAttention(torch.nn.MultiheadAttention):
    """Drop-in for ``torch.nn.MultiheadAttention`` (same constructor, defaults, state_dict keys,
    forward signature and returns); the attention runs as one fused ff.scaled_dot_product_attention.

        head_h = softmax(Q_h K_h^T / sqrt(D) + mask) V_h,   Q = q W_q^T + b_q, K = k W_k^T + b_k, V = v W_v^T + b_v
        out = concat(head_1, ..., head_H) W_o^T + b_o

    Masks follow torch.nn: a bool ``attn_mask`` / ``key_padding_mask`` is True where attention is
    NOT allowed (the opposite of SDPA), a float one is added to the scores. ``attn_mask`` is (L, S)
    or (N * H, L, S); ``key_padding_mask`` is (N, S). ``is_causal=True`` with no ``attn_mask``
    applies the causal mask (torch requires the mask; here it is optional), with an ``attn_mask``
    it is the hint that the mask is causal and the mask is used as given. ``need_weights=True``
    (torch's default) computes the attention explicitly and returns the weights, averaged over
    heads or per head (N, H, L, S); pass ``need_weights=False`` for the fused path. Dropout on the
    attention weights: the fused path draws it from fusedformer's Philox stream, the explicit path
    from torch's (same rate, different masks than torch.nn). Rows where every key is masked give
    zeros instead of torch's NaN.
    """

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False, add_zero_attn=False,
                 kdim=None, vdim=None, batch_first=False, device=None, dtype=None, *, backend=None):
        super().__init__(embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim, vdim, batch_first,
                         device, dtype)
        self.backend = backend

    def _project(self, query, key, value):
        E = self.embed_dim
        b = self.in_proj_bias
        b_q, b_k, b_v = b.chunk(3) if b is not None else (None, None, None)
        if self._qkv_same_embed_dim:
            if query is key and key is value:  # self-attention: one GEMM for q, k and v
                return linear_act(query, self.in_proj_weight, b, "identity", backend=self.backend).split(E, dim=-1)
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        return (linear_act(query, w_q, b_q, "identity", backend=self.backend),
                linear_act(key, w_k, b_k, "identity", backend=self.backend),
                linear_act(value, w_v, b_v, "identity", backend=self.backend))

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"MultiheadAttention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(f"MultiheadAttention: query, key and value must all be 2-D (unbatched) or 3-D, got "
                             f"{query.dim()}, {key.dim()} and {value.dim()} dims")
        _check_mask("key_padding_mask", key_padding_mask)
        _check_mask("attn_mask", attn_mask)
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        N, L, E = query.shape
        S = key.shape[1]
        H, D = self.num_heads, self.head_dim
        if E != self.embed_dim:
            raise ValueError(f"MultiheadAttention: query has {E} features, expected embed_dim={self.embed_dim}")
        if key.shape[:2] != value.shape[:2] or key.shape[0] != N:
            raise ValueError(f"MultiheadAttention: key {tuple(key.shape)} and value {tuple(value.shape)} must share "
                             f"batch and length with a batch of {N} (batch-first view)")
        if key_padding_mask is not None and tuple(key_padding_mask.shape) != (N, S):
            raise ValueError(f"MultiheadAttention: key_padding_mask has shape {tuple(key_padding_mask.shape)}, "
                             f"expected {(N, S) if batched else (S,)}")
        if attn_mask is not None:
            if attn_mask.dim() == 2 and tuple(attn_mask.shape) == (L, S):
                attn_mask = attn_mask[None, None]
            elif attn_mask.dim() == 3 and tuple(attn_mask.shape) == (N * H, L, S):
                attn_mask = attn_mask.view(N, H, L, S)
            else:
                raise ValueError(f"MultiheadAttention: attn_mask has shape {tuple(attn_mask.shape)}, expected "
                                 f"{(L, S)} or {(N * H, L, S)}")
        causal = bool(is_causal) and attn_mask is None

        q, k, v = self._project(query, key, value)
        if self.bias_k is not None:  # add_bias_kv: one learned key/value appended to the sequence
            k = torch.cat([k, self.bias_k.expand(N, 1, E)], dim=1)
            v = torch.cat([v, self.bias_v.expand(N, 1, E)], dim=1)
            attn_mask, key_padding_mask = _pad_key(attn_mask), _pad_key(key_padding_mask)
        q_NHLD = q.view(N, L, H, D).transpose(1, 2)
        # the key length spelled out: view(N, -1, ...) cannot tell it when N is 0
        k_NHSD = k.view(N, k.shape[1], H, D).transpose(1, 2)
        v_NHSD = v.view(N, v.shape[1], H, D).transpose(1, 2)
        if self.add_zero_attn:  # one all-zero key/value per head appended
            k_NHSD = torch.cat([k_NHSD, k_NHSD.new_zeros(N, H, 1, D)], dim=2)
            v_NHSD = torch.cat([v_NHSD, v_NHSD.new_zeros(N, H, 1, D)], dim=2)
            attn_mask, key_padding_mask = _pad_key(attn_mask), _pad_key(key_padding_mask)
        if causal and k_NHSD.shape[2] != L:
            raise ValueError("MultiheadAttention: is_causal without attn_mask needs as many keys as queries "
                             f"(got {L} queries, {k_NHSD.shape[2]} keys); pass the causal attn_mask")
        mask = merge_masks(attn_mask, key_padding_mask, q.dtype)
        dropout_p = self.dropout if self.training else 0.0

        weights = None
        if need_weights:
            o_NHLD, weights = attention_weights(q_NHLD, k_NHSD, v_NHSD, mask, causal, dropout_p, self.training,
                                                self.backend)
            if average_attn_weights:
                weights = weights.mean(dim=1)
        else:
            o_NHLD = scaled_dot_product_attention(q_NHLD, k_NHSD, v_NHSD, attn_mask=mask, dropout_p=dropout_p,
                                                  is_causal=causal, backend=self.backend)
        o = o_NHLD.transpose(1, 2).reshape(N, L, E)
        out = linear_act(o, self.out_proj.weight, self.out_proj.bias, "identity", backend=self.backend)
        if not batched:
            out = out.squeeze(0)
            weights = weights.squeeze(0) if weights is not None else None
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights


def _pad_key(mask):
    """One more key column that every query may attend (False / 0.0), as torch pads."""
    return F.pad(mask, (0, 1)) if mask is not None else None

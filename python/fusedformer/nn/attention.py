"""Attention: multi-head self- or cross-attention with grouped-query heads, the building block
the models use (torch.nn.MultiheadAttention's drop-in is multihead_attention.py).

Shape legend: B batch, L query length, S key length, H query heads, G key/value heads, D head dim.
"""

import torch

from fusedformer.nn.alibi import alibi_bias, alibi_slopes
from fusedformer.ops import linear_act, scaled_dot_product_attention


class Attention(torch.nn.Module):
    """Multi-head attention on ff.scaled_dot_product_attention, batch first (B, L, d_model).

        Q = x W_q^T,  K = m W_k^T,  V = m W_v^T      (m = x: self-attention; m = memory: cross-attention)
        head_h = softmax(Q_h K_g(h)^T * scale + bias + mask) V_g(h),   out = concat_h(head_h) W_o^T

    with H query heads, G = ``num_kv_heads`` key/value heads (grouped-query attention: query head h
    reads kv head g(h) = h // (H / G); G = 1 is multi-query, G = H plain multi-head), head dim D,
    ``scale`` 1/sqrt(D) by default. Options: ``cross`` (keys/values from ``memory``, of width
    ``kv_dim``), ``causal`` (query i sees keys j <= i, aligned to the end when a KV cache makes
    S > L), ``rotary`` (a RotaryEmbedding applied to Q and K),
    ``alibi`` (adds -m_h |i - j|, slopes from ``alibi_slopes``), and in forward a
    ``position_bias`` (e.g. a RelativePositionBias output) added to the scores.

    forward(x, memory=None, attn_mask=None, position_bias=None, past_key_value=None, use_cache=False)
      attn_mask: SDPA convention, bool True = attend or float added, broadcastable to (B, H, L, S);
      past_key_value: (K, V) of earlier tokens, each (B, G, S_past, D); returns (out, (K, V)) when
      use_cache, else out. Cross-attention returns the memory's K/V as its cache: pass it back as
      past_key_value and the memory is not projected again.
    Parameters: q_proj, k_proj, v_proj, o_proj (torch.nn.Linear).
    """

    def __init__(self, d_model, num_heads, num_kv_heads=None, *, head_dim=None, kv_dim=None, bias=True,
                 out_bias=None, dropout=0.0, causal=False, cross=False, scale=None, rotary=None, alibi=False,
                 backend=None, device=None, dtype=None):
        super().__init__()
        num_kv_heads = num_kv_heads or num_heads
        if num_heads % num_kv_heads:
            raise ValueError(f"Attention: num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if head_dim is None and d_model % num_heads:
            raise ValueError(f"Attention: d_model ({d_model}) is not divisible by num_heads ({num_heads})")
        head_dim = head_dim or d_model // num_heads
        factory = {"device": device, "dtype": dtype}
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.dropout, self.causal, self.cross = float(dropout), causal, cross
        self.scale, self.backend = scale, backend
        kv_dim = kv_dim or d_model
        self.q_proj = torch.nn.Linear(d_model, num_heads * head_dim, bias=bias, **factory)
        self.k_proj = torch.nn.Linear(kv_dim, num_kv_heads * head_dim, bias=bias, **factory)
        self.v_proj = torch.nn.Linear(kv_dim, num_kv_heads * head_dim, bias=bias, **factory)
        self.o_proj = torch.nn.Linear(num_heads * head_dim, d_model, bias=bias if out_bias is None else out_bias,
                                      **factory)
        self.rotary = rotary
        self.register_buffer("alibi_slopes", alibi_slopes(num_heads, device) if alibi else None, persistent=False)

    def extra_repr(self):
        return (f"num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"causal={self.causal}, cross={self.cross}, dropout={self.dropout}")

    def _proj(self, x, lin):
        return linear_act(x, lin.weight, lin.bias, "identity", backend=self.backend)

    def _heads(self, t, n):
        B, L, _ = t.shape
        return t.view(B, L, n, self.head_dim).transpose(1, 2)

    def forward(self, x, memory=None, attn_mask=None, position_bias=None, past_key_value=None, use_cache=False):
        for name, t in (("x", x), ("memory", memory)):
            if t is not None and (not isinstance(t, torch.Tensor) or t.dim() != 3):
                raise ValueError(f"Attention: {name} must be a 3-D (batch, length, features) tensor, got "
                                 f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        B, L, _ = x.shape
        q_BHLD = self._heads(self._proj(x, self.q_proj), self.num_heads)
        past_len = 0
        if self.cross and past_key_value is not None:  # the memory's keys/values, computed once
            k_BGSD, v_BGSD = past_key_value
        else:
            if self.cross and memory is None:
                raise ValueError("Attention: cross-attention needs memory= (or its cached past_key_value)")
            src = memory if self.cross else x
            k_BGSD = self._heads(self._proj(src, self.k_proj), self.num_kv_heads)
            v_BGSD = self._heads(self._proj(src, self.v_proj), self.num_kv_heads)
            if not self.cross and past_key_value is not None:
                past_len = past_key_value[0].shape[2]
            if self.rotary is not None:
                q_BHLD, k_BGSD = self.rotary(q_BHLD, k_BGSD, offset=past_len)
            if past_len:
                k_BGSD = torch.cat([past_key_value[0], k_BGSD], dim=2)
                v_BGSD = torch.cat([past_key_value[1], v_BGSD], dim=2)
        S = k_BGSD.shape[2]

        bias = _add_mask(position_bias, attn_mask)
        slopes = self.alibi_slopes
        if slopes is not None and past_len:  # the kernel's |i - j| assumes queries start at position 0
            bias = _add_mask(alibi_bias(slopes.to(q_BHLD.dtype), L, S, offset=past_len)[None], bias)
            slopes = None
        causal = self.causal and not self.cross
        window = None
        if causal and S != L:  # cached decoding: query i sits at position i + S - L
            window, causal = (-1, S - L), False
        out = scaled_dot_product_attention(
            q_BHLD, k_BGSD, v_BGSD, attn_mask=bias, dropout_p=self.dropout if self.training else 0.0,
            is_causal=causal, scale=self.scale, enable_gqa=self.num_kv_heads != self.num_heads,
            backend=self.backend, window_size=window, alibi_slopes=slopes)
        out = self._proj(out.transpose(1, 2).reshape(B, L, -1), self.o_proj)
        return (out, (k_BGSD, v_BGSD)) if use_cache else out


def _add_mask(bias, mask):
    """A float bias plus an SDPA mask (bool True = attend, or float added); either may be None."""
    if bias is None or mask is None:
        return mask if bias is None else bias
    if mask.dtype == torch.bool:
        return bias.masked_fill(~mask, float("-inf"))
    return bias + mask

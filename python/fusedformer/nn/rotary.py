"""RotaryEmbedding: rotary position embedding (RoPE) of queries and keys."""

import torch


class RotaryEmbedding(torch.nn.Module):
    """RoPE (Su et al.): rotates each pair of channels of q and k by a position-dependent angle,
    so q_i . k_j depends on i - j only. With the half-split pairing (GPT-NeoX / Llama layout),
    for position p and i < dim / 2:

        theta_i = base^(-2i / dim),  (x_i, x_{i+dim/2}) -> (x_i cos(p theta_i) - x_{i+dim/2} sin(p theta_i),
                                                            x_{i+dim/2} cos(p theta_i) + x_i sin(p theta_i))

    ``forward(q, k, offset=0)`` on the new tokens' (..., L, dim) queries and keys, at positions
    offset .. offset + L - 1 (the offset is the KV cache length during generation). Only the first
    ``dim`` channels of the head rotate; a head dim larger than ``dim`` keeps the rest (partial rotary).
    """

    def __init__(self, dim, base=10000.0):
        super().__init__()
        if dim % 2:
            raise ValueError(f"RotaryEmbedding: dim must be even, got {dim}")
        self.dim, self.base = dim, base

    def extra_repr(self):
        return f"dim={self.dim}, base={self.base}"

    def cos_sin(self, L, offset, device, dtype):
        """cos and sin of the angles p theta_i, (L, dim), in float32 (float64 for float64 inputs)."""
        cd = torch.float64 if dtype == torch.float64 else torch.float32
        inv_freq = self.base ** (-torch.arange(0, self.dim, 2, dtype=cd, device=device) / self.dim)
        angles = torch.outer(torch.arange(offset, offset + L, device=device, dtype=cd), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def rotate(self, x, cos, sin):
        rot, rest = x[..., :self.dim], x[..., self.dim:]
        a, b = rot.chunk(2, dim=-1)
        rotated = rot * cos + torch.cat([-b, a], dim=-1) * sin
        return torch.cat([rotated, rest], dim=-1) if rest.shape[-1] else rotated

    def forward(self, q, k, offset=0):
        if q.shape[-1] < self.dim:
            raise ValueError(f"RotaryEmbedding: head dim {q.shape[-1]} is smaller than the rotary dim {self.dim}")
        cos_q, sin_q = self.cos_sin(q.shape[-2], offset, q.device, q.dtype)
        cos_k, sin_k = self.cos_sin(k.shape[-2], offset, k.device, k.dtype)
        return self.rotate(q, cos_q, sin_q), self.rotate(k, cos_k, sin_k)

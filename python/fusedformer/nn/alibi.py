"""ALiBi: per-head linear distance penalties instead of positional encodings."""

import math

import torch


def alibi_slopes(num_heads, device=None, dtype=torch.float32):
    """The ALiBi slopes m_h (Press et al.): for H a power of two, m_h = 2^(-8 h / H), h = 1..H;
    otherwise the slopes of the nearest lower power of two n, then every other slope of 2n.
    Attention adds -m_h * |i - j| to head h's scores; pass the slopes to
    ``ff.scaled_dot_product_attention(..., alibi_slopes=)`` to add it inside the kernel."""
    if not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"alibi_slopes: num_heads must be a positive int, got {num_heads!r}")

    def power_of_two(n):
        start = 2.0 ** (-8.0 / n)
        return [start ** (h + 1) for h in range(n)]

    n = 2 ** math.floor(math.log2(num_heads))
    slopes = power_of_two(n)
    if n < num_heads:
        slopes += power_of_two(2 * n)[0::2][: num_heads - n]
    return torch.tensor(slopes, dtype=dtype, device=device)


def alibi_bias(slopes, Lq, Lk, offset=0):
    """The explicit (H, Lq, Lk) bias -m_h * |(i + offset) - j|: what the kernel adds, for queries
    that sit at positions offset .. offset + Lq - 1 (a KV cache)."""
    i = torch.arange(offset, offset + Lq, device=slopes.device)[:, None]
    j = torch.arange(Lk, device=slopes.device)[None, :]
    return -slopes[:, None, None] * (i - j).abs().to(slopes.dtype)

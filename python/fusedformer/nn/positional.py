"""Absolute positional encodings: the fixed sinusoidal table and a learned table."""

import math

import torch


def sinusoidal_table(num_positions, dim, base=10000.0, dtype=torch.float32, device=None):
    """The (num_positions, dim) table of "Attention Is All You Need":

        PE[p, 2i] = sin(p / base^(2i / dim)),   PE[p, 2i + 1] = cos(p / base^(2i / dim))
    """
    pos = torch.arange(num_positions, dtype=torch.float64, device=device)[:, None]
    inv_freq = torch.exp(-math.log(base) * torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim)
    table = torch.zeros(num_positions, dim, dtype=torch.float64, device=device)
    table[:, 0::2] = torch.sin(pos * inv_freq)
    table[:, 1::2] = torch.cos(pos * inv_freq[: dim // 2])
    return table.to(dtype)


class SinusoidalPositionalEncoding(torch.nn.Module):
    """x + PE[offset : offset + L] for x (..., L, dim), PE the fixed sinusoidal table (a
    non-persistent buffer: nothing in the state_dict)."""

    def __init__(self, dim, max_positions=4096, base=10000.0, device=None, dtype=None):
        super().__init__()
        self.dim, self.max_positions, self.base = dim, max_positions, base
        self.register_buffer("table", sinusoidal_table(max_positions, dim, base, dtype or torch.float32, device),
                             persistent=False)

    def extra_repr(self):
        return f"dim={self.dim}, max_positions={self.max_positions}, base={self.base}"

    def forward(self, x, offset=0):
        L = x.shape[-2]
        if offset + L > self.max_positions:
            raise ValueError(f"SinusoidalPositionalEncoding: positions up to {offset + L} exceed max_positions="
                             f"{self.max_positions}")
        return x + self.table[offset:offset + L].to(x.dtype)


class LearnedPositionalEmbedding(torch.nn.Embedding):
    """A learned table E (max_positions, dim); ``forward(x, offset=0)`` returns x + E[offset : offset + L]
    for x (..., L, dim), ``forward(position_ids=...)`` looks the given positions up."""

    def __init__(self, max_positions, dim, device=None, dtype=None):
        super().__init__(max_positions, dim, device=device, dtype=dtype)

    def forward(self, x=None, offset=0, position_ids=None):
        if position_ids is not None:
            return super().forward(position_ids)
        L = x.shape[-2]
        if offset + L > self.num_embeddings:
            raise ValueError(f"LearnedPositionalEmbedding: positions up to {offset + L} exceed max_positions="
                             f"{self.num_embeddings}")
        return x + self.weight[offset:offset + L]

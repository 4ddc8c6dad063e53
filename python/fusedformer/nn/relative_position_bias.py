"""RelativePositionBias: T5's learned, bucketed relative position bias."""

import math

import torch


def relative_position_bucket(relative_position, bidirectional=True, num_buckets=32, max_distance=128):
    """T5's bucket of relative position r = j - i (key minus query). Bidirectional: half the
    buckets for r > 0, half for r <= 0; unidirectional (causal): only r <= 0, distance -r. Of the
    buckets for one direction, the first half hold exact distances 0 .. n/2 - 1, the rest
    distances up to ``max_distance`` on a log scale:

        bucket(d) = n/2 + floor(log(d / (n/2)) / log(max_distance / (n/2)) * (n - n/2)), capped at n - 1
    """
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative_position > 0).to(torch.long) * num_buckets
        distance = relative_position.abs()
    else:
        distance = -torch.clamp(relative_position, max=0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    log_bucket = max_exact + (
        torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).to(torch.long)
    log_bucket = torch.clamp(log_bucket, max=num_buckets - 1)
    return buckets + torch.where(is_small, distance, log_bucket)


class RelativePositionBias(torch.nn.Module):
    """bias[h, i, j] = E[bucket(j - i), h]: a learned scalar per head and relative-position bucket,
    added to the attention scores (T5). ``forward(Lq, Lk, offset=0)`` -> (1, H, Lq, Lk), queries at
    positions offset .. offset + Lq - 1. Parameter: ``relative_attention_bias`` (num_buckets, H),
    the name Hugging Face's T5 uses."""

    def __init__(self, num_heads, num_buckets=32, max_distance=128, bidirectional=True, device=None, dtype=None):
        super().__init__()
        self.num_heads, self.num_buckets, self.max_distance, self.bidirectional = (
            num_heads, num_buckets, max_distance, bidirectional)
        self.relative_attention_bias = torch.nn.Embedding(num_buckets, num_heads, device=device, dtype=dtype)

    def extra_repr(self):
        return (f"num_heads={self.num_heads}, num_buckets={self.num_buckets}, max_distance={self.max_distance}, "
                f"bidirectional={self.bidirectional}")

    def forward(self, Lq, Lk, offset=0):
        device = self.relative_attention_bias.weight.device
        i = torch.arange(offset, offset + Lq, dtype=torch.long, device=device)[:, None]
        j = torch.arange(Lk, dtype=torch.long, device=device)[None, :]
        bucket = relative_position_bucket(j - i, self.bidirectional, self.num_buckets, self.max_distance)
        return self.relative_attention_bias(bucket).permute(2, 0, 1).unsqueeze(0)

"""LayerNorm: torch.nn.LayerNorm computed by ff.layer_norm."""

import torch

from fusedformer.ops import layer_norm


class LayerNorm(torch.nn.LayerNorm):
    """Drop-in for ``torch.nn.LayerNorm`` (same constructor, defaults, state_dict, extra_repr).

    Over the last ``len(normalized_shape)`` dims, with the biased variance:

        y = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias

    ``forward(x, residual=None)``: with ``residual`` it normalizes h = x + residual in one pass
    and returns ``(y, h)``, the add & norm of a transformer block (h is the new residual stream).
    ``backend`` ('reference', 'triton', 'cuda' or None for the usual selection) is passed to the op.
    """

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, bias=True, device=None, dtype=None,
                 *, backend=None):
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device, dtype)
        self.backend = backend

    def forward(self, input, residual=None):
        return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps, residual=residual,
                          backend=self.backend)

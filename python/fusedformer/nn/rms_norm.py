"""RMSNorm: torch.nn.RMSNorm computed by ff.rms_norm."""

import torch

from fusedformer.ops import rms_norm


class RMSNorm(torch.nn.RMSNorm):
    """Drop-in for ``torch.nn.RMSNorm`` (same constructor, defaults, state_dict, extra_repr).

    Over the last ``len(normalized_shape)`` dims, no mean subtracted:

        y = x / sqrt(mean(x^2) + eps) * weight,   eps = None -> float32's epsilon (float64's for float64), as torch

    ``forward(x, residual=None)``: with ``residual`` it normalizes h = x + residual in one pass
    and returns ``(y, h)``. ``backend`` is passed to the op.
    """

    def __init__(self, normalized_shape, eps=None, elementwise_affine=True, device=None, dtype=None, *,
                 backend=None):
        super().__init__(normalized_shape, eps, elementwise_affine, device, dtype)
        self.backend = backend

    def forward(self, input, residual=None):
        return rms_norm(input, self.normalized_shape, self.weight, self.eps, residual=residual,
                        backend=self.backend)

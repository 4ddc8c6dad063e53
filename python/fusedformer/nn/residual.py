"""Residual: a sublayer wrapped in a residual connection with pre- or post-normalization."""

import torch
import torch.nn.functional as F

from fusedformer.nn.layer_norm import LayerNorm
from fusedformer.nn.rms_norm import RMSNorm


class Residual(torch.nn.Module):
    """y = x + dropout(f(norm(x)))   (pre-norm, ``norm_first=True``: GPT-2, ViT, T5)
    y = norm(x + dropout(f(x)))      (post-norm, ``norm_first=False``: the original transformer, BERT)

    ``norm`` is 'layer' (LayerNorm) or 'rms' (RMSNorm), over ``d_model`` with ``eps``. The post-norm
    add & norm is one fused ff.layer_norm / ff.rms_norm(..., residual=x) call. ``forward(x, *args,
    **kwargs)`` passes the extra arguments to the sublayer; a sublayer that returns a tuple (e.g.
    attention with its KV cache) gives (y, *rest).
    """

    def __init__(self, sublayer, d_model, norm="layer", norm_first=True, eps=1e-5, dropout=0.0, bias=True, *,
                 backend=None, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        if norm == "layer":
            self.norm = LayerNorm(d_model, eps=eps, bias=bias, backend=backend, **factory)
        elif norm == "rms":
            self.norm = RMSNorm(d_model, eps=eps, backend=backend, **factory)
        else:
            raise ValueError(f"Residual: norm must be 'layer' or 'rms', got {norm!r}")
        self.sublayer, self.norm_first, self.dropout = sublayer, norm_first, float(dropout)

    def extra_repr(self):
        return f"norm_first={self.norm_first}, dropout={self.dropout}"

    def forward(self, x, *args, **kwargs):
        out = self.sublayer(self.norm(x) if self.norm_first else x, *args, **kwargs)
        out, rest = (out[0], out[1:]) if isinstance(out, tuple) else (out, ())
        out = F.dropout(out, self.dropout, self.training)
        y = x + out if self.norm_first else self.norm(out, residual=x)[0]
        return (y, *rest) if rest else y

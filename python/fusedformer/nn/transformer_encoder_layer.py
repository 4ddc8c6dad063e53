"""TransformerEncoderLayer: torch.nn.TransformerEncoderLayer on fusedformer ops."""

import torch
import torch.nn.functional as F

from fusedformer.nn.feed_forward import activation_name, mlp
from fusedformer.nn.layer_norm import LayerNorm
from fusedformer.nn.multihead_attention import MultiheadAttention


def adopt(module, cls, backend):
    """Make a torch.nn module an instance of its fusedformer subclass ``cls`` in place (the
    subclasses add only ``backend`` and override ``forward``)."""
    module.__class__ = cls
    module.backend = backend
    return module


def feed_forward_branch(layer, x):
    """FF(x) = linear2(dropout(act(linear1(x)))) of a fused encoder/decoder layer, before the
    branch's own dropout: one ff.feed_forward call where ``layer._act`` names a fused activation."""
    act = layer._act if layer._act is not None else layer.activation
    return mlp(x, layer.linear1.weight, layer.linear1.bias, layer.linear2.weight, layer.linear2.bias, act,
               layer.dropout.p, layer.training, layer.backend)


class FusedLayer:
    """What the fused encoder and decoder layers add to torch's: a ``backend`` keyword on torch's
    constructor, whose submodules ``_fuse`` then adopts, and the self-attention branch."""

    def __init__(self, d_model, nhead, dim_feedforward=2048, dropout=0.1, activation=F.relu, layer_norm_eps=1e-5,
                 batch_first=False, norm_first=False, bias=True, device=None, dtype=None, *, backend=None):
        super().__init__(d_model, nhead, dim_feedforward, dropout, activation, layer_norm_eps, batch_first,
                         norm_first, bias, device, dtype)
        self._fuse(backend)

    def _sa_block(self, x, attn_mask, key_padding_mask, is_causal=False):
        x = self.self_attn(x, x, x, attn_mask=attn_mask, key_padding_mask=key_padding_mask, need_weights=False,
                           is_causal=is_causal)[0]
        return self.dropout1(x)


class TransformerEncoderLayer(FusedLayer, torch.nn.TransformerEncoderLayer):
    """Drop-in for ``torch.nn.TransformerEncoderLayer`` (same constructor, defaults, state_dict, forward).

    Post-norm (``norm_first=False``, torch's default):
        x = norm1(x + dropout1(SelfAttn(x)));  x = norm2(x + dropout2(FF(x)))
    Pre-norm (``norm_first=True``):
        x = x + dropout1(SelfAttn(norm1(x)));  x = x + dropout2(FF(norm2(x)))
    with FF(x) = linear2(dropout(act(linear1(x)))). Every add & norm runs as one fused
    ff.layer_norm(..., residual=) call; FF is one ff.feed_forward when no dropout is drawn and the
    activation is relu/gelu (any other callable runs between two ff.linear_act GEMMs).
    """

    def _fuse(self, backend):
        """Turn torch's submodules (built, and randomly initialized, exactly as torch does) into
        their fusedformer subclasses in place: same parameters, same RNG draws as torch.nn."""
        adopt(self.self_attn, MultiheadAttention, backend)
        adopt(self.norm1, LayerNorm, backend)
        adopt(self.norm2, LayerNorm, backend)
        self.backend = backend
        self._act = activation_name(self.activation)

    def _ff_block(self, x):
        return self.dropout2(feed_forward_branch(self, x))

    def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
        x = src
        if self.norm_first:
            h = self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal)
            h, x = self.norm2(h, residual=x)  # x += attention; h = norm2(x)
            return x + self._ff_block(h)
        x = self.norm1(self._sa_block(x, src_mask, src_key_padding_mask, is_causal), residual=x)[0]
        return self.norm2(self._ff_block(x), residual=x)[0]

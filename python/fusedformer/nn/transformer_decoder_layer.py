"""TransformerDecoderLayer: torch.nn.TransformerDecoderLayer on fusedformer ops."""

import torch

from fusedformer.nn.feed_forward import activation_name
from fusedformer.nn.layer_norm import LayerNorm
from fusedformer.nn.multihead_attention import MultiheadAttention
from fusedformer.nn.transformer_encoder_layer import FusedLayer, adopt, feed_forward_branch


class TransformerDecoderLayer(FusedLayer, torch.nn.TransformerDecoderLayer):
    """Drop-in for ``torch.nn.TransformerDecoderLayer`` (same constructor, defaults, state_dict, forward).

    Post-norm (``norm_first=False``):
        x = norm1(x + SelfAttn(x));  x = norm2(x + CrossAttn(x, memory));  x = norm3(x + FF(x))
    Pre-norm (``norm_first=True``):
        x = x + SelfAttn(norm1(x));  x = x + CrossAttn(norm2(x), memory);  x = x + FF(norm3(x))
    (each sublayer output goes through its dropout before the add). Every add & norm runs as one
    fused ff.layer_norm(..., residual=) call.
    """

    def _fuse(self, backend):
        """torch's submodules -> their fusedformer subclasses in place (see TransformerEncoderLayer)."""
        for attn in (self.self_attn, self.multihead_attn):
            adopt(attn, MultiheadAttention, backend)
        for norm in (self.norm1, self.norm2, self.norm3):
            adopt(norm, LayerNorm, backend)
        self.backend = backend
        self._act = activation_name(self.activation)

    def _mha_block(self, x, mem, attn_mask, key_padding_mask, is_causal=False):
        x = self.multihead_attn(x, mem, mem, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                                is_causal=is_causal, need_weights=False)[0]
        return self.dropout2(x)

    def _ff_block(self, x):
        return self.dropout3(feed_forward_branch(self, x))

    def forward(self, tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
                memory_key_padding_mask=None, tgt_is_causal=False, memory_is_causal=False):
        x = tgt
        if self.norm_first:
            h = self._sa_block(self.norm1(x), tgt_mask, tgt_key_padding_mask, tgt_is_causal)
            h, x = self.norm2(h, residual=x)
            h = self._mha_block(h, memory, memory_mask, memory_key_padding_mask, memory_is_causal)
            h, x = self.norm3(h, residual=x)
            return x + self._ff_block(h)
        x = self.norm1(self._sa_block(x, tgt_mask, tgt_key_padding_mask, tgt_is_causal), residual=x)[0]
        x = self.norm2(self._mha_block(x, memory, memory_mask, memory_key_padding_mask, memory_is_causal),
                       residual=x)[0]
        return self.norm3(self._ff_block(x), residual=x)[0]

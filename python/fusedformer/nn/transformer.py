"""TransformerEncoder, TransformerDecoder and Transformer: the torch.nn stacks on fusedformer layers."""

import torch
import torch.nn.functional as F

from fusedformer.nn.layer_norm import LayerNorm
from fusedformer.nn.transformer_decoder_layer import TransformerDecoderLayer
from fusedformer.nn.transformer_encoder_layer import TransformerEncoderLayer, adopt


class TransformerEncoder(torch.nn.TransformerEncoder):
    """Drop-in for ``torch.nn.TransformerEncoder``: ``num_layers`` copies of ``encoder_layer`` applied
    in turn, then ``norm`` if given. Runs the layers one by one (no nested-tensor fast path: masks
    reach the fused attention as masks)."""

    def forward(self, src, mask=None, src_key_padding_mask=None, is_causal=None):
        x = src
        for layer in self.layers:
            x = layer(x, src_mask=mask, src_key_padding_mask=src_key_padding_mask, is_causal=bool(is_causal))
        return self.norm(x) if self.norm is not None else x


class TransformerDecoder(torch.nn.TransformerDecoder):
    """Drop-in for ``torch.nn.TransformerDecoder``: ``num_layers`` copies of ``decoder_layer``
    applied in turn to the target, each attending to ``memory``, then ``norm`` if given."""

    def forward(self, tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
                memory_key_padding_mask=None, tgt_is_causal=None, memory_is_causal=False):
        x = tgt
        for layer in self.layers:
            x = layer(x, memory, tgt_mask=tgt_mask, memory_mask=memory_mask, tgt_key_padding_mask=tgt_key_padding_mask,
                      memory_key_padding_mask=memory_key_padding_mask, tgt_is_causal=bool(tgt_is_causal),
                      memory_is_causal=memory_is_causal)
        return self.norm(x) if self.norm is not None else x


class Transformer(torch.nn.Transformer):
    """Drop-in for ``torch.nn.Transformer`` (same constructor, defaults, state_dict, forward): an
    encoder of ``num_encoder_layers`` TransformerEncoderLayer and a decoder of ``num_decoder_layers``
    TransformerDecoderLayer, each stack closed by a LayerNorm, all on fusedformer ops."""

    def __init__(self, d_model=512, nhead=8, num_encoder_layers=6, num_decoder_layers=6, dim_feedforward=2048,
                 dropout=0.1, activation=F.relu, custom_encoder=None, custom_decoder=None, layer_norm_eps=1e-5,
                 batch_first=False, norm_first=False, bias=True, device=None, dtype=None, *, backend=None):
        super().__init__(d_model, nhead, num_encoder_layers, num_decoder_layers, dim_feedforward, dropout,
                         activation, custom_encoder, custom_decoder, layer_norm_eps, batch_first, norm_first, bias,
                         device, dtype)
        # torch built (and initialized) its own stacks: turn them into fusedformer's in place, so a
        # seed gives the same weights as torch.nn.Transformer
        if custom_encoder is None:
            _fuse_stack(self.encoder, TransformerEncoder, TransformerEncoderLayer, backend)
        if custom_decoder is None:
            _fuse_stack(self.decoder, TransformerDecoder, TransformerDecoderLayer, backend)
        self.backend = backend


def _fuse_stack(stack, stack_cls, layer_cls, backend):
    stack.__class__ = stack_cls
    for layer in stack.layers:
        layer.__class__ = layer_cls
        layer._fuse(backend)
    if stack.norm is not None:
        adopt(stack.norm, LayerNorm, backend)

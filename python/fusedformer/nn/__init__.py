"""Drop-in modules for torch.nn and the building blocks of a transformer, on fusedformer ops.

Drop-ins (same constructor, forward, defaults, extra_repr and state_dict as torch.nn): LayerNorm,
RMSNorm, MultiheadAttention, TransformerEncoderLayer, TransformerDecoderLayer, TransformerEncoder,
TransformerDecoder, Transformer. Building blocks: Attention (self/cross, grouped-query, KV cache),
FeedForward (plain and gated), Residual (pre/post-norm), positional encodings (sinusoidal,
learned, rotary, ALiBi, T5 relative position bias). ``from_torch(module)`` gives the drop-in twin
of a torch.nn module, sharing its parameters.
"""

from fusedformer.nn.alibi import alibi_bias, alibi_slopes
from fusedformer.nn.attention import Attention
from fusedformer.nn.convert import from_torch
from fusedformer.nn.feed_forward import FeedForward
from fusedformer.nn.layer_norm import LayerNorm
from fusedformer.nn.multihead_attention import MultiheadAttention
from fusedformer.nn.positional import LearnedPositionalEmbedding, SinusoidalPositionalEncoding, sinusoidal_table
from fusedformer.nn.relative_position_bias import RelativePositionBias, relative_position_bucket
from fusedformer.nn.residual import Residual
from fusedformer.nn.rms_norm import RMSNorm
from fusedformer.nn.rotary import RotaryEmbedding
from fusedformer.nn.transformer import Transformer, TransformerDecoder, TransformerEncoder
from fusedformer.nn.transformer_decoder_layer import TransformerDecoderLayer
from fusedformer.nn.transformer_encoder_layer import TransformerEncoderLayer

__all__ = [
    "Attention",
    "FeedForward",
    "LayerNorm",
    "LearnedPositionalEmbedding",
    "MultiheadAttention",
    "RMSNorm",
    "RelativePositionBias",
    "Residual",
    "RotaryEmbedding",
    "SinusoidalPositionalEncoding",
    "Transformer",
    "TransformerDecoder",
    "TransformerDecoderLayer",
    "TransformerEncoder",
    "TransformerEncoderLayer",
    "alibi_bias",
    "alibi_slopes",
    "from_torch",
    "relative_position_bucket",
    "sinusoidal_table",
]

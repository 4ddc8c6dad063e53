"""The functional API: validation, backend dispatch, and one torch.library custom op per
forward/backward (``torch.ops.fusedformer.<op>_fwd`` / ``_bwd``), so torch.compile, export and
CUDA graphs see a single op."""

from fusedformer.ops.attention import scaled_dot_product_attention
from fusedformer.ops.feed_forward import feed_forward
from fusedformer.ops.layer_norm import layer_norm
from fusedformer.ops.linear_act import linear_act
from fusedformer.ops.rms_norm import rms_norm
from fusedformer.ops.softmax import softmax
from fusedformer.ops.varlen_attention import varlen_attention

__all__ = ["feed_forward", "layer_norm", "linear_act", "rms_norm", "scaled_dot_product_attention", "softmax",
           "varlen_attention"]

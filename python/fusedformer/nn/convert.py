"""from_torch: the fusedformer twin of a torch.nn module, sharing its parameters."""

import torch

from fusedformer.nn.feed_forward import activation_name
from fusedformer.nn.layer_norm import LayerNorm
from fusedformer.nn.multihead_attention import MultiheadAttention
from fusedformer.nn.rms_norm import RMSNorm
from fusedformer.nn.transformer import Transformer, TransformerDecoder, TransformerEncoder
from fusedformer.nn.transformer_decoder_layer import TransformerDecoderLayer
from fusedformer.nn.transformer_encoder_layer import TransformerEncoderLayer

# exact torch.nn type -> its fusedformer drop-in (subclasses of the torch types are not matched:
# they may override forward)
TWINS = {
    torch.nn.LayerNorm: LayerNorm,
    torch.nn.RMSNorm: RMSNorm,
    torch.nn.MultiheadAttention: MultiheadAttention,
    torch.nn.TransformerEncoderLayer: TransformerEncoderLayer,
    torch.nn.TransformerDecoderLayer: TransformerDecoderLayer,
    torch.nn.TransformerEncoder: TransformerEncoder,
    torch.nn.TransformerDecoder: TransformerDecoder,
    torch.nn.Transformer: Transformer,
}


def _shallow_copy(module, cls):
    """A new ``cls`` instance holding the same parameters, buffers and submodules as ``module``."""
    twin = cls.__new__(cls)
    twin.__dict__ = dict(module.__dict__)
    for registry in ("_parameters", "_buffers", "_modules"):
        twin.__dict__[registry] = dict(module.__dict__[registry])
    return twin


def from_torch(module, backend=None):
    """The fusedformer twin of ``module``: each torch.nn module of a type in ``TWINS`` becomes its
    drop-in class, anywhere in the tree. Parameters and buffers ARE the original's (no copy:
    training one trains the other); modules above a converted one are shallow copies, so
    ``module`` itself is left unchanged. A tree with nothing to convert is returned as is."""
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"from_torch: expected a torch.nn.Module, got {type(module).__name__}")
    cls = TWINS.get(type(module))
    children = {name: from_torch(child, backend) for name, child in module.named_children()}
    changed = {name: c for name, c in children.items() if c is not module._modules[name]}
    if cls is None and not changed:
        return module
    twin = _shallow_copy(module, cls or type(module))
    twin._modules.update(changed)
    if cls is not None:
        twin.backend = backend
        if isinstance(twin, (TransformerEncoderLayer, TransformerDecoderLayer)):
            twin._act = activation_name(twin.activation)
    return twin

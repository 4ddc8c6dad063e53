"""The torch.nn rule: exact torch.nn types become their fusedformer.nn drop-in subclass by a
``__class__`` swap (the subclasses add only a ``backend`` attribute and override ``forward``),
each checked against the module's own forward on random inputs shaped from its attributes."""

import torch

from fusedformer import nn as ffnn
from fusedformer.patch.verify import dtype_device, has_hooks, wrapped_forward

# exact torch.nn type -> (fusedformer drop-in subclass, op group it belongs to)
CLASS_SWAPS = {
    torch.nn.LayerNorm: (ffnn.LayerNorm, "norm"),
    torch.nn.RMSNorm: (ffnn.RMSNorm, "norm"),
    torch.nn.MultiheadAttention: (ffnn.MultiheadAttention, "attention"),
    torch.nn.TransformerEncoderLayer: (ffnn.TransformerEncoderLayer, "layer"),
    torch.nn.TransformerDecoderLayer: (ffnn.TransformerDecoderLayer, "layer"),
    torch.nn.TransformerEncoder: (ffnn.TransformerEncoder, "layer"),
    torch.nn.TransformerDecoder: (ffnn.TransformerDecoder, "layer"),
}
_LAYERS = (torch.nn.TransformerEncoderLayer, torch.nn.TransformerDecoderLayer)
_STACKS = (torch.nn.TransformerEncoder, torch.nn.TransformerDecoder)


def why_not_swap(module, ops):
    """None when ``module`` (an exact type of CLASS_SWAPS) may be swapped with ``ops`` asked
    for; '' when its op group was not asked for; else the reason it is left."""
    group = CLASS_SWAPS[type(module)][1]
    if group == "layer" and not all(o in ops for o in ("attention", "norm", "mlp")):
        return "whole-layer swap needs ops attention, norm and mlp"
    if group != "layer" and group not in ops:
        return ""
    if wrapped_forward(module):
        return "its forward is an instance attribute (a wrapper): the swapped class would never run"
    if isinstance(module, _STACKS) and any(type(layer) not in CLASS_SWAPS for layer in module.layers):
        return "its layers are not torch.nn transformer layers"
    if isinstance(module, _LAYERS):
        # the fused layer calls its norms and attention through their forwards, not __call__
        subs = [c for c in module.children() if type(c) is not torch.nn.Dropout]
        if any(has_hooks(c) for c in subs):
            return "a submodule has hooks the fused layer would skip"
        if any(wrapped_forward(c) for c in subs):
            return "a submodule's forward is an instance attribute (a wrapper) the fused layer would skip"
    return None


def swap(module, log, backend):
    """Swap ``module`` to its drop-in class (a whole layer: its attention and norms too)."""
    cls = CLASS_SWAPS[type(module)][0]
    if isinstance(module, _LAYERS):
        with log.changing(module, *module.children()):
            module.__class__ = cls
            module._fuse(backend)
    else:
        with log.changing(module):
            module.__class__ = cls
            module.backend = backend
    return cls


def swapped_submodules(module, cls):
    """The modules a swap has taken care of: a stack swaps only its own forward (its layers and
    final norm come next in the walk), a layer or a leaf everything under it."""
    return [module] if cls in (ffnn.TransformerEncoder, ffnn.TransformerDecoder) else list(module.modules())


def probe_inputs(module, gen):
    """Random (args, kwargs) for one module of the swap table, shaped from its attributes."""
    dtype, device = dtype_device(module)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device, dtype)

    if isinstance(module, (torch.nn.LayerNorm, torch.nn.RMSNorm)):
        # rows from 1e-4 to 1 in magnitude: on the small ones the epsilon decides the output
        scales = torch.logspace(-4, 0, 6).view(2, 3, *(1,) * len(module.normalized_shape))
        return (randn(2, 3, *module.normalized_shape) * scales.to(device, dtype),), {}
    layer = module.layers[0] if isinstance(module, _STACKS) else module
    if isinstance(layer, torch.nn.MultiheadAttention):
        E, batch_first = layer.embed_dim, layer.batch_first
        shape = (lambda n: (2, n)) if batch_first else (lambda n: (n, 2))
        q, k, v = randn(*shape(3), E), randn(*shape(4), layer.kdim), randn(*shape(4), layer.vdim)
        return (q, k, v), {"need_weights": False}
    E, batch_first = layer.linear1.in_features, layer.self_attn.batch_first
    x = randn(*((2, 5, E) if batch_first else (5, 2, E)))
    if isinstance(layer, torch.nn.TransformerDecoderLayer):
        return (x, randn(*((2, 4, E) if batch_first else (4, 2, E)))), {}
    return (x,), {}

"""The Hugging Face transformers adapter: the ``fusedformer`` attention function, registered
with ``transformers.AttentionInterface`` (its mask function with ``AttentionMaskInterface``) by
``register()``, and switching a model's attention implementation to it. Imports transformers
lazily: fusedformer works without it."""

import sys

import torch

from fusedformer.ops import scaled_dot_product_attention

NAME = "fusedformer"
BACKEND_ATTR = "_fusedformer_backend"  # set by ff.patch on a model's attention modules


def is_hf_model(model):
    """A transformers PreTrainedModel (checked without importing transformers)."""
    if "transformers" not in sys.modules:
        return False
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(model, PreTrainedModel)


def _position_bias_mask(position_bias, attention_mask, is_causal, Lq, Lk):
    """T5-style learned bias folded into one additive float mask (with the causal or bool mask)."""
    if attention_mask is None:
        if not is_causal:
            return position_bias
        keep = torch.ones(Lq, Lk, dtype=torch.bool, device=position_bias.device).tril()
        return position_bias.masked_fill(~keep, float("-inf"))
    if attention_mask.dtype == torch.bool:
        return position_bias.masked_fill(~attention_mask, float("-inf"))
    return position_bias + attention_mask


def fusedformer_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                                  is_causal=None, position_bias=None, **kwargs):
    """The AttentionInterface function: query (B, Hq, Lq, D), key/value (B, Hkv, Lk, D) ->
    ((B, Lq, Hq, D), None), the same semantics as transformers' ``sdpa`` function, computed by
    ff.scaled_dot_product_attention (GQA without repeating key/value heads)."""
    for name in ("softcap", "s_aux"):
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"fusedformer attention: `{name}` is not supported; use the 'eager' "
                                      "attention implementation for this model")
    if kwargs.get("cache") is not None:
        raise NotImplementedError("fusedformer attention: paged caches (continuous batching) are not supported")
    Lq, Lk = query.shape[2], key.shape[2]
    enable_gqa = query.shape[1] != key.shape[1]
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    # the mask function gives None for a pure causal (or full) pattern: causal then comes from the
    # module, and a single query (decoding) attends to every cached key
    is_causal = bool(is_causal) and attention_mask is None and Lq > 1
    if is_causal and Lk > Lq:  # prefill into an empty static cache: the slots past Lq are unused
        key, value = key[:, :, :Lq], value[:, :, :Lq]
        position_bias = position_bias[..., :Lq] if position_bias is not None else None
        Lk = Lq
    if position_bias is not None:
        attention_mask = _position_bias_mask(position_bias, attention_mask, is_causal, Lq, Lk)
        is_causal = False
    if attention_mask is not None and attention_mask.dtype != torch.bool and attention_mask.dtype != query.dtype:
        attention_mask = attention_mask.to(query.dtype)
    out = scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=float(dropout),
                                       is_causal=is_causal, scale=scaling, enable_gqa=enable_gqa,
                                       backend=getattr(module, BACKEND_ATTR, None))
    return out.transpose(1, 2).contiguous(), None


def register():
    """Make ``attn_implementation="fusedformer"`` known to transformers: register the attention
    function (and, where the version has the interface, the sdpa mask function under the same
    name: transformers drops the mask of an implementation that has no mask function).
    Idempotent. Returns None, or why this transformers version cannot take it."""
    try:
        from transformers import AttentionInterface
    except ImportError as e:
        return f"this transformers version has no AttentionInterface ({e})"
    AttentionInterface.register(NAME, fusedformer_attention_forward)
    try:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    except ImportError:  # < 4.53: masks are built by _prepare_4d_* and always reach the function
        return None
    AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    return None


def _configs(model):
    """Every config object of the model and its submodels (by identity)."""
    from transformers import PretrainedConfig

    found, todo = {}, [m.config for m in model.modules() if isinstance(getattr(m, "config", None), PretrainedConfig)]
    while todo:
        cfg = todo.pop()
        if id(cfg) in found:
            continue
        found[id(cfg)] = cfg
        for key in getattr(cfg, "sub_configs", {}) or {}:
            sub = getattr(cfg, key, None)
            if isinstance(sub, PretrainedConfig):
                todo.append(sub)
    return list(found.values())


def switch_attention(model, backend, log):
    """Route the model's attention through ``fusedformer``: every config's implementation, and
    the backend on every module that has a config, changed through the undo ``log``. Returns
    None on success, else why the attention was left as it was."""
    reason = register()
    if reason is not None:
        return reason
    can_set = getattr(type(model), "_can_set_attn_implementation", None)
    if can_set is not None and not can_set():
        return (f"{type(model).__name__} does not dispatch through transformers.AttentionInterface "
                "(custom attention), so its attention was left as it is")
    configs = _configs(model)
    if any(getattr(cfg, "attn_logit_softcapping", None) is not None for cfg in configs):
        return ("its config sets attn_logit_softcapping, which fusedformer attention does not support, so its "
                "attention was left as it is")
    for cfg in configs:
        with log.changing(cfg):
            cfg._attn_implementation_internal = NAME
    for m in model.modules():
        if hasattr(m, "config"):
            log.set(m, **{BACKEND_ATTR: backend})
    return None


def attention_implementation(model):
    return getattr(model.config, "_attn_implementation", None)

"""Helpers the model files share: Hugging Face masks to SDPA masks, weight init and import."""

import torch


def padding_mask(attention_mask, batch, length, device):
    """Hugging Face's (B, S) attention_mask (1 = token, 0 = padding) -> SDPA bool mask (B, 1, 1, S),
    True = attend; None stays None."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor or None, got {type(attention_mask).__name__}")
    if tuple(attention_mask.shape) != (batch, length):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected ({batch}, {length})")
    return attention_mask.to(device=device).bool()[:, None, None, :]


def check_ids(name, ids, vocab_size):
    if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be an int32/int64 torch.Tensor, got "
                        f"{ids.dtype if isinstance(ids, torch.Tensor) else type(ids).__name__}")
    if ids.dim() != 2:
        raise ValueError(f"{name} must be 2-D (batch, length), got shape {tuple(ids.shape)}")
    # a data-dependent check: skipped while torch.compile traces (the embedding lookup still bounds-checks)
    if not torch.compiler.is_compiling() and ids.numel() and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"{name} holds ids outside [0, {vocab_size})")


def load_mapped(model, hf_state, mapping):
    """model.load_state_dict({ours: hf_state[theirs] (or a tensor)}, strict=True)."""
    state = {ours: (hf_state[theirs] if isinstance(theirs, str) else theirs) for ours, theirs in mapping.items()}
    model.load_state_dict(state, strict=True)
    return model


def hf_dtype(hf_model):
    return next(hf_model.parameters()).dtype


def init_weights(module):
    """BERT / GPT-2 initialisation, for ``model.apply``: Linear and Embedding weights N(0, 0.02),
    Linear biases 0."""
    if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
        torch.nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, torch.nn.Linear) and module.bias is not None:
        torch.nn.init.zeros_(module.bias)


def check_generate_args(max_new_tokens, do_sample, temperature, top_k):
    """generate's length and sampling arguments (see next_token)."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if do_sample and not temperature > 0:
        raise ValueError(f"generate: temperature must be > 0, got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"generate: top_k must be a positive int or None, got {top_k!r}")


def next_token(logits, do_sample, temperature, top_k, generator):
    """(B, 1) next tokens from last-position logits (B, V): argmax, or a sample at ``temperature``
    from the ``top_k`` most likely."""
    logits = logits.float()
    if not do_sample:
        return logits.argmax(-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)

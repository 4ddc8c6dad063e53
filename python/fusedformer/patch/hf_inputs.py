"""Synthetic batches for verifying a patched Hugging Face model, built from its config: token ids
(with a right-padded row, so the padding mask is exercised, and every row ending in one <eos>,
as the eos-pooling classification heads of BART and T5 require), pixel values, decoder ids,
and multiple-choice layouts."""

import inspect

import torch


def synthetic_batches(model, batch=2, length=8, seed=0):
    """Candidate batches, the most thorough first: verification uses the first one the
    unpatched model accepts (a head may refuse separate decoder ids, or want a choices axis)."""
    cfg = model.config
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    gen = torch.Generator().manual_seed(seed)
    name = getattr(model, "main_input_name", "input_ids")
    if name == "pixel_values":
        return [{name: _pixels(cfg, batch, gen).to(device, dtype)}]
    if name != "input_ids":
        return []
    text_cfg = getattr(cfg, "text_config", None) or cfg
    length = min(length, _max_length(text_cfg))
    ids, mask = _token_ids(text_cfg, batch, length, gen)
    plain = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
    vision_cfg = getattr(cfg, "vision_config", None)
    if vision_cfg is not None:  # a text-image model (CLIP): both towers
        plain["pixel_values"] = _pixels(vision_cfg, batch, gen).to(device, dtype)
    candidates = [plain]
    if getattr(cfg, "is_encoder_decoder", False):
        decoder_ids, _ = _token_ids(text_cfg, batch, max(1, length - 2), gen)
        candidates.insert(0, {**plain, "decoder_input_ids": decoder_ids.to(device)})
    choices = {k: torch.stack([v, v.flip(0)], 1) if k != "pixel_values" else v for k, v in plain.items()}
    multiple_choice = type(model).__name__.endswith("ForMultipleChoice")
    candidates = [choices] + candidates if multiple_choice else candidates + [choices]
    if getattr(cfg, "use_cache", False) and _accepts(model.forward, "use_cache"):
        candidates = [{**c, "use_cache": False} for c in candidates]
    return candidates


def _pixels(cfg, batch, gen):
    size = getattr(cfg, "image_size", 32)
    height, width = (size, size) if isinstance(size, int) else tuple(size)[:2]
    return torch.randn(batch, getattr(cfg, "num_channels", 3), height, width, generator=gen)


def _max_length(cfg):
    return min((v for v in (getattr(cfg, k, None) for k in ("max_position_embeddings", "n_positions"))
                if isinstance(v, int) and v > 0), default=1 << 30)


def _token_ids(cfg, batch, length, gen):
    """(ids, attention mask): random non-special tokens, one <eos> ending each row's real tokens,
    the last row right-padded by a quarter with the pad token."""
    vocab = min(getattr(cfg, "vocab_size", 100) or 100, 1000)
    special = {i for k in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id")
               for i in _token_list(getattr(cfg, k, None))}
    ordinary = torch.tensor([i for i in range(vocab) if i not in special] or [0])
    ids = ordinary[torch.randint(0, len(ordinary), (batch, length), generator=gen)]
    mask = torch.ones(batch, length, dtype=torch.long)
    if length > 1:
        mask[-1, length - max(1, length // 4):] = 0
    eos = next(iter(_token_list(getattr(cfg, "eos_token_id", None))), None)
    pad = next(iter(_token_list(getattr(cfg, "pad_token_id", None))), None)
    if eos is not None and eos < vocab:
        ids[torch.arange(batch), mask.sum(1) - 1] = eos
    if pad is not None and pad < vocab:
        ids[mask == 0] = pad
    return ids, mask


def _token_list(value):
    """A config's token id field (an int, a list of ints or None) as a list of ids."""
    values = value if isinstance(value, (list, tuple)) else [value]
    return [v for v in values if isinstance(v, int) and not isinstance(v, bool) and v >= 0]


def _accepts(fn, name):
    """Whether ``fn`` takes keyword ``name``: transformers 4.x configs carry ``use_cache`` even
    for models whose forward has no such argument (BertForMaskedLM)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return True
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())

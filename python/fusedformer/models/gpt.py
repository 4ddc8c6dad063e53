"""GPT: a GPT-2 style decoder-only causal language model on fusedformer.nn, with a KV cache."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fusedformer.models._common import (
    check_generate_args,
    check_ids,
    hf_dtype,
    init_weights,
    load_mapped,
    next_token,
    padding_mask,
)
from fusedformer.models._config import ModelConfig, hf_activation
from fusedformer.nn import Attention, FeedForward, LayerNorm
from fusedformer.ops import linear_act


@dataclass(kw_only=True)
class GPTConfig(ModelConfig):
    """GPT-2's hyperparameters (Hugging Face GPT2Config names)."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # feed-forward width, 4 * n_embd when None
    activation: str = "gelu_tanh"  # GPT-2's "gelu_new"
    layer_norm_epsilon: float = 1e-5
    dropout: float = 0.1  # embeddings, attention weights and residual branches


class GPTBlock(torch.nn.Module):
    """Pre-norm block: x = x + Attn(ln_1(x)); x = x + MLP(ln_2(x)); the middle add & norm fused."""

    def __init__(self, config):
        super().__init__()
        c, b = config, config.backend
        self.ln_1 = LayerNorm(c.n_embd, eps=c.layer_norm_epsilon, backend=b)
        self.attn = Attention(c.n_embd, c.n_head, causal=True, dropout=c.dropout, backend=b)
        self.ln_2 = LayerNorm(c.n_embd, eps=c.layer_norm_epsilon, backend=b)
        self.mlp = FeedForward(c.n_embd, c.n_inner or 4 * c.n_embd, c.activation, backend=b)
        self.dropout = c.dropout

    def forward(self, x, attn_mask=None, past_key_value=None):
        a, cache = self.attn(self.ln_1(x), attn_mask=attn_mask, past_key_value=past_key_value, use_cache=True)
        h, x = self.ln_2(F.dropout(a, self.dropout, self.training), residual=x)
        return x + F.dropout(self.mlp(h), self.dropout, self.training), cache


class GPT(torch.nn.Module):
    """GPT-2: token + learned position embeddings, ``n_layer`` pre-norm causal blocks, a final
    LayerNorm and the LM head tied to the token embedding.

    forward(input_ids, attention_mask=None, past_key_values=None, use_cache=False) -> logits
    (B, L, vocab), or (logits, cache) with use_cache; ``attention_mask`` (B, S_past + L) marks
    tokens 1 and padding 0; the cache is a tuple of per-layer (K, V), each (B, H, S, D).
    Positions are S_past .. S_past + L - 1 whatever the padding, as Hugging Face's GPT-2 forward,
    unless ``position_ids`` (B, L) are given.
    """

    def __init__(self, config):
        super().__init__()
        self.config = c = config
        self.wte = torch.nn.Embedding(c.vocab_size, c.n_embd)
        self.wpe = torch.nn.Embedding(c.n_positions, c.n_embd)
        self.h = torch.nn.ModuleList(GPTBlock(c) for _ in range(c.n_layer))
        self.ln_f = LayerNorm(c.n_embd, eps=c.layer_norm_epsilon, backend=c.backend)
        self.apply(init_weights)

    def forward(self, input_ids, attention_mask=None, past_key_values=None, use_cache=False, position_ids=None):
        c = self.config
        check_ids("input_ids", input_ids, c.vocab_size)
        B, L = input_ids.shape
        past = past_key_values[0][0].shape[2] if past_key_values else 0
        if past + L > c.n_positions:
            raise ValueError(f"GPT: {past + L} positions exceed n_positions={c.n_positions}")
        if position_ids is None:
            position_ids = torch.arange(past, past + L, device=input_ids.device)
        elif position_ids.shape[-1] != L:
            raise ValueError(f"GPT: position_ids has shape {tuple(position_ids.shape)}, expected (B, {L})")
        x = F.dropout(self.wte(input_ids) + self.wpe(position_ids), c.dropout, self.training)
        mask = padding_mask(attention_mask, B, past + L, input_ids.device)
        caches = []
        for i, block in enumerate(self.h):
            x, cache = block(x, mask, past_key_values[i] if past_key_values else None)
            caches.append(cache)
        logits = linear_act(self.ln_f(x), self.wte.weight, None, "identity", backend=c.backend)
        return (logits, tuple(caches)) if use_cache else logits

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens, do_sample=False, temperature=1.0, top_k=None, attention_mask=None,
                 generator=None):
        """Append ``max_new_tokens`` tokens to ``input_ids`` (B, L), one forward per token on the KV
        cache. Greedy (argmax) by default; ``do_sample=True`` samples from softmax(logits /
        temperature), restricted to the ``top_k`` most likely tokens when given. With a left-padded
        batch, pass its ``attention_mask``: positions then count real tokens only, as Hugging Face's
        generate does. Returns (B, L + new)."""
        check_generate_args(max_new_tokens, do_sample, temperature, top_k)
        check_ids("input_ids", input_ids, self.config.vocab_size)
        if input_ids.shape[1] + max_new_tokens > self.config.n_positions:
            raise ValueError(f"generate: {input_ids.shape[1]} + {max_new_tokens} new tokens exceed n_positions="
                             f"{self.config.n_positions}")
        was_training = self.training
        self.eval()
        try:
            ids, cache, mask = input_ids, None, attention_mask
            step, pos = input_ids, None
            if mask is not None:  # padding takes no position: the first real token is at 0
                pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
            for _ in range(max_new_tokens):
                logits, cache = self(step, attention_mask=mask, past_key_values=cache, use_cache=True,
                                     position_ids=pos)
                nxt = next_token(logits[:, -1], do_sample, temperature, top_k, generator)
                ids, step = torch.cat([ids, nxt], dim=1), nxt
                if mask is not None:
                    mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
                    pos = pos[:, -1:] + 1
            return ids
        finally:
            self.train(was_training)

    @classmethod
    def from_hf(cls, hf_model, backend=None):
        """A GPT holding the weights of a Hugging Face GPT2LMHeadModel (or GPT2Model): same logits
        for the same input_ids / attention_mask. GPT-2's Conv1D weights (in, out) are transposed."""
        hf = getattr(hf_model, "transformer", hf_model)
        hc = hf.config
        head = getattr(hf_model, "lm_head", None)
        if head is not None and not torch.equal(head.weight, hf.wte.weight):
            raise ValueError("GPT.from_hf: the model's lm_head is not tied to its token embedding (wte)")
        if getattr(hc, "add_cross_attention", False):
            raise ValueError("GPT.from_hf: GPT-2 with cross-attention is not supported")
        if not hc.scale_attn_weights or hc.scale_attn_by_inverse_layer_idx or hc.reorder_and_upcast_attn:
            raise ValueError("GPT.from_hf: only GPT-2's default attention scaling 1/sqrt(head_dim) is supported")
        config = GPTConfig(vocab_size=hc.vocab_size, n_positions=hc.n_positions, n_embd=hc.n_embd, n_layer=hc.n_layer,
                           n_head=hc.n_head, n_inner=hc.n_inner,
                           activation=hf_activation("GPT", "activation_function", hc.activation_function),
                           layer_norm_epsilon=hc.layer_norm_epsilon, dropout=hc.resid_pdrop, backend=backend)
        model = cls(config).to(hf_dtype(hf))
        sd = hf.state_dict()
        E = hc.n_embd
        m = {"wte.weight": "wte.weight", "wpe.weight": "wpe.weight", "ln_f.weight": "ln_f.weight",
             "ln_f.bias": "ln_f.bias"}
        for i in range(hc.n_layer):
            p, q = f"h.{i}.", f"h.{i}."
            w_qkv, b_qkv = sd[p + "attn.c_attn.weight"].t(), sd[p + "attn.c_attn.bias"]
            for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
                m[q + f"attn.{name}.weight"] = w_qkv[j * E:(j + 1) * E].contiguous()
                m[q + f"attn.{name}.bias"] = b_qkv[j * E:(j + 1) * E]
            m[q + "attn.o_proj.weight"] = sd[p + "attn.c_proj.weight"].t().contiguous()
            m[q + "attn.o_proj.bias"] = p + "attn.c_proj.bias"
            m[q + "mlp.w1.weight"] = sd[p + "mlp.c_fc.weight"].t().contiguous()
            m[q + "mlp.w1.bias"] = p + "mlp.c_fc.bias"
            m[q + "mlp.w2.weight"] = sd[p + "mlp.c_proj.weight"].t().contiguous()
            m[q + "mlp.w2.bias"] = p + "mlp.c_proj.bias"
            for ln in ("ln_1", "ln_2"):
                m[q + f"{ln}.weight"], m[q + f"{ln}.bias"] = p + f"{ln}.weight", p + f"{ln}.bias"
        return load_mapped(model, sd, m).train(hf_model.training)

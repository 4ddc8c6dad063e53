"""T5: the encoder-decoder transformer with RMS norms, relative position bias and (v1.1) gated GELU."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fusedformer.models._common import check_generate_args, check_ids, hf_dtype, load_mapped, next_token, padding_mask
from fusedformer.models._config import ModelConfig
from fusedformer.nn import Attention, FeedForward, RelativePositionBias, RMSNorm
from fusedformer.ops import linear_act

# Hugging Face's feed_forward_proj -> FeedForward's activation
_FF_ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "gated-gelu": "geglu_tanh", "gated-relu": "reglu",
                   "gated-silu": "swiglu", "silu": "silu", "gelu_new": "gelu_tanh", "gated-gelu_new": "geglu_tanh"}


@dataclass(kw_only=True)
class T5Config(ModelConfig):
    """T5's hyperparameters (Hugging Face T5Config names). ``feed_forward_proj`` 'relu' is T5,
    'gated-gelu' T5 v1.1 / Flan-T5 (tanh-GELU gate)."""

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_decoder_layers: int | None = None
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.1
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"
    tie_word_embeddings: bool = True
    scale_decoder_outputs: bool = True  # multiply by d_model^-0.5 before the (tied) LM head
    decoder_start_token_id: int = 0
    pad_token_id: int = 0  # what generate writes after a sequence's eos


class T5Block(torch.nn.Module):
    """Pre-norm (RMSNorm) block: x = x + SelfAttn(n(x)) [+ CrossAttn(n(x), memory)] + FF(n(x)),
    each add & the following norm fused. Attention is unscaled (T5 folds 1/sqrt(d) into init)."""

    def __init__(self, c, decoder):
        super().__init__()
        b = c.backend

        def norm():
            return RMSNorm(c.d_model, eps=c.layer_norm_epsilon, backend=b)

        def attn(cross=False):
            return Attention(c.d_model, c.num_heads, head_dim=c.d_kv, bias=False, scale=1.0, dropout=c.dropout_rate,
                             causal=decoder and not cross, cross=cross, backend=b)

        self.ln_self, self.self_attn = norm(), attn()
        self.ln_cross, self.cross_attn = (norm(), attn(cross=True)) if decoder else (None, None)
        self.ln_ff = norm()
        if c.feed_forward_proj not in _FF_ACTIVATIONS:
            raise ValueError(f"T5: unsupported feed_forward_proj {c.feed_forward_proj!r}; choose one of "
                             f"{tuple(_FF_ACTIVATIONS)}")
        self.ff = FeedForward(c.d_model, c.d_ff, _FF_ACTIVATIONS[c.feed_forward_proj], bias=False,
                              dropout=c.dropout_rate, backend=b)
        self.dropout = c.dropout_rate

    def forward(self, x, mask, position_bias, memory=None, memory_mask=None, past=None, use_cache=False):
        """``past``: this block's (self-attention K/V, cross-attention K/V) cache or None; with
        ``use_cache`` returns (x, the updated cache)."""
        def drop(t):
            return F.dropout(t, self.dropout, self.training)

        self_past, cross_past = past if past is not None else (None, None)
        h, self_kv = self.self_attn(self.ln_self(x), attn_mask=mask, position_bias=position_bias,
                                    past_key_value=self_past, use_cache=True)
        cross_kv = None
        if self.cross_attn is not None:
            h, x = self.ln_cross(drop(h), residual=x)
            h, cross_kv = self.cross_attn(h, memory=memory, attn_mask=memory_mask, past_key_value=cross_past,
                                          use_cache=True)
        h, x = self.ln_ff(drop(h), residual=x)
        x = x + drop(self.ff(h))
        return (x, (self_kv, cross_kv)) if use_cache else x


class T5Stack(torch.nn.Module):
    """Embedded tokens -> blocks sharing one relative position bias -> final RMSNorm."""

    def __init__(self, c, decoder):
        super().__init__()
        n = (c.num_decoder_layers or c.num_layers) if decoder else c.num_layers
        self.relative_bias = RelativePositionBias(c.num_heads, c.relative_attention_num_buckets,
                                                  c.relative_attention_max_distance, bidirectional=not decoder)
        self.blocks = torch.nn.ModuleList(T5Block(c, decoder) for _ in range(n))
        self.ln_f = RMSNorm(c.d_model, eps=c.layer_norm_epsilon, backend=c.backend)
        self.dropout = c.dropout_rate

    def forward(self, x, mask, memory=None, memory_mask=None, past_key_values=None, use_cache=False):
        """``past_key_values``: one cache per block (from an earlier use_cache call) or None; the
        new queries then sit at positions past .. past + L - 1 for the relative position bias."""
        past_len = past_key_values[0][0][0].shape[2] if past_key_values else 0
        L = x.shape[1]
        bias = self.relative_bias(L, past_len + L, offset=past_len).to(x.dtype)
        x = F.dropout(x, self.dropout, self.training)
        caches = []
        for i, block in enumerate(self.blocks):
            x, cache = block(x, mask, bias, memory, memory_mask, past_key_values[i] if past_key_values else None,
                             use_cache=True)
            caches.append(cache)
        x = F.dropout(self.ln_f(x), self.dropout, self.training)
        return (x, tuple(caches)) if use_cache else x


class T5(torch.nn.Module):
    """T5: shared token embedding, an encoder stack and a causal decoder stack with
    cross-attention, relative position bias (bidirectional buckets in the encoder, causal in the
    decoder), RMSNorm, and the LM head.

    forward(input_ids, decoder_input_ids, attention_mask=None, decoder_attention_mask=None)
      -> logits (B, L_dec, vocab). ``encode`` / ``decode`` run the halves; ``decode`` takes and
    returns a KV cache (``past_key_values``, ``use_cache``) and ``generate`` decodes with it.
    """

    def __init__(self, config):
        super().__init__()
        self.config = c = config
        self.shared = torch.nn.Embedding(c.vocab_size, c.d_model)
        torch.nn.init.normal_(self.shared.weight, std=1.0)
        self.encoder = T5Stack(c, decoder=False)
        self.decoder = T5Stack(c, decoder=True)
        self.lm_head = torch.nn.Linear(c.d_model, c.vocab_size, bias=False)
        if c.tie_word_embeddings:
            self.lm_head.weight = self.shared.weight

    def encode(self, input_ids, attention_mask=None):
        check_ids("input_ids", input_ids, self.config.vocab_size)
        mask = padding_mask(attention_mask, *input_ids.shape, input_ids.device)
        return self.encoder(self.shared(input_ids), mask)

    def decode(self, decoder_input_ids, encoder_hidden_states, attention_mask=None, decoder_attention_mask=None,
               past_key_values=None, use_cache=False):
        """Decoder logits (B, L, vocab) for ``decoder_input_ids`` (B, L). With ``past_key_values``
        (the cache an earlier ``use_cache=True`` call returned) the ids continue the cached ones:
        their self-attention sees the cached keys too, cross-attention reuses the cached encoder
        keys/values, and ``decoder_attention_mask`` (if any) covers past + new tokens. With
        ``use_cache`` returns (logits, cache)."""
        c = self.config
        check_ids("decoder_input_ids", decoder_input_ids, c.vocab_size)
        if past_key_values is not None and (not isinstance(past_key_values, (tuple, list))
                                            or len(past_key_values) != len(self.decoder.blocks)):
            raise ValueError(f"T5.decode: past_key_values must be the cache of a use_cache=True call "
                             f"({len(self.decoder.blocks)} decoder blocks)")
        if not isinstance(encoder_hidden_states, torch.Tensor) or encoder_hidden_states.dim() != 3:
            raise ValueError("T5.decode: encoder_hidden_states must be a 3-D (batch, length, d_model) tensor")
        B, S = encoder_hidden_states.shape[:2]
        L = decoder_input_ids.shape[1]
        past_len = past_key_values[0][0][0].shape[2] if past_key_values else 0
        device = decoder_input_ids.device
        mask = padding_mask(decoder_attention_mask, decoder_input_ids.shape[0], past_len + L, device)
        memory_mask = padding_mask(attention_mask, B, S, device)
        h = self.decoder(self.shared(decoder_input_ids), mask, encoder_hidden_states, memory_mask,
                         past_key_values=past_key_values, use_cache=use_cache)
        if use_cache:
            h, cache = h
        if c.scale_decoder_outputs:
            h = h * c.d_model ** -0.5
        logits = linear_act(h, self.lm_head.weight, None, "identity", backend=c.backend)
        return (logits, cache) if use_cache else logits

    def forward(self, input_ids, decoder_input_ids, attention_mask=None, decoder_attention_mask=None):
        memory = self.encode(input_ids, attention_mask)
        return self.decode(decoder_input_ids, memory, attention_mask, decoder_attention_mask)

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens, attention_mask=None, do_sample=False, temperature=1.0, top_k=None,
                 decoder_start_token_id=None, eos_token_id=None, generator=None):
        """Decode up to ``max_new_tokens`` tokens for the source ``input_ids`` (B, S): the encoder
        runs once, each new token is one decoder step on the self-attention KV cache, the
        cross-attention keys/values of the encoder output are projected once and reused.
        ``attention_mask`` (B, S) marks source padding (1 = token). The decoder starts from
        ``decoder_start_token_id`` (default config.decoder_start_token_id). Greedy (argmax) by
        default; ``do_sample=True`` samples from softmax(logits / temperature), restricted to the
        ``top_k`` most likely tokens when given. With ``eos_token_id``, a sequence that emitted it
        continues with config.pad_token_id, and decoding stops once every sequence has (as
        Hugging Face's generate). Returns (B, 1 + new): the start token, then the new tokens."""
        c = self.config
        check_generate_args(max_new_tokens, do_sample, temperature, top_k)
        start = c.decoder_start_token_id if decoder_start_token_id is None else decoder_start_token_id
        for name, tok in (("decoder_start_token_id", start), ("eos_token_id", eos_token_id)):
            if tok is not None and (not isinstance(tok, int) or not 0 <= tok < c.vocab_size):
                raise ValueError(f"generate: {name} must be an int in [0, {c.vocab_size}), got {tok!r}")
        was_training = self.training
        self.eval()
        try:
            memory = self.encode(input_ids, attention_mask)
            B = input_ids.shape[0]
            ids = torch.full((B, 1), start, dtype=torch.long, device=input_ids.device)
            step, cache = ids, None
            done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
            for _ in range(max_new_tokens):
                logits, cache = self.decode(step, memory, attention_mask, past_key_values=cache, use_cache=True)
                nxt = next_token(logits[:, -1], do_sample, temperature, top_k, generator)
                if eos_token_id is not None:
                    nxt = nxt.masked_fill(done[:, None], c.pad_token_id)
                    done = done | (nxt[:, 0] == eos_token_id)
                ids, step = torch.cat([ids, nxt], dim=1), nxt
                if eos_token_id is not None and bool(done.all()):
                    break
            return ids
        finally:
            self.train(was_training)

    @classmethod
    def from_hf(cls, hf_model, backend=None):
        """A T5 holding the weights of a Hugging Face T5ForConditionalGeneration: the same logits
        for the same input_ids, decoder_input_ids and attention masks."""
        hc = hf_model.config
        tied = hf_model.lm_head.weight.data_ptr() == hf_model.shared.weight.data_ptr()
        config = T5Config(vocab_size=hc.vocab_size, d_model=hc.d_model, d_kv=hc.d_kv, d_ff=hc.d_ff,
                          num_layers=hc.num_layers, num_decoder_layers=hc.num_decoder_layers, num_heads=hc.num_heads,
                          relative_attention_num_buckets=hc.relative_attention_num_buckets,
                          relative_attention_max_distance=hc.relative_attention_max_distance,
                          dropout_rate=hc.dropout_rate, layer_norm_epsilon=hc.layer_norm_epsilon,
                          feed_forward_proj=hc.feed_forward_proj, tie_word_embeddings=tied,
                          scale_decoder_outputs=getattr(hc, "scale_decoder_outputs", tied),
                          decoder_start_token_id=getattr(hc, "decoder_start_token_id", None) or 0,
                          pad_token_id=getattr(hc, "pad_token_id", None) or 0, backend=backend)
        model = cls(config).to(hf_dtype(hf_model))
        sd = hf_model.state_dict()
        m = {"shared.weight": "shared.weight", "lm_head.weight": "lm_head.weight"}
        gated = "wi_0" in "".join(sd)
        for stack, n_blocks in (("encoder", config.num_layers), ("decoder", config.num_decoder_layers
                                                                 or config.num_layers)):
            m[f"{stack}.relative_bias.relative_attention_bias.weight"] = (
                f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
            m[f"{stack}.ln_f.weight"] = f"{stack}.final_layer_norm.weight"
            for i in range(n_blocks):
                p, q = f"{stack}.block.{i}.layer.", f"{stack}.blocks.{i}."
                parts = [("self_attn", "ln_self", "0.SelfAttention", "0.layer_norm")]
                if stack == "decoder":
                    parts.append(("cross_attn", "ln_cross", "1.EncDecAttention", "1.layer_norm"))
                for attn, ln, theirs, their_ln in parts:
                    for o, t in (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v"), ("o_proj", "o")):
                        m[f"{q}{attn}.{o}.weight"] = f"{p}{theirs}.{t}.weight"
                    m[f"{q}{ln}.weight"] = f"{p}{their_ln}.weight"
                f = f"{p}{len(parts)}."
                m[f"{q}ln_ff.weight"] = f"{f}layer_norm.weight"
                m[f"{q}ff.w1.weight"] = (torch.cat([sd[f"{f}DenseReluDense.wi_0.weight"],
                                                    sd[f"{f}DenseReluDense.wi_1.weight"]]) if gated
                                         else f"{f}DenseReluDense.wi.weight")
                m[f"{q}ff.w2.weight"] = f"{f}DenseReluDense.wo.weight"
        return load_mapped(model, sd, m).train(hf_model.training)

"""T5: the encoder-decoder transformer with RMS norms, relative position bias and (v1.1) gated GELU."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fusedformer.models._common import check_ids, hf_dtype, load_mapped, padding_mask
from fusedformer.nn import Attention, FeedForward, RelativePositionBias, RMSNorm
from fusedformer.ops import linear_act

# Hugging Face's feed_forward_proj -> FeedForward's activation
_FF_ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "gated-gelu": "geglu_tanh", "gated-relu": "reglu",
                   "gated-silu": "swiglu", "silu": "silu", "gelu_new": "gelu_tanh", "gated-gelu_new": "geglu_tanh"}


@dataclass
class T5Config:
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
    backend: str | None = None


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

    def forward(self, x, mask, position_bias, memory=None, memory_mask=None):
        def drop(t):
            return F.dropout(t, self.dropout, self.training)

        h = self.self_attn(self.ln_self(x), attn_mask=mask, position_bias=position_bias)
        if self.cross_attn is not None:
            h, x = self.ln_cross(drop(h), residual=x)
            h = self.cross_attn(h, memory=memory, attn_mask=memory_mask)
        h, x = self.ln_ff(drop(h), residual=x)
        return x + drop(self.ff(h))


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

    def forward(self, x, mask, memory=None, memory_mask=None):
        bias = self.relative_bias(x.shape[1], x.shape[1]).to(x.dtype)
        x = F.dropout(x, self.dropout, self.training)
        for block in self.blocks:
            x = block(x, mask, bias, memory, memory_mask)
        return F.dropout(self.ln_f(x), self.dropout, self.training)


class T5(torch.nn.Module):
    """T5: shared token embedding, an encoder stack and a causal decoder stack with
    cross-attention, relative position bias (bidirectional buckets in the encoder, causal in the
    decoder), RMSNorm, and the LM head.

    forward(input_ids, decoder_input_ids, attention_mask=None, decoder_attention_mask=None)
      -> logits (B, L_dec, vocab). ``encode`` / ``decode`` run the halves.
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

    def decode(self, decoder_input_ids, encoder_hidden_states, attention_mask=None, decoder_attention_mask=None):
        c = self.config
        check_ids("decoder_input_ids", decoder_input_ids, c.vocab_size)
        B, S = encoder_hidden_states.shape[:2]
        mask = padding_mask(decoder_attention_mask, *decoder_input_ids.shape, decoder_input_ids.device)
        memory_mask = padding_mask(attention_mask, B, S, decoder_input_ids.device)
        h = self.decoder(self.shared(decoder_input_ids), mask, encoder_hidden_states, memory_mask)
        if c.scale_decoder_outputs:
            h = h * c.d_model ** -0.5
        return linear_act(h, self.lm_head.weight, None, "identity", backend=c.backend)

    def forward(self, input_ids, decoder_input_ids, attention_mask=None, decoder_attention_mask=None):
        memory = self.encode(input_ids, attention_mask)
        return self.decode(decoder_input_ids, memory, attention_mask, decoder_attention_mask)

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
                          decoder_start_token_id=getattr(hc, "decoder_start_token_id", None) or 0, backend=backend)
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

"""BERT: the encoder-only transformer (post-norm) with its masked-language-model head."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fusedformer.models._common import check_ids, hf_dtype, init_weights, load_mapped, padding_mask
from fusedformer.models._config import EncoderConfig
from fusedformer.nn import Attention, FeedForward, LayerNorm
from fusedformer.ops import linear_act


@dataclass(kw_only=True)
class BertConfig(EncoderConfig):
    """BERT's hyperparameters (Hugging Face BertConfig names): EncoderConfig's and these."""

    vocab_size: int = 30522
    max_position_embeddings: int = 512
    type_vocab_size: int = 2


class BertLayer(torch.nn.Module):
    """Post-norm: x = ln_1(x + Attn(x)); x = ln_2(x + FF(x)); each add & norm one fused call."""

    def __init__(self, c):
        super().__init__()
        b = c.backend
        self.attn = Attention(c.hidden_size, c.num_attention_heads, dropout=c.attention_probs_dropout_prob, backend=b)
        self.ln_1 = LayerNorm(c.hidden_size, eps=c.layer_norm_eps, backend=b)
        self.ffn = FeedForward(c.hidden_size, c.intermediate_size, c.hidden_act, backend=b)
        self.ln_2 = LayerNorm(c.hidden_size, eps=c.layer_norm_eps, backend=b)
        self.dropout = c.hidden_dropout_prob

    def forward(self, x, mask):
        x = self.ln_1(F.dropout(self.attn(x, attn_mask=mask), self.dropout, self.training), residual=x)[0]
        return self.ln_2(F.dropout(self.ffn(x), self.dropout, self.training), residual=x)[0]


class BertMLMHead(torch.nn.Module):
    """logits = LayerNorm(act(h W_t^T + b_t)) E^T + b, E the (tied) word embedding."""

    def __init__(self, c, word_embeddings):
        super().__init__()
        self.transform = torch.nn.Linear(c.hidden_size, c.hidden_size)
        self.ln = LayerNorm(c.hidden_size, eps=c.layer_norm_eps, backend=c.backend)
        self.bias = torch.nn.Parameter(torch.zeros(c.vocab_size))
        self.act, self.backend = c.hidden_act, c.backend
        self.word_embeddings = [word_embeddings]  # a list: shared, not a second registered copy

    def forward(self, hidden):
        h = self.ln(linear_act(hidden, self.transform.weight, self.transform.bias, self.act, backend=self.backend))
        return linear_act(h, self.word_embeddings[0].weight, self.bias, "identity", backend=self.backend)


class Bert(torch.nn.Module):
    """BERT: word + position + token-type embeddings, LayerNorm, ``num_hidden_layers`` post-norm
    encoder layers.

    forward(input_ids, attention_mask=None, token_type_ids=None) -> last_hidden_state (B, L, hidden);
    ``attention_mask`` (B, L) marks tokens 1, padding 0. ``mlm_head(last_hidden_state)`` gives the
    masked-LM logits (B, L, vocab) (``mlm_logits(input_ids, ...)`` runs both), ``pool`` the pooler's
    tanh(W h_[CLS] + b).
    """

    def __init__(self, config):
        super().__init__()
        self.config = c = config
        self.word_embeddings = torch.nn.Embedding(c.vocab_size, c.hidden_size)
        self.position_embeddings = torch.nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = torch.nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.ln_embed = LayerNorm(c.hidden_size, eps=c.layer_norm_eps, backend=c.backend)
        self.layers = torch.nn.ModuleList(BertLayer(c) for _ in range(c.num_hidden_layers))
        self.pooler = torch.nn.Linear(c.hidden_size, c.hidden_size)
        self.mlm_head = BertMLMHead(c, self.word_embeddings)
        self.apply(init_weights)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        c = self.config
        check_ids("input_ids", input_ids, c.vocab_size)
        B, L = input_ids.shape
        if L > c.max_position_embeddings:
            raise ValueError(f"Bert: length {L} exceeds max_position_embeddings={c.max_position_embeddings}")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        check_ids("token_type_ids", token_type_ids, c.type_vocab_size)
        if token_type_ids.shape != input_ids.shape:
            raise ValueError(f"token_type_ids has shape {tuple(token_type_ids.shape)}, expected {(B, L)}")
        pos = self.position_embeddings.weight[:L]
        x = self.ln_embed(self.word_embeddings(input_ids), residual=self.token_type_embeddings(token_type_ids) + pos)[0]
        x = F.dropout(x, c.hidden_dropout_prob, self.training)
        mask = padding_mask(attention_mask, B, L, input_ids.device)
        for layer in self.layers:
            x = layer(x, mask)
        return x

    def mlm_logits(self, input_ids, attention_mask=None, token_type_ids=None):
        return self.mlm_head(self(input_ids, attention_mask, token_type_ids))

    def pool(self, last_hidden_state):
        return torch.tanh(linear_act(last_hidden_state[:, 0], self.pooler.weight, self.pooler.bias, "identity",
                                     backend=self.config.backend))

    @classmethod
    def from_hf(cls, hf_model, backend=None):
        """A Bert holding the weights of a Hugging Face BertModel or BertForMaskedLM: the same
        last_hidden_state (and MLM logits, pooler output where the source has them)."""
        hf = getattr(hf_model, "bert", hf_model)
        hc = hf.config
        if getattr(hc, "is_decoder", False) or getattr(hc, "add_cross_attention", False):
            raise ValueError("Bert.from_hf: only the encoder configuration is supported (is_decoder / "
                             "add_cross_attention are set)")
        if getattr(hc, "position_embedding_type", "absolute") != "absolute":
            raise ValueError("Bert.from_hf: only absolute position embeddings are supported")
        config = BertConfig.from_hf_config("Bert", hc, backend, vocab_size=hc.vocab_size,
                                           max_position_embeddings=hc.max_position_embeddings,
                                           type_vocab_size=hc.type_vocab_size)
        model = cls(config).to(hf_dtype(hf))
        sd = hf.state_dict()
        own = model.state_dict()
        m = {"word_embeddings.weight": "embeddings.word_embeddings.weight",
             "position_embeddings.weight": "embeddings.position_embeddings.weight",
             "token_type_embeddings.weight": "embeddings.token_type_embeddings.weight",
             "ln_embed.weight": "embeddings.LayerNorm.weight", "ln_embed.bias": "embeddings.LayerNorm.bias"}
        for i in range(hc.num_hidden_layers):
            p, q = f"encoder.layer.{i}.", f"layers.{i}."
            names = {"attn.q_proj": "attention.self.query", "attn.k_proj": "attention.self.key",
                     "attn.v_proj": "attention.self.value", "attn.o_proj": "attention.output.dense",
                     "ln_1": "attention.output.LayerNorm", "ffn.w1": "intermediate.dense", "ffn.w2": "output.dense",
                     "ln_2": "output.LayerNorm"}
            for ours, theirs in names.items():
                for t in ("weight", "bias"):
                    m[f"{q}{ours}.{t}"] = f"{p}{theirs}.{t}"
        has_pooler = "pooler.dense.weight" in sd
        m["pooler.weight"] = "pooler.dense.weight" if has_pooler else own["pooler.weight"]
        m["pooler.bias"] = "pooler.dense.bias" if has_pooler else own["pooler.bias"]
        head = getattr(getattr(hf_model, "cls", None), "predictions", None)
        if head is not None:
            if not torch.equal(head.decoder.weight, hf.embeddings.word_embeddings.weight):
                raise ValueError("Bert.from_hf: the MLM decoder is not tied to the word embeddings")
            hsd = {f"h.{k}": v for k, v in head.state_dict().items()}
            sd = {**sd, **hsd}
            m.update({"mlm_head.transform.weight": "h.transform.dense.weight",
                      "mlm_head.transform.bias": "h.transform.dense.bias",
                      "mlm_head.ln.weight": "h.transform.LayerNorm.weight",
                      "mlm_head.ln.bias": "h.transform.LayerNorm.bias", "mlm_head.bias": "h.bias"})
        else:
            m.update({k: v for k, v in own.items() if k.startswith("mlm_head.")})
        return load_mapped(model, sd, m).train(hf_model.training)

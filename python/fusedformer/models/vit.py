"""ViT: the vision transformer (pre-norm encoder over image patches) with a classification head."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fusedformer.models._common import hf_dtype, load_mapped
from fusedformer.models._config import EncoderConfig
from fusedformer.nn import Attention, FeedForward, LayerNorm
from fusedformer.ops import linear_act


@dataclass(kw_only=True)
class ViTConfig(EncoderConfig):
    """ViT's hyperparameters (Hugging Face ViTConfig names): EncoderConfig's and these;
    ``num_labels`` 0 means no classifier."""

    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    hidden_dropout_prob: float = 0.0  # ViTConfig's default (BertConfig's is 0.1)
    attention_probs_dropout_prob: float = 0.0
    qkv_bias: bool = True
    num_labels: int = 0


class ViTLayer(torch.nn.Module):
    """Pre-norm: x = x + Attn(ln_1(x)); x = x + MLP(ln_2(x)); the middle add & norm fused."""

    def __init__(self, c):
        super().__init__()
        b = c.backend
        self.ln_1 = LayerNorm(c.hidden_size, eps=c.layer_norm_eps, backend=b)
        self.attn = Attention(c.hidden_size, c.num_attention_heads, bias=c.qkv_bias, out_bias=True,
                              dropout=c.attention_probs_dropout_prob, backend=b)
        self.ln_2 = LayerNorm(c.hidden_size, eps=c.layer_norm_eps, backend=b)
        self.mlp = FeedForward(c.hidden_size, c.intermediate_size, c.hidden_act, backend=b)
        self.dropout = c.hidden_dropout_prob

    def forward(self, x):
        h, x = self.ln_2(F.dropout(self.attn(self.ln_1(x)), self.dropout, self.training), residual=x)
        return x + F.dropout(self.mlp(h), self.dropout, self.training)


class ViT(torch.nn.Module):
    """ViT: non-overlapping p x p patches, each flattened (C, p, p) and projected (the patch
    embedding, a Conv2d with stride p computed as one GEMM), a learned [CLS] token prepended,
    learned position embeddings added, pre-norm encoder layers, a final LayerNorm.

    forward(pixel_values (B, C, H, W), interpolate_pos_encoding=False) -> last_hidden_state
    (B, 1 + H W / p^2, hidden); ``classify(pixel_values, interpolate_pos_encoding=False)`` -> logits
    (B, num_labels) from the [CLS] token's final state. Without interpolation H = W = image_size;
    with it H and W may be any multiples of p, the patch position embeddings resized bicubically
    to the (H/p, W/p) grid (Hugging Face ViT's interpolate_pos_encoding).
    """

    def __init__(self, config):
        super().__init__()
        self.config = c = config
        if c.image_size % c.patch_size:
            raise ValueError(f"ViT: image_size {c.image_size} is not a multiple of patch_size {c.patch_size}")
        n_patches = (c.image_size // c.patch_size) ** 2
        self.patch_embed = torch.nn.Conv2d(c.num_channels, c.hidden_size, c.patch_size, stride=c.patch_size)
        self.cls_token = torch.nn.Parameter(torch.randn(1, 1, c.hidden_size) * 0.02)
        self.position_embeddings = torch.nn.Parameter(torch.randn(1, n_patches + 1, c.hidden_size) * 0.02)
        self.layers = torch.nn.ModuleList(ViTLayer(c) for _ in range(c.num_hidden_layers))
        self.ln_f = LayerNorm(c.hidden_size, eps=c.layer_norm_eps, backend=c.backend)
        self.classifier = torch.nn.Linear(c.hidden_size, c.num_labels) if c.num_labels else None

    def patchify(self, pixel_values, interpolate_pos_encoding=False):
        """(B, C, H, W) -> (B, H/p * W/p, C * p * p), rows in the Conv2d weight's (C, p, p) order.
        H = W = image_size unless ``interpolate_pos_encoding``, then any positive multiples of p."""
        c = self.config
        p = c.patch_size
        if not isinstance(pixel_values, torch.Tensor):
            raise TypeError(f"ViT: pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}")
        if pixel_values.dim() != 4:
            raise ValueError(f"ViT: pixel_values must be a 4-D (B, C, H, W) tensor, got {tuple(pixel_values.shape)}")
        shape = tuple(pixel_values.shape[1:])
        if interpolate_pos_encoding:
            H, W = shape[1:]
            if shape[0] != c.num_channels or H < p or W < p or H % p or W % p:
                raise ValueError(f"ViT: pixel_values has shape {tuple(pixel_values.shape)}, expected "
                                 f"(B, {c.num_channels}, H, W) with H and W positive multiples of patch_size {p}")
        elif shape != (c.num_channels, c.image_size, c.image_size):
            raise ValueError(f"ViT: pixel_values has shape {tuple(pixel_values.shape)}, expected "
                             f"(B, {c.num_channels}, {c.image_size}, {c.image_size}) (or pass "
                             f"interpolate_pos_encoding=True for another image size)")
        B = pixel_values.shape[0]
        x = pixel_values.unfold(2, p, p).unfold(3, p, p)  # (B, C, H/p, W/p, p, p)
        return x.permute(0, 2, 3, 1, 4, 5).reshape(B, -1, c.num_channels * p * p)

    def position_embeddings_for(self, height, width):
        """The (1, 1 + (height/p)(width/p), hidden) position embeddings for a height x width image:
        the [CLS] entry as is, the patch grid resized bicubically (align_corners=False) from
        (image_size/p)^2, in float32 at least; the stored ones when the grid is unchanged."""
        c = self.config
        side, gh, gw = c.image_size // c.patch_size, height // c.patch_size, width // c.patch_size
        pos = self.position_embeddings
        if (gh, gw) == (side, side):
            return pos
        grid = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        # the 4x4-tap weighted sums in float32 at least, so bf16/fp16 models round once, at the end
        work = torch.promote_types(grid.dtype, torch.float32)
        grid = F.interpolate(grid.to(work), size=(gh, gw), mode="bicubic", align_corners=False).to(pos.dtype)
        return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, gh * gw, -1)], dim=1)

    def forward(self, pixel_values, interpolate_pos_encoding=False):
        c = self.config
        w = self.patch_embed.weight.reshape(c.hidden_size, -1)
        patches = self.patchify(pixel_values, interpolate_pos_encoding)
        x = linear_act(patches, w, self.patch_embed.bias, "identity", backend=c.backend)
        pos = (self.position_embeddings_for(*pixel_values.shape[2:]) if interpolate_pos_encoding
               else self.position_embeddings)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + pos
        x = F.dropout(x, c.hidden_dropout_prob, self.training)
        for layer in self.layers:
            x = layer(x)
        return self.ln_f(x)

    def classify(self, pixel_values, interpolate_pos_encoding=False):
        if self.classifier is None:
            raise ValueError("ViT.classify: this ViT has no classifier (config.num_labels is 0)")
        h = self(pixel_values, interpolate_pos_encoding)[:, 0]
        return linear_act(h, self.classifier.weight, self.classifier.bias, "identity", backend=self.config.backend)

    @classmethod
    def from_hf(cls, hf_model, backend=None):
        """A ViT holding the weights of a Hugging Face ViTModel (last_hidden_state) or
        ViTForImageClassification (logits through ``classify``)."""
        hf = getattr(hf_model, "vit", hf_model)
        hc = hf.config
        head = getattr(hf_model, "classifier", None)
        head = head if isinstance(head, torch.nn.Linear) else None
        config = ViTConfig.from_hf_config("ViT", hc, backend, image_size=hc.image_size, patch_size=hc.patch_size,
                                          num_channels=hc.num_channels, qkv_bias=hc.qkv_bias,
                                          num_labels=head.out_features if head is not None else 0)
        model = cls(config).to(hf_dtype(hf))
        sd = dict(hf.state_dict())
        m = {"patch_embed.weight": "embeddings.patch_embeddings.projection.weight",
             "patch_embed.bias": "embeddings.patch_embeddings.projection.bias",
             "cls_token": "embeddings.cls_token", "position_embeddings": "embeddings.position_embeddings",
             "ln_f.weight": "layernorm.weight", "ln_f.bias": "layernorm.bias"}
        if head is not None:
            sd["classifier.weight"], sd["classifier.bias"] = head.weight, head.bias
            m["classifier.weight"], m["classifier.bias"] = "classifier.weight", "classifier.bias"
        # transformers >= 5 names layers.{i}.attention.q_proj / mlp.fc1; earlier versions
        # encoder.layer.{i}.attention.attention.query / intermediate.dense
        if any(k.startswith("layers.") for k in sd):
            prefix = "layers"
            names = {"ln_1": "layernorm_before", "attn.q_proj": "attention.q_proj", "attn.k_proj": "attention.k_proj",
                     "attn.v_proj": "attention.v_proj", "attn.o_proj": "attention.o_proj", "ln_2": "layernorm_after",
                     "mlp.w1": "mlp.fc1", "mlp.w2": "mlp.fc2"}
        else:
            prefix = "encoder.layer"
            names = {"ln_1": "layernorm_before", "attn.q_proj": "attention.attention.query",
                     "attn.k_proj": "attention.attention.key", "attn.v_proj": "attention.attention.value",
                     "attn.o_proj": "attention.output.dense", "ln_2": "layernorm_after",
                     "mlp.w1": "intermediate.dense", "mlp.w2": "output.dense"}
        for i in range(hc.num_hidden_layers):
            for ours, theirs in names.items():
                for t in ("weight", "bias"):
                    key = f"{prefix}.{i}.{theirs}.{t}"
                    if key in sd:
                        m[f"layers.{i}.{ours}.{t}"] = key
        return load_mapped(model, sd, m).train(hf_model.training)

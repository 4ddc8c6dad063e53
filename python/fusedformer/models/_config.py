"""The config fields the models share and their reading from Hugging Face configs.

Every config is keyword-only: its fields are Hugging Face's names for the same model, and a
shared base puts the common ones first, so a positional call would bind the wrong field.
"""

import dataclasses

# Hugging Face activation names -> fusedformer's (GPT-2's "gelu_new" is the tanh approximation)
HF_ACTIVATIONS = {"gelu": "gelu", "relu": "relu", "silu": "silu", "gelu_new": "gelu_tanh",
                  "gelu_pytorch_tanh": "gelu_tanh"}


@dataclasses.dataclass(kw_only=True)
class ModelConfig:
    """What every model's config holds: the backend its fusedformer.nn modules and ops run on
    (None: the active default)."""

    backend: str | None = None


@dataclasses.dataclass(kw_only=True)
class EncoderConfig(ModelConfig):
    """The encoder hyperparameters BERT and ViT share, under the names both Hugging Face's
    BertConfig and ViTConfig give them."""

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    layer_norm_eps: float = 1e-12

    @classmethod
    def from_hf_config(cls, model, hc, backend, **own):
        """This config from Hugging Face's config ``hc`` of ``model``: EncoderConfig's fields
        copied by name (the activation translated), ``own`` the subclass's."""
        shared = {f.name: getattr(hc, f.name) for f in dataclasses.fields(EncoderConfig) if f.name != "backend"}
        shared["hidden_act"] = hf_activation(model, "hidden_act", hc.hidden_act)
        return cls(**shared, **own, backend=backend)


def hf_activation(model, field, name):
    """fusedformer's name of Hugging Face's activation ``name`` (config field ``field``)."""
    if name not in HF_ACTIVATIONS:
        raise ValueError(f"{model}.from_hf: unsupported {field} {name!r}; supported: {sorted(HF_ACTIVATIONS)}")
    return HF_ACTIVATIONS[name]

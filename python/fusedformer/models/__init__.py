"""BERT, GPT, T5 and ViT built from fusedformer.nn, with Hugging Face weight import
(``Model.from_hf(hf_model)``); transformers is needed only to build the source model."""

from fusedformer.models.bert import Bert, BertConfig
from fusedformer.models.gpt import GPT, GPTConfig
from fusedformer.models.t5 import T5, T5Config
from fusedformer.models.vit import ViT, ViTConfig

__all__ = ["GPT", "T5", "Bert", "BertConfig", "GPTConfig", "T5Config", "ViT", "ViTConfig"]

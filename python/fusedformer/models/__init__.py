"""BERT, GPT, T5 and ViT built from fusedformer.nn, with Hugging Face weight import."""

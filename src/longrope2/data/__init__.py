"""Data: corpora, needle samples, the fine-tuning rows' format and packing, tokenization."""

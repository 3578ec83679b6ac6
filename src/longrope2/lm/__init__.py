"""The language model's shared pieces: loading a checkpoint as every stage runs it, and the one loss / perplexity module."""

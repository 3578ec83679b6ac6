"""LongRoPE2 context-window extension: RoPE maths, pipeline stages and helpers."""

__version__ = "0.1.0"

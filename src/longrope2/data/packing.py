"""Packing documents into fine-tuning rows by length bucket (docs/method.md §6)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from omegaconf import DictConfig

from longrope2.data import rows as rows_format


@dataclass
class Bucket:
    """One length bucket: documents of (low, max_len] tokens (the last one: > low), its row budget."""

    index: int
    low: int
    max_len: int
    tokens: int
    rows: int
    is_long: bool
    done_rows: int = 0
    documents: int = 0
    cut_documents: int = 0

    @property
    def full(self) -> bool:
        return self.done_rows >= self.rows


def make_buckets(cfg: DictConfig) -> list[Bucket]:
    """train.length_mix as buckets (the config checks: first max_len = L_train, increasing)."""
    length = int(cfg.target_len)
    out, low = [], 0
    for i, b in enumerate(cfg.train.length_mix):
        tokens = int(b.tokens)
        out.append(Bucket(i, low, int(b.max_len), tokens, math.ceil(tokens / length), is_long=i > 0))
        low = int(b.max_len)
    return out


def bucket_of(buckets: list[Bucket], n: int) -> Bucket:
    """The first bucket whose max_len >= n; longer documents go to the last bucket."""
    return next((b for b in buckets if n <= b.max_len), buckets[-1])


@dataclass
class RowBuilder:
    """Fills one row of exactly ``length`` tokens with documents (cut at the row's end)."""

    length: int
    is_long: bool
    ids: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    doc_lengths: list[int] = field(default_factory=list)

    def add(self, ids: list[int], weights: list[float] | None = None) -> bool:
        """Append a document (cut to the space left); True when it was cut."""
        space = self.length - len(self.ids)
        piece = ids[:space]
        self.ids += piece
        self.weights += (weights[:space] if weights is not None else [1.0] * len(piece))
        self.doc_lengths.append(len(piece))
        return len(ids) > space

    @property
    def full(self) -> bool:
        return len(self.ids) == self.length

    def encoded(self, dtype: np.dtype) -> rows_format.EncodedRow:
        """The row as stored (tokens of ``dtype``, documents and weights sparse: see longrope2.rows)."""
        return rows_format.encode(self.ids, self.weights, self.doc_lengths, self.is_long, dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The dense row (what the train stage reads back from the stored one)."""
        lengths = self.doc_lengths
        positions = (torch.arange(self.length) if self.is_long else rows_format.document_position_ids(lengths))
        doc_ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
        return {"input_ids": torch.tensor(self.ids, dtype=torch.int32),
                "position_ids": positions.to(torch.int32), "doc_ids": doc_ids.to(torch.int32),
                "loss_weight": torch.tensor(self.weights, dtype=torch.float16),
                "is_long": torch.tensor(self.is_long)}

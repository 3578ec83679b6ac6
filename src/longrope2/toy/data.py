"""The toy's training data: copying and needle exercises, held-out needle samples, fine-tuning rows."""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig
from transformers import PreTrainedTokenizerFast

from longrope2.core.errors import ConfigError
from longrope2.data.corpus import corpus_parts
from longrope2.data.needles import NeedleSample, NeedleTemplate, build_needle_sample
from longrope2.data.packing import Bucket, RowBuilder
from longrope2.toy.settings import ToyPretrainSettings, toy_pretrain_settings
from longrope2.toy.tokenizer import DIGITS


def encode_stream(tokenizer: PreTrainedTokenizerFast, docs: Sequence[str]) -> torch.Tensor:
    """All documents as one int64 token stream (documents separated by a newline)."""
    if not docs:
        raise ValueError("no documents to encode")
    enc = tokenizer(list(docs), add_special_tokens=False)["input_ids"]
    nl = tokenizer("\n", add_special_tokens=False)["input_ids"]
    out: list[int] = []
    for ids in enc:
        out += ids + nl
    return torch.tensor(out, dtype=torch.long)


class ToyData:
    """Curriculum batches; batch ``step`` depends only on (seed, step) so resume is exact."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerFast, stream: torch.Tensor, settings: ToyPretrainSettings
    ):
        self.tok = tokenizer
        self.stream = stream
        self.s = settings
        self.template = settings.template()
        self.digit_ids = [tokenizer.convert_tokens_to_ids(d) for d in DIGITS]
        self.head = [tokenizer.bos_token_id] if settings.add_bos else []
        if len(stream) < 2 * settings.seq_len:
            raise ValueError(f"training text too short: {len(stream)} tokens")

    def _window(self, rng: random.Random, n: int) -> list[int]:
        start = rng.randrange(len(self.stream) - n)
        return self.stream[start : start + n].tolist()

    def _span(self, rng: random.Random, lo: int, hi: int) -> list[int]:
        span = self._window(rng, rng.randint(lo, hi))
        return [rng.choice(self.digit_ids) if rng.random() < self.s.span_digit_prob else t for t in span]

    def copy_sample(self, rng: random.Random) -> tuple[list[int], list[float]]:
        """A random span repeated back-to-back: dense induction signal."""
        span = self._span(rng, self.s.copy_span_min, self.s.copy_span_max)
        n = self.s.seq_len - len(self.head)
        ids = self.head + (span * (n // len(span) + 1))[:n]
        return ids, [1.0] * self.s.seq_len

    def recall_sample(self, rng: random.Random) -> tuple[list[int], list[float]]:
        """filler, span, filler, the same span at the end (span weighted like an answer)."""
        span = self._span(rng, self.s.recall_span_min, self.s.recall_span_max)
        n_fill = self.s.seq_len - len(self.head) - 2 * len(span)
        fill = self._window(rng, n_fill)
        cut = rng.randint(0, n_fill)
        ids = self.head + fill[:cut] + span + fill[cut:] + span
        w = [1.0] * (len(ids) - len(span) + 1) + [self.s.answer_loss_weight] * (len(span) - 1)
        return ids, w

    def needle_sample(self, rng: random.Random) -> tuple[list[int], list[float]]:
        # Optional jitter: the answer does not always end the window, so the question's
        # absolute position varies (discourages position-bound retrieval).
        tail = rng.randint(0, self.s.needle_end_jitter) if self.s.needle_end_jitter else 0
        s = build_needle_sample(
            self.tok, self.stream, self.s.seq_len - tail, rng.random(), rng, self.template
        )
        w = torch.where(s.answer_mask, self.s.answer_loss_weight, 1.0).tolist()
        return s.input_ids.tolist() + self._window(rng, tail), w + [1.0] * tail

    def batch(self, seed: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = random.Random(f"toy-batch/{seed}/{step}")
        rows = []
        for _ in range(self.s.batch_size):
            if step < self.s.warmup_copy_steps:
                rows.append(self.copy_sample(rng))
            elif rng.random() < self.s.needle_fraction:
                rows.append(self.needle_sample(rng))
            else:
                rows.append(self.recall_sample(rng))
        ids = torch.tensor([r[0] for r in rows], dtype=torch.long)
        weights = torch.tensor([r[1] for r in rows], dtype=torch.float32)
        return ids, weights


def heldout_samples(
    tokenizer: PreTrainedTokenizerFast,
    stream: torch.Tensor,
    template: NeedleTemplate,
    length: int,
    n: int,
    seed: int,
    depth: float | None = None,
    purpose: str = "eval",
) -> list[NeedleSample]:
    """n needle samples of ``length`` tokens; depths evenly spread over [0, 1] unless fixed.

    ``purpose`` namespaces the draws so the gate never reuses the early-stop samples.
    """
    rng = random.Random(f"heldout/{purpose}/{seed}/{length}/{depth}")
    depths = [depth] * n if depth is not None else [i / max(1, n - 1) for i in range(n)]
    return [build_needle_sample(tokenizer, stream, length, d, rng, template) for d in depths]


@dataclass
class ToySource:
    tokenizer: Any
    data: ToyData  # short samples on the training text
    stream: torch.Tensor  # training-split token stream (the long exercises' haystacks)
    lengths: dict[int, list[int]]  # long bucket index -> its exercise lengths
    stats: dict[str, Any]


def prepare_toy(cfg: DictConfig, tokenizer: Any, buckets: list[Bucket]) -> ToySource:
    """Checks and the training-split text, before any row is built."""

    ts, length, train_len = cfg.data.train_set, int(cfg.target_len), int(cfg.model.train_len)
    long_lengths = [int(n) for n in ts.long_lengths]
    bad = [n for n in long_lengths if not train_len < n <= length]
    if not long_lengths or bad:
        raise ConfigError(f"data.train_set.long_lengths = {long_lengths}: accepted: a non-empty list of "
                          f"lengths in (model.train_len, target_len] = ({train_len}, {length}]")
    per_bucket = {}
    for b in buckets[1:]:
        last = b.index == len(buckets) - 1
        per_bucket[b.index] = [n for n in long_lengths if n > b.low and (last or n <= b.max_len)]
        if not per_bucket[b.index]:
            raise ConfigError(f"data.train_set.long_lengths = {long_lengths}: no length in train.length_mix"
                              f"[{b.index}]'s range ({b.low}, {b.max_len}]; accepted: at least one per long bucket")
    docs, heldout = corpus_parts(cfg)  # never the held-out books (needle_data / eval use those)
    settings = dataclasses.replace(toy_pretrain_settings(cfg), answer_loss_weight=float(ts.answer_loss_weight))
    stream = encode_stream(tokenizer, [text for _, text in docs])
    try:
        data = ToyData(tokenizer, stream, settings)
    except ValueError as err:
        raise ConfigError(f"data.corpus: {err}") from None
    if len(stream) < 2 * max(long_lengths):
        raise ConfigError(f"data.corpus: the training split has {len(stream)} tokens; accepted: at least "
                          f"2 x the longest data.train_set.long_lengths = {2 * max(long_lengths)}")
    stats = {"train_documents": [name for name, _ in docs], "heldout_documents_excluded": [n for n, _ in heldout],
             "train_tokens": len(stream), "exercises_per_length": {str(n): 0 for n in long_lengths},
             "short_samples": {"needle": 0, "recall": 0}}
    return ToySource(tokenizer, data, stream, per_bucket, stats)


def toy_rows(src: ToySource, buckets: list[Bucket], length: int, seed: int, template: Any,
             ) -> Iterator[tuple[Bucket, RowBuilder]]:
    for b in buckets:
        rng = random.Random(f"train_data/toy/{seed}/{length}/{b.index}")
        while not b.full:
            row = RowBuilder(length, b.is_long)
            if not b.is_long:
                while not row.full:  # the toy's own samples, L_train tokens each
                    if rng.random() < src.data.s.needle_fraction:
                        ids, w = src.data.needle_sample(rng)
                        src.stats["short_samples"]["needle"] += 1
                    else:
                        ids, w = src.data.recall_sample(rng)
                        src.stats["short_samples"]["recall"] += 1
                    b.cut_documents += row.add(ids, w)
                    b.documents += 1
            else:
                n = rng.choice(src.lengths[b.index])
                count = math.ceil(length / n)
                keys = (rng.sample(template.keys, count) if count <= len(template.keys)
                        else [rng.choice(template.keys) for _ in range(count)])
                for key in keys:
                    s = build_needle_sample(src.tokenizer, src.stream, n, rng.random(), rng, template, key=key)
                    w = torch.where(s.answer_mask, src.data.s.answer_loss_weight, 1.0).tolist()
                    b.cut_documents += row.add(s.input_ids.tolist(), w)
                    b.documents += 1
                    src.stats["exercises_per_length"][str(n)] += 1
            b.done_rows += 1
            yield b, row

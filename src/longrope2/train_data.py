"""Stage `train_data`: rows of exactly target_len tokens for mixed context window fine-tuning (spec §5).

In:  the tokenizer of model.path, train.length_mix (token budget per length bucket), target_len (L),
     model.train_len (L_train), run_seed, data.train_set and, for the toy, data.corpus (TRAINING split only).
Out: <out_dir>/seed<k>/train_data/rows-00000.tokens.npy + rows-00000.index.npz, ... (shard_rows rows each):
     input_ids (n, L) uint16 (uint32 for vocabularies >= 65 536 ids), memory-mapped; per row its document
     lengths, its spans of loss weights != 1 and is_long (longrope2.rows: position_ids, doc_ids and
     loss_weight are derived on reading); and train_data.json (rows, tokens and documents per bucket, the
     shards, L, L_train, seed, source statistics).

Buckets: a document belongs to the first bucket of train.length_mix whose max_len >= its length
(documents longer than the last max_len go to the last bucket: they are cut at L anyway). The first
bucket (max_len = L_train) makes SHORT rows: documents packed into L tokens, positions restarting at 0
in every document (so max position < L_train and the longrope switch picks the short factors); a
document that does not fit is cut to the space left and its rest dropped, so every row is exactly L
tokens, without padding. Every other bucket makes LONG rows: its documents concatenated in order to L
tokens, the last one cut (the rest dropped), positions 0 ... L-1 (the switch picks the long factors).
doc_ids number the documents of a row (0, 1, ...); the train stage derives boundary-free labels
(mixed.causal_lm_labels) and, as an option, per-document masks from them. A bucket of `tokens`
tokens makes ceil(tokens / L) rows. Rows are stored in the order they are completed (the toy: bucket
by bucket); the train stage picks short and long rows by is_long.

Sources (data.train_set.source):
- toy_exercises (the toy): short documents are the toy's own L_train-token samples (toy.ToyData's
  needle / recall mix after the copy warm-up), long documents are needle exercises on training-split
  text; each long row draws ONE length uniformly from the bucket's long_lengths and holds L // length
  exercises of it, with distinct keys. Answer tokens get loss weight answer_loss_weight, others 1.
- corpora (paper): local folders of *.txt (one document per file) or *.jsonl (one JSON object per
  line, "text" field); each document is drawn from a corpus chosen in proportion to its weight, in a
  seeded order per corpus (reshuffled when a corpus is used up: small corpora repeat, see the json's
  epochs). Each document is [BOS] + text + [EOS] (where the tokenizer has them). A document whose
  bucket is already full is skipped.

    python -m longrope2.train_data experiment=toy
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from longrope2 import mixed, toy
from longrope2 import rows as rows_format
from longrope2.config import ConfigError, hydra_stage, run_dir, run_seed
from longrope2.inputs import corpus_parts, load_tokenizer, needle_template, toy_pretrain_settings
from longrope2.needle import build_needle_sample
from longrope2.outputs import atomic_dir, write_json
from longrope2.tracking import stage_run

CORPUS_FORMATS = ('a local folder of *.txt files (one document per file) or *.jsonl files '
                  '(one JSON object per line with a "text" field)')
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


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


# --------------------------------------------------------------------------- rows


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
        positions = (torch.arange(self.length) if self.is_long else mixed.document_position_ids(lengths))
        doc_ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
        return {"input_ids": torch.tensor(self.ids, dtype=torch.int32),
                "position_ids": positions.to(torch.int32), "doc_ids": doc_ids.to(torch.int32),
                "loss_weight": torch.tensor(self.weights, dtype=torch.float16),
                "is_long": torch.tensor(self.is_long)}


class ShardWriter:
    """Rows into shards rows-00000, rows-00001, ... of ``shard_rows`` rows each (files: longrope2.rows)."""

    def __init__(self, folder: Path, shard_rows: int) -> None:
        self.folder, self.shard_rows = folder, shard_rows
        self.buffer: list[rows_format.EncodedRow] = []
        self.shards: list[str] = []

    def add(self, row: rows_format.EncodedRow) -> None:
        self.buffer.append(row)
        if len(self.buffer) >= self.shard_rows:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        name = f"rows-{len(self.shards):05d}"
        rows_format.write_shard(self.folder, name, self.buffer)
        self.shards.append(name)
        self.buffer = []


# --------------------------------------------------------------------------- source: toy_exercises


@dataclass
class ToySource:
    tokenizer: Any
    data: toy.ToyData  # short samples on the training text
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
    stream = toy.encode_stream(tokenizer, [text for _, text in docs])
    try:
        data = toy.ToyData(tokenizer, stream, settings)
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


# --------------------------------------------------------------------------- source: corpora


@dataclass
class Corpus:
    name: str
    path: Path
    weight: float
    entries: list[tuple[int, int | None]]  # (file index, byte offset of a jsonl line | None for a .txt)
    files: list[Path]
    drawn: int = 0
    used: int = 0
    epochs: int = 0


def index_corpora(cfg: DictConfig) -> list[Corpus]:
    """Every corpus folder listed and checked (missing, empty, hub ids) before any row is built."""
    specs = list(cfg.data.train_set.corpora)
    if not specs:
        raise ConfigError(f"data.train_set.corpora = []: accepted: a list of {{name, path, weight}}, each path "
                          f"{CORPUS_FORMATS}")
    out = []
    for i, spec in enumerate(specs):
        key, path = f"data.train_set.corpora[{i}].path", spec.path
        if path is None:
            raise ConfigError(f"{key} = null (corpus {spec.name!r}): accepted: {CORPUS_FORMATS}")
        folder = Path(str(path))
        if not folder.exists():
            if _HUB_ID.fullmatch(str(path)) and not str(path).startswith("."):
                raise ConfigError(f"{key} = {str(path)!r} is not a local folder and looks like a hub dataset id: "
                                  f"hub datasets are not supported offline yet; place the data in {CORPUS_FORMATS}")
            raise ConfigError(f"{key} = {str(path)!r}: no such folder; accepted: {CORPUS_FORMATS}")
        if not folder.is_dir():
            raise ConfigError(f"{key} = {str(path)!r} is not a folder; accepted: {CORPUS_FORMATS}")
        files, entries = [], []
        for f in sorted(folder.glob("*.txt")) + sorted(folder.glob("*.jsonl")):
            if f.stat().st_size == 0:
                continue
            fi = len(files)
            files.append(f)
            if f.suffix == ".txt":
                entries.append((fi, None))
                continue
            with f.open("rb") as fh:
                offset = 0
                for line in fh:
                    if line.strip():
                        entries.append((fi, offset))
                    offset += len(line)
        if not entries:
            raise ConfigError(f"{key} = {str(path)!r}: no documents (no non-empty *.txt or *.jsonl files); "
                              f"accepted: {CORPUS_FORMATS}")
        out.append(Corpus(str(spec.name), folder, float(spec.weight), entries, files))
    return out


def _read(c: Corpus, entry: tuple[int, int | None]) -> str:
    fi, offset = entry
    f = c.files[fi]
    if offset is None:
        return f.read_text(encoding="utf-8", errors="replace").strip()
    with f.open("rb") as fh:
        fh.seek(offset)
        line = fh.readline()
    try:
        text = json.loads(line)["text"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ConfigError(f"corpus {c.name!r}: {f} at byte {offset}: accepted: one JSON object per line "
                          'with a "text" field') from None
    return str(text).strip()


def draw_documents(corpora: list[Corpus], seed: int) -> Iterator[tuple[Corpus, str]]:
    """Endless documents: a corpus drawn by weight, then its next document in a seeded order."""
    rng = random.Random(f"train_data/corpora/{seed}")
    orders: list[list[tuple[int, int | None]]] = [[] for _ in corpora]
    weights = [c.weight for c in corpora]
    while True:
        k = rng.choices(range(len(corpora)), weights)[0]
        c = corpora[k]
        if not orders[k]:
            orders[k] = list(c.entries)
            random.Random(f"train_data/corpora/{seed}/{c.name}/{c.epochs}").shuffle(orders[k])
            orders[k].reverse()  # pop() from the end = the shuffled order
            c.epochs += 1
        c.drawn += 1
        yield c, _read(c, orders[k].pop())


def corpus_rows(tokenizer: Any, corpora: list[Corpus], buckets: list[Bucket], length: int, seed: int,
                stats: dict[str, Any], batch: int = 64) -> Iterator[tuple[Bucket, RowBuilder]]:
    head = [int(tokenizer.bos_token_id)] if tokenizer.bos_token_id is not None else []
    tail = [int(tokenizer.eos_token_id)] if tokenizer.eos_token_id is not None else []
    rows = {b.index: RowBuilder(length, b.is_long) for b in buckets}
    seen: set[int] = set()  # buckets any document fell into
    docs = draw_documents(corpora, seed)
    while not all(b.full for b in buckets):
        drawn = [next(docs) for _ in range(batch)]
        texts = [t for _, t in drawn]
        encoded = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        for (c, text), ids in zip(drawn, encoded):
            if not text:
                stats["empty_documents"] += 1
                continue
            ids = head + list(ids) + tail
            b = bucket_of(buckets, len(ids))
            seen.add(b.index)
            if b.full:
                stats["skipped_documents"] += 1
                continue
            c.used += 1
            b.documents += 1
            row = rows[b.index]
            b.cut_documents += row.add(ids)
            if row.full:
                b.done_rows += 1
                rows[b.index] = RowBuilder(length, b.is_long)
                yield b, row
        if all(c.epochs >= 2 for c in corpora):  # every document seen at least once
            missing = [b for b in buckets if not b.full and b.index not in seen]
            if missing:
                b = missing[0]
                raise ConfigError(f"train.length_mix[{b.index}]: no document of the corpora has ({b.low}, "
                                  f"{b.max_len}] tokens; accepted: corpora with such documents, or no such bucket")


# --------------------------------------------------------------------------- stage


def run(cfg: DictConfig) -> dict[str, Any]:
    out = run_dir(cfg) / "train_data"
    length, train_len, seed = int(cfg.target_len), int(cfg.model.train_len), run_seed(cfg)
    ts = cfg.data.train_set
    buckets = make_buckets(cfg)  # the config already checked length_mix (first bucket = L_train)
    # Every input check (tokenizer, corpora, lengths) before any row is built.
    tokenizer = load_tokenizer(str(cfg.model.path))
    if ts.source == "toy_exercises":
        toy_src = prepare_toy(cfg, tokenizer, buckets)
        stats = toy_src.stats
        rows = toy_rows(toy_src, buckets, length, seed, needle_template(cfg))
    else:
        corpora = index_corpora(cfg)
        stats = {"empty_documents": 0, "skipped_documents": 0}
        rows = corpus_rows(tokenizer, corpora, buckets, length, seed, stats)

    with stage_run(cfg, "train_data", per_seed=True) as tracker:
        with atomic_dir(out) as scratch:
            writer = ShardWriter(scratch, int(ts.shard_rows))
            dtype = rows_format.token_dtype(len(tokenizer))
            with tqdm(total=sum(b.rows for b in buckets), desc="train_data rows", mininterval=2.0,
                      dynamic_ncols=True) as bar:
                for _, row in rows:
                    writer.add(row.encoded(dtype))
                    bar.update(1)
            writer.flush()
            if ts.source == "corpora":
                stats["corpora"] = [{"name": c.name, "path": str(c.path), "weight": c.weight,
                                     "documents_indexed": len(c.entries), "documents_drawn": c.drawn,
                                     "documents_used": c.used, "epochs": c.epochs} for c in corpora]
            summary = {
                "target_len": length, "train_len": train_len, "seed": seed, "source": str(ts.source),
                "rows": sum(b.done_rows for b in buckets),
                "buckets": [{"max_len": b.max_len, "low": b.low, "is_long": b.is_long, "token_budget": b.tokens,
                             "rows": b.done_rows, "tokens": b.done_rows * length, "documents": b.documents,
                             "cut_documents": b.cut_documents} for b in buckets],
                "documents": sum(b.documents for b in buckets),
                "shards": writer.shards, "shard_rows": int(ts.shard_rows), "stats": stats,
            }
            write_json(scratch / "train_data.json", summary)
        metrics = {"rows": summary["rows"], "documents": summary["documents"]}
        for b in summary["buckets"]:
            metrics |= {f"bucket{b['max_len']}_rows": b["rows"], f"bucket{b['max_len']}_documents": b["documents"]}
        tracker.log_metrics(metrics)
        tracker.log_artifact(out / "train_data.json")
    print(f"train rows of {length} tokens: " + ", ".join(
        f"{'long' if b.is_long else 'short'} <= {b.max_len}: {b.done_rows}" for b in buckets) + f" -> {out}")
    return summary


main = hydra_stage(run)

if __name__ == "__main__":
    main()

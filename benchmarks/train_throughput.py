"""Training throughput of short rows: unpacked documents (the train stage), the packed row under a
per-document mask, and every document padded to L.

Same model, same documents, same optimiser-free forward + backward (the chunked loss), side by
side in one run; long rows (one 1 024-token causal row each) are the same in all three. Short
rows hold several documents of <= L_train tokens in L tokens, positions restarting:
- unpacked (what stage `train` does under SDPA): the row's documents as rows of their own,
  right-padded to the longest (training.mixed.unpack_documents), plain causal attention;
- masked: the packed row as it is, with the L x L per-document causal mask;
- padded: every document alone in a row of L tokens (padding masked out of attention and loss).
Throughput counts real (non-padding) tokens per second.

    python benchmarks/train_throughput.py                       # the toy's rows and base model
    python benchmarks/train_throughput.py --rows 16 --threads 2 --json out.json

Needs results/toy/seed0/train_data and results/toy/base_model (`snakemake --cores 2 train_data`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from longrope2.data.rows import Rows
from longrope2.lm import losses
from longrope2.training import mixed
from longrope2.training.step import ChunkedLossLM


def padded_documents(row: dict[str, torch.Tensor], length: int, pad_id: int) -> list[dict[str, torch.Tensor]]:
    """Each document of a packed short row alone in a row of ``length`` tokens, right-padded."""
    out = []
    for d in row["doc_ids"].unique().tolist():
        sel = row["doc_ids"] == d
        n = int(sel.sum())
        ids = torch.full((length,), pad_id, dtype=torch.long)
        ids[:n] = row["input_ids"][sel]
        weight = torch.zeros(length)
        weight[:n] = row["loss_weight"][sel]
        keep = torch.zeros(length, dtype=torch.bool)
        keep[:n] = True
        out.append({"input_ids": ids, "keep": keep, "loss_weight": weight, "real": n})
    return out


def step(model: ChunkedLossLM, ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None, labels: torch.Tensor,
         weights: torch.Tensor) -> None:
    total, denom = model(ids, pos, mask, labels, weights)
    (total / denom).backward()


def run_packed(model: ChunkedLossLM, rows: dict[str, torch.Tensor], unpack: bool) -> tuple[float, int]:
    t0, real = time.perf_counter(), 0
    for i in range(rows["input_ids"].shape[0]):
        r = {k: v[i : i + 1] for k, v in rows.items()}
        long = bool(r["is_long"][0])
        ids, pos = r["input_ids"], r["position_ids"]
        labels = losses.causal_lm_labels(ids, None if long else r["doc_ids"])
        weights = losses.label_weights(r["loss_weight"], labels)
        mask = None
        if not long and unpack:
            ids, pos, labels, weights = mixed.unpack_documents(r["doc_ids"], ids, pos, labels, weights)
        elif not long:
            mask = mixed.document_causal_mask(r["doc_ids"])
        step(model, ids, pos, mask, labels, weights)
        real += r["input_ids"].numel()
    return time.perf_counter() - t0, real


def run_padded(model: ChunkedLossLM, rows: dict[str, torch.Tensor], pad_id: int) -> tuple[float, int, int]:
    length = rows["input_ids"].shape[1]
    t0, real, padded_rows = time.perf_counter(), 0, 0
    for i in range(rows["input_ids"].shape[0]):
        r = {k: v[i] for k, v in rows.items()}
        if bool(r["is_long"]):
            labels = losses.causal_lm_labels(r["input_ids"][None])
            step(model, r["input_ids"][None], r["position_ids"][None], None, labels,
                 losses.label_weights(r["loss_weight"][None], labels))
            real += length
            padded_rows += 1
            continue
        for doc in padded_documents(r, length, pad_id):
            ids = doc["input_ids"][None]
            labels = losses.causal_lm_labels(ids)
            labels[0, doc["real"] - 1 :] = losses.IGNORE_INDEX  # nothing predicted from or into padding
            mask = doc["keep"][None].long()  # 2D padding mask: transformers builds the causal part
            weights = losses.label_weights(doc["loss_weight"][None], labels)
            step(model, ids, torch.arange(length)[None], mask, labels, weights)
            real += doc["real"]
            padded_rows += 1
    return time.perf_counter() - t0, real, padded_rows


def main() -> None:
    from transformers import AutoModelForCausalLM

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, default=Path("results/toy"))
    p.add_argument("--seed", type=int, default=0, help="the replicate whose train_data rows are used")
    p.add_argument("--rows", type=int, default=8, help="short rows and long rows each")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    data = Rows(args.results / f"seed{args.seed}" / "train_data")
    short = [j for j in range(len(data)) if not bool(data.get([j])["is_long"][0])][: args.rows]
    long = [j for j in range(len(data)) if bool(data.get([j])["is_long"][0])][: args.rows]
    rows = data.get(short + long)
    lm = AutoModelForCausalLM.from_pretrained(args.results / "base_model", dtype=torch.float32,
                                              attn_implementation="sdpa")
    model = ChunkedLossLM(lm, 1024).train()
    pad_id = int(lm.config.pad_token_id if lm.config.pad_token_id is not None else 0)
    warm = {k: v[:2] for k, v in rows.items()}
    run_packed(model, warm, unpack=True), run_packed(model, warm, unpack=False)  # warm-up
    t_unpacked, real = run_packed(model, rows, unpack=True)
    t_masked, real_masked = run_packed(model, rows, unpack=False)
    t_padded, real_padded, padded_rows = run_padded(model, rows, pad_id)
    assert real == real_masked == real_padded, (real, real_masked, real_padded)
    docs = sum(int(rows["doc_ids"][j].unique().numel()) for j in range(len(short)))
    result = {
        "model": str(args.results / "base_model"), "row_length": data.length, "short_rows": len(short),
        "long_rows": len(long), "threads": args.threads, "real_tokens": real,
        "unpacked": {"forward_rows": docs + len(long), "seconds": t_unpacked, "tokens_per_s": real / t_unpacked},
        "masked": {"forward_rows": len(short) + len(long), "seconds": t_masked, "tokens_per_s": real / t_masked},
        "padded": {"forward_rows": padded_rows, "seconds": t_padded, "tokens_per_s": real / t_padded},
    }
    print(f"{real} real tokens ({len(short)} short + {len(long)} long rows of {data.length}), "
          f"{args.threads} thread(s), forward + backward:")
    for name in ("unpacked", "masked", "padded"):
        r = result[name]
        print(f"  {name:8s} {r['forward_rows']:5d} rows  {r['seconds']:8.2f} s  {r['tokens_per_s']:10.0f} real "
              f"tokens/s  ({t_padded / r['seconds']:.2f}x padded)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

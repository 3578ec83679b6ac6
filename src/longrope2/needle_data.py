"""Stage `needle_data`: the factor search's needle samples and a held-out validation set (spec §3).

In:  the experiment's long documents (data.corpus; with a held-out split, as for the toy, only the
     documents pretraining never saw), the tokenizer of model.path, data.needle (template, digits,
     depths), data.search_set (books, samples, validation_books, validation_samples), target_len, run_seed.
Out: <out_dir>/seed<k>/needle_data/search.pt and validation.pt (tensors: input_ids and answer_mask (n, L),
     plain_ids (n, L): the same text without the needle, for the plain-PPL ablation),
     validation_short.pt (the same from the validation books at L_train tokens: the within-window
     check of the fine-tuned model) and needle_data.json (every sample's book, key, number, depth,
     start; the set sizes).

Sample k of a set comes from book k mod books, with the needle at depth depths[(k // books) mod
len(depths)]: 10 books x 10 samples at depths [0.0, ...] is the paper's set (needle at the start of
each book); 100 samples is the reference code's (10 depths per book). The validation set draws from
other books than the search set, so the search never sees it.

    python -m longrope2.needle_data experiment=toy
"""

from __future__ import annotations

import random
from typing import Any

import torch
from omegaconf import DictConfig

from longrope2.config import ConfigError, hydra_stage, run_dir, run_seed
from longrope2.inputs import corpus_parts, load_tokenizer, needle_template
from longrope2.needle import NeedleTemplate, build_needle_sample, stack_samples
from longrope2.outputs import atomic_dir, write_json
from longrope2.tracking import stage_run

SPLITS = ("search", "validation", "validation_short")


def select_books(cfg: DictConfig) -> dict[str, list[tuple[str, str]]]:
    """The search books and the validation books (disjoint), in corpus order."""
    c = cfg.data.corpus
    train, heldout = corpus_parts(cfg)
    where = f"corpus {c.source!r}" + (f" at {c.path}" if c.path else "")
    docs = heldout or train  # with a held-out part: only text the base model was never trained on
    if heldout:
        where += f" (held-out part, heldout_fraction = {c.heldout_fraction})"
    s = cfg.data.search_set
    books, val_books = int(s.books), int(s.validation_books) if int(s.validation_samples) else 0
    if len(docs) < books + val_books:
        raise ConfigError(
            f"data.search_set: the {where} has {len(docs)} documents; accepted: at least "
            f"books + validation_books = {books} + {val_books} = {books + val_books}"
        )
    validation = docs[books : books + val_books]
    return {"search": docs[:books], "validation": validation, "validation_short": validation}


def tokenize_books(tokenizer: Any, books: list[tuple[str, str]], length: int) -> list[tuple[str, list[int]]]:
    """Token ids of each book; every book must hold a whole sample (checked before any sample is built)."""
    out = []
    for name, text in books:
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if len(ids) < length:
            raise ConfigError(
                f"data.search_set: document {name!r} has {len(ids)} tokens; a sample of target_len = "
                f"{length} needs at least {length} (accepted: longer documents, or a smaller target_len)"
            )
        out.append((name, ids))
    return out


def build_set(
    tokenizer: Any,
    books: list[tuple[str, list[int]]],
    template: NeedleTemplate,
    length: int,
    n: int,
    depths: list[float],
    rng: random.Random,
) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """n samples of exactly ``length`` tokens, cycling books then depths; plus the needle-free rows."""
    samples, plain, meta = [], [], []
    head = [int(tokenizer.bos_token_id)] if template.add_bos and tokenizer.bos_token_id is not None else []
    for k in range(n):
        name, ids = books[k % len(books)]
        depth = float(depths[(k // len(books)) % len(depths)])
        start = rng.randrange(len(ids) - length + 1)
        sample = build_needle_sample(tokenizer, ids, length, depth, rng, template, start=start)
        samples.append(sample)
        plain.append(head + ids[start : start + length - len(head)])
        meta.append({"book": name, "start": start, "key": sample.key, "number": sample.number, "depth": depth,
                     "actual_depth": sample.actual_depth, "needle_position": sample.needle_position,
                     "haystack_tokens": sample.haystack_tokens, "answer_tokens": int(sample.answer_mask.sum())})
    tensors = stack_samples(samples)
    tensors["plain_ids"] = torch.tensor(plain, dtype=torch.int32)
    return tensors, meta


def run(cfg: DictConfig) -> dict[str, Any]:
    out = run_dir(cfg) / "needle_data"
    length, seed = int(cfg.target_len), run_seed(cfg)
    s = cfg.data.search_set
    sizes = {"search": int(s.samples), "validation": int(s.validation_samples),
             "validation_short": int(s.validation_samples)}
    lengths = {"search": length, "validation": length, "validation_short": int(cfg.model.train_len)}
    # Every input check (tokenizer, corpus, book lengths) before any sample is built.
    tokenizer = load_tokenizer(str(cfg.model.path))
    template = needle_template(cfg)
    books = {split: tokenize_books(tokenizer, docs, length) for split, docs in select_books(cfg).items()}

    with stage_run(cfg, "needle_data", per_seed=True) as tracker:
        summary: dict[str, Any] = {"target_len": length, "seed": seed, "template": str(cfg.data.needle.template),
                                   "depths": list(cfg.data.needle.depths)}
        with atomic_dir(out) as scratch:
            for split in SPLITS:
                if not sizes[split]:
                    continue
                rng = random.Random(f"needle_data/{split}/{seed}/{lengths[split]}")
                tensors, meta = build_set(tokenizer, books[split], template, lengths[split], sizes[split],
                                          list(cfg.data.needle.depths), rng)
                torch.save(tensors, scratch / f"{split}.pt")
                summary[split] = {"samples": sizes[split], "length": lengths[split],
                                  "books": [name for name, _ in books[split]], "meta": meta}
            write_json(scratch / "needle_data.json", summary)
        tracker.log_metrics({f"{split}_samples": n for split, n in sizes.items()})
        tracker.log_artifact(out / "needle_data.json")
    print(f"needle samples of {length} tokens: " + ", ".join(f"{k} {v}" for k, v in sizes.items()) + f" -> {out}")
    return summary


main = hydra_stage(run)

if __name__ == "__main__":
    main()

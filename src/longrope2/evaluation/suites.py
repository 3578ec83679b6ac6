"""The evaluation suites stage evaluate runs on one model."""

from __future__ import annotations

import contextlib
import functools
import math
import tempfile
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import DictConfig

from longrope2.core.artifacts import BASE, eval_dir, load_tensors, read_json
from longrope2.core.errors import ConfigError
from longrope2.data.needles import needle_template
from longrope2.evaluation import backends, longbench, niah, perplexity, ruler
from longrope2.reporting import figures, tables
from longrope2.reporting.figures import save_figure

# Metrics that are not accuracies stay out of the short average (and so out of retention).
NOT_IN_AVERAGE = ("perplexity", "bits_per_byte")


def harness(model: Any, tokenizer: Any, max_length: int, batch_size: int) -> Any:
    """lm-eval's HF wrapper around the loaded model; max_length explicit, or it would truncate inputs to
    the config's max_position_embeddings (the base's original window)."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
                add_bos_token=tokenizer.bos_token_id is not None)


Engine = Callable[[], AbstractContextManager[Any]]


def suite_engines(cfg: DictConfig, model: Any, tokenizer: Any, suite: str, lengths: Iterable[int],
                  hf_length: int) -> list[tuple[Engine, list[int]]]:
    """The lm-eval models a suite runs on, each with the sample lengths (prompt + generation) it takes, made
    when its with block starts: HFLM (max_length hf_length) once for every length, transformers switching the
    RoPE per forward; vLLM on a prepared checkpoint (eval.backend = vllm) once per factor regime
    (backends.regimes; max_model_len the regime's longest sample), each engine shut down as its block ends."""
    if isinstance(model, backends.VllmModel):
        bos = tokenizer.bos_token_id is not None
        return [(functools.partial(backends.vllm_engine, model, cfg, suite, bos, max(group)), group)
                for group in backends.regimes(model, lengths)]

    def hf() -> AbstractContextManager[Any]:
        return contextlib.nullcontext(harness(model, tokenizer, hf_length, int(cfg.eval.batch_size)))

    return [(hf, sorted({int(x) for x in lengths}))]


def quiet_lm_eval() -> None:
    """lm-eval's INFO lines off the stage log (its warnings stay)."""
    import logging

    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.WARNING)


def ruler_cells(cfg: DictConfig, data: Path) -> tuple[list[tuple[int, dict]], dict, dict]:
    """RULER's cells with data, each as (length, its lm-eval task config), in eval.ruler's task x length order;
    per task and length, why a cell has no data and the mean prompt tokens of one that has."""
    manifest = read_json(data / "ruler.json", ("tasks",))
    r = cfg.eval.ruler
    cells, unavailable, mean_tokens = [], {}, {}

    def process_results(doc: dict, results: list[str]) -> dict[str, float]:
        return {"score": ruler.score_sample(doc["task"], results[0], doc["outputs"])}

    for task in r.tasks:
        for length in r.lengths:
            entry = manifest["tasks"].get(task, {}).get(str(length))
            if entry is None:
                raise ConfigError(f"eval.ruler: no data for {task} at {length} in {data}: rerun stage eval_data")
            if "unavailable" in entry:
                unavailable.setdefault(task, {})[int(length)] = entry["unavailable"]
                continue
            mean_tokens.setdefault(task, {})[int(length)] = entry["mean_tokens"]
            cells.append((int(length), ruler.task_config(task, int(length), data / "ruler" / entry["file"],
                                                         process_results)))
    return cells, unavailable, mean_tokens


def ruler_samples(cfg: DictConfig, model: Any, tokenizer: Any, cells: list[tuple[int, dict]]) -> dict[str, list]:
    """lm-eval's logged samples per cell (task config name): every cell on the engine its length's regime
    needs (suite_engines; a cell's length holds its prompt and its answer's tokens), the engines in turn."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    r = cfg.eval.ruler
    budget = max(int(v) for v in r.max_new_tokens.values())
    hf_length = max(int(x) for x in r.lengths) + budget
    samples: dict[str, list] = {}
    for engine, group in suite_engines(cfg, model, tokenizer, "ruler", [n for n, _ in cells], hf_length):
        configs = [config for length, config in cells if length in group]
        with engine() as lm:
            # The task configs are complete: no index of lm-eval's own tasks (~10 s per job).
            result = lm_eval.simple_evaluate(model=lm, tasks=configs, log_samples=True, verbosity="WARNING",
                                             task_manager=TaskManager(include_defaults=False),
                                             random_seed=int(cfg.seed), numpy_random_seed=int(cfg.seed),
                                             torch_random_seed=int(cfg.seed), fewshot_random_seed=int(cfg.seed))
        samples |= {config["task"]: result["samples"][config["task"]] for config in configs}
    return samples


def eval_ruler(cfg: DictConfig, model: Any, tokenizer: Any, data: Path, out: Path) -> dict[str, Any]:
    r = cfg.eval.ruler
    cells, unavailable, mean_tokens = ruler_cells(cfg, data)
    scores: dict[str, dict[int, list[float]]] = {task: {} for task in r.tasks}
    predictions = []
    samples = ruler_samples(cfg, model, tokenizer, cells) if cells else {}
    for _, config in cells:
        for sample in samples[config["task"]]:
            doc = sample["doc"]
            pred = sample["filtered_resps"][0]
            pred = pred[0] if isinstance(pred, list) else pred
            score = ruler.score_sample(doc["task"], pred, doc["outputs"])
            scores[doc["task"]].setdefault(int(doc["max_length"]), []).append(score)
            predictions.append({"task": doc["task"], "length": doc["max_length"], "index": doc["index"],
                                "prediction": pred, "references": doc["outputs"], "score": score})
    summary = ruler.summarize(scores, float(r.threshold))
    summary["unavailable"] = {t: {str(k): v for k, v in per.items()} for t, per in unavailable.items()}
    summary["mean_tokens"] = {t: {str(k): v for k, v in per.items()} for t, per in mean_tokens.items()}
    summary["scoring"] = ("official RULER: niah/vt/cwe/fwe = fraction of references in the prediction, "
                          "qa = 1 if any reference is in it; task score = mean x 100; average over the tasks "
                          "that have data at the length")
    summary["table"] = {t: {str(k): v for k, v in per.items()} for t, per in summary["table"].items()}
    summary["average"] = {str(k): v for k, v in summary["average"].items()}
    ruler.write_jsonl(out / "predictions.jsonl", predictions)
    (out / "ruler.csv").write_text(tables.to_csv(tables.ruler_per_task(str(cfg.eval.variant), summary)))
    lengths = summary["lengths"]
    fig = figures.plot_average_by_length(
        {str(cfg.eval.variant): (lengths, [summary["average"][str(n)] for n in lengths])},
        int(cfg.model.train_len), int(cfg.target_len), f"RULER, {cfg.experiment_name} / {cfg.eval.variant}")
    save_figure(fig, out / "ruler.png")
    return summary


def _books(data: Path) -> list[torch.Tensor]:
    return list(load_tensors(data / "books.pt", ("ids",))["ids"])


def eval_niah(cfg: DictConfig, model: Any, tokenizer: Any, data: Path, out: Path) -> dict[str, Any]:
    n = cfg.eval.niah
    # One haystack stream of the held-out books end to end (as RULER joins its essays): a 128k sample
    # is longer than most single books.
    haystack = torch.cat(_books(data))
    # Cells draw run k the same way whatever the run count: more runs at a length extend its samples.
    runs = {int(L): int((n.runs_by_length or {}).get(L, n.runs)) for L in n.lengths}
    samples = {}
    for count in sorted(set(runs.values())):
        lengths = [L for L, r in runs.items() if r == count]
        samples |= niah.niah_samples(tokenizer, haystack, lengths, list(n.depths), count,
                                          needle_template(cfg), int(cfg.seed))
    cells = niah.niah_grid(model, samples, batch_size=int(cfg.eval.batch_size))
    fig = figures.plot_niah_heatmap(cells, f"Needle in a haystack, {cfg.experiment_name} / {cfg.eval.variant}",
                                      train_len=int(cfg.model.train_len), target_len=int(cfg.target_len))
    save_figure(fig, out / "niah.png")
    return niah.niah_table(cells)


def eval_ppl(cfg: DictConfig, model: Any, tokenizer: Any, data: Path, out: Path) -> dict[str, Any]:
    p = cfg.eval.ppl
    docs = _books(data)[: int(p.documents)]
    by_length = perplexity.perplexity_by_length(model, docs, list(p.lengths), stride=p.stride, max_tokens=p.max_tokens)
    return {"documents": len(docs), "by_length": {str(k): v for k, v in by_length.items()}}


def greedy_generate(model: Any, tokenizer: Any) -> Callable[[str, int], str]:
    def generate(prompt: str, max_new_tokens: int) -> str:
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(model.device)
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    return generate


def eval_longbench(cfg: DictConfig, model: Any, tokenizer: Any, data: Path, out: Path) -> dict[str, Any]:
    b = cfg.eval.longbench
    if isinstance(model, backends.VllmModel):  # the engine starts at the first prompt: none when skipped
        # one engine, max_model_len = max_length: its samples share the regime of that length (the long one
        # whenever max_length > the checkpoint's original_max_position_embeddings)
        bos = tokenizer.bos_token_id is not None
        generate = backends.lm_generate(lambda: backends.vllm_harness(model, cfg, "longbench", bos, int(b.max_length)))
    else:
        generate = greedy_generate(model, tokenizer)
    return longbench.evaluate_suite(b.path, list(b.tasks), tokenizer, generate, int(b.max_length), b.limit)


def toy_task_yaml(task: str, data_file: Path) -> dict[str, Any]:
    """A local lm-eval task (include_path) over stage eval_data's JSONL."""
    common = {"task": task, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data_file)}},
              "test_split": "test", "metadata": {"version": 1.0}}
    if task == "toy_short_needle":
        # The answer's log-likelihood; acc = the greedy continuation is the number (exact match).
        return {**common, "output_type": "loglikelihood", "doc_to_text": "{{context}}",
                "doc_to_target": "{{target}}", "target_delimiter": "",
                "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}
    if task == "toy_short_choice":
        # MMLU / ARC's scoring: acc = the choice of highest log-likelihood after the context is the answer;
        # acc_norm divides by the choice's length in characters (all equal here: a check that it matches acc).
        return {**common, "output_type": "multiple_choice", "doc_to_text": "{{context}}",
                "doc_to_choice": "choices", "doc_to_target": "answer", "target_delimiter": "",
                "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                                for m in ("acc", "acc_norm")]}
    return {**common, "output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
            "metric_list": [{"metric": m, "aggregation": agg, "higher_is_better": False} for m, agg in (
                ("word_perplexity", "weighted_perplexity"), ("byte_perplexity", "weighted_perplexity"),
                ("bits_per_byte", "bits_per_byte"))]}


def eval_short(cfg: DictConfig, model: Any, tokenizer: Any, data: Path, out: Path) -> dict[str, Any]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    s = cfg.eval.short
    tasks = {str(t.name): str(t.metric) for t in s.tasks}
    with tempfile.TemporaryDirectory() as include:
        for task in tasks:
            if task.startswith("toy_short"):
                spec = toy_task_yaml(task, (data / "short" / f"{task}.jsonl").resolve())
                (Path(include) / f"{task}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        # one engine: every prompt is truncated to the window, the regime of that length (vLLM: the short
        # factors iff window <= the checkpoint's original_max_position_embeddings)
        ((engine, _),) = suite_engines(cfg, model, tokenizer, "short", [int(s.window)], int(s.window))
        # lm-eval's own tasks (mmlu, ...) need its task index (~10 s to build); the toy's local ones do not.
        own = any(not task.startswith("toy_short") for task in tasks)
        manager = TaskManager(include_path=include, include_defaults=own)
        with engine() as lm:
            result = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=s.limit, log_samples=True,
                                             task_manager=manager, verbosity="WARNING",
                                             random_seed=int(cfg.seed), numpy_random_seed=int(cfg.seed),
                                             torch_random_seed=int(cfg.seed), fewshot_random_seed=int(cfg.seed))
    metrics = {}
    for task, key in tasks.items():
        values = result["results"].get(task, {})
        if key not in values:
            raise ConfigError(f"eval.short.tasks: {task} metric {key!r}: lm-eval reported {sorted(values)}; "
                              "accepted: one of those keys")
        metrics[task] = {"metric": key, "value": float(values[key])}
        # every document's 0/1 outcome of an accuracy metric, by doc_id: paired comparisons across models
        name, logged = key.split(",")[0], sorted(result.get("samples", {}).get(task, []), key=lambda r: r["doc_id"])
        if logged and not any(x in key for x in NOT_IN_AVERAGE) and all(name in r for r in logged):
            metrics[task]["correct"] = [int(round(float(r[name]))) for r in logged]
            # which sample each outcome is: the data's own id, else lm-eval's document index
            metrics[task]["ids"] = [str(r["doc"]["id"]) if "id" in r["doc"] else f"{task}/{r['doc_id']}"
                                    for r in logged]
    in_average = [m["value"] for t, m in metrics.items() if not any(x in m["metric"] for x in NOT_IN_AVERAGE)]
    summary: dict[str, Any] = {"window": int(s.window), "tasks": metrics,
                               "average": sum(in_average) / len(in_average) if in_average else None}
    if cfg.eval.variant != BASE and summary["average"] is not None:
        base = read_json(eval_dir(cfg, BASE, "short") / "short.json", ("average",))
        summary["base_average"] = base["average"]
        summary["retention"] = summary["average"] / base["average"] if base["average"] else None
    return summary


SUITES: dict[str, Callable[[DictConfig, Any, Any, Path, Path], dict[str, Any]]] = {
    "ruler": eval_ruler, "niah": eval_niah, "ppl": eval_ppl, "longbench": eval_longbench, "short": eval_short,
}


def headline(suite: str, result: dict[str, Any]) -> dict[str, float]:
    """The numbers worth a metric in MLflow."""
    if suite == "ruler":
        return {f"ruler_avg_{k}": v for k, v in result["average"].items() if not math.isnan(v)}
    if suite == "niah":
        return {f"niah_em_{k}": v for k, v in result["mean_by_length"].items() if v is not None}
    if suite == "ppl":
        return {f"ppl_{k}": v["ppl"] for k, v in result["by_length"].items() if v.get("ppl") is not None}
    if suite == "longbench":
        return {f"longbench_{k}": v["score"] for k, v in result.get("tasks", {}).items()}
    metrics = {f"short_{t}": m["value"] for t, m in result["tasks"].items()}
    for key in ("average", "retention"):
        if result.get(key) is not None:
            metrics[f"short_{key}"] = result[key]
    return metrics

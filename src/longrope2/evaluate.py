"""Stage `evaluate`: evaluation suites on one model variant (docs/evaluation.md); eval.suite is one suite (a job
per suite, eval.jobs = per_suite) or a list run in turn in one process (eval.jobs = per_variant).

In:  the variant's model, loaded as a user loads it (transformers, no custom code):
     `base` = model.path with its original RoPE; `shipped` = model.path with its maker's own RoPE scaling
     (eval.shipped = auto: the one it ships, loaded as it is, or the one its maker recommends written into its
     config; core.checkpoint.maker_rope), not fine-tuned; any other variant =
     <out_dir>/seed<k>/train/<variant>/model (k = run_seed); with eval.training_free = true, a method =
     model.path with that method's factors (its search's result.json for searched and rcd methods), weights
     untouched; <out_dir>/eval_data/ (stage eval_data); for `short` on any variant but the base, the base's result.
Out: <out_dir>/eval/{base,shipped}/<suite>/, <out_dir>/seed<k>/eval/<variant>/<suite>/ or (training-free)
     <out_dir>/seed<k>/eval_training_free/<variant>/<suite>/: <suite>.json (+ the suite's table and figure),
     metrics to MLflow.
     - ruler: per-task x length scores (official RULER scoring, x100), average per length, effective
       length; ruler.csv; ruler.png; predictions.jsonl. Runs through lm-eval (generate_until, greedy).
     - niah: exact match and needle-PPL per (length, depth) cell, every sample's outcome (paired
       comparisons: every model sees the same samples); niah.png (heatmap).
     - ppl: sliding-window perplexity of held-out long documents per length.
     - longbench: LongBench / InfiniteBench tasks from eval.longbench.path, or a "skipped" line.
     - short: lm-eval short tasks within eval.short.window (toy: local tasks via include_path), the
       short average and, for every variant but the base, retention = average / the base's average.

    python -m longrope2.evaluate experiment=toy eval.variant=longrope2 eval.suite=niah
    python -m longrope2.evaluate experiment=toy eval.variant=longrope2 'eval.suite=[niah,short,ppl]'
    python -m longrope2.evaluate experiment=toy eval.variant=yarn eval.suite=niah eval.training_free=true
    python -m longrope2.evaluate experiment=extend model.path=/models/Qwen3-8B target_len=131072 \
        model.train_len=32768 eval.variant=shipped eval.suite=niah
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Nothing is downloaded at run time: hub misses fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch
from omegaconf import DictConfig, OmegaConf

from longrope2.core import checks
from longrope2.core.artifacts import BASE, SHARED_VARIANTS, SHIPPED, eval_dir, search_result
from longrope2.core.checkpoint import maker_rope
from longrope2.core.config import hydra_stage, run_dir
from longrope2.core.errors import ConfigError
from longrope2.core.outputs import atomic_dir, write_json
from longrope2.core.processes import torch_threads
from longrope2.core.tracking import stage_run
from longrope2.evaluation import backends, longbench
from longrope2.evaluation.suites import SUITES, headline, quiet_lm_eval
from longrope2.lm.loading import load_base_model, load_tokenizer, stage_dtype
from longrope2.rope import methods
from longrope2.rope.hf_config import rope_facts_from_hf_config


def model_dir(cfg: DictConfig, variant: str) -> str:
    if variant in SHARED_VARIANTS or cfg.eval.training_free:
        return str(cfg.model.path)
    path = run_dir(cfg) / "train" / variant / "model"
    if not (path / "config.json").is_file():
        found = sorted(p.parent.name for p in (run_dir(cfg) / "train").glob("*/model/config.json"))
        raise ConfigError(f"eval.variant = {variant!r}: no exported model at {path}; accepted: "
                          f"{', '.join([BASE, *found])}{f', {SHIPPED}' if maker_rope(cfg) else ''}")
    return str(path)


def check_config(cfg: DictConfig) -> tuple[str, list[str]]:
    """The variant and its suites (eval.suite: one name, or a list under eval.jobs = per_variant)."""
    e = cfg.eval
    suites = [str(x) for x in e.suite] if OmegaConf.is_list(e.suite) else [e.suite]
    if not suites or any(x not in e.suites for x in suites):
        shown = suites if OmegaConf.is_list(e.suite) else e.suite
        raise ConfigError(f"eval.suite = {shown!r}; accepted: one of eval.suites ({', '.join(e.suites)}) "
                          "or a list of them")
    if not e.variant:
        raise ConfigError(f"eval.variant = {e.variant!r}; accepted: {BASE} or a fine-tuned variant's name")
    if e.variant == SHIPPED and maker_rope(cfg) is None:
        raise ConfigError(f"eval.variant = {SHIPPED!r} with eval.shipped = {e.get('shipped', False)!r}: this "
                          "experiment has no such variant; accepted: eval.shipped=auto with a checkpoint (model.path) "
                          "that ships a RoPE scaling or whose maker recommends one (rope.hf_config.MAKER_RECOMMENDED)")
    if e.training_free and e.variant not in cfg.methods:
        raise ConfigError(f"eval.variant = {e.variant!r} with eval.training_free = true: accepted: one of methods "
                          f"({', '.join(cfg.methods)}): their factors are applied to the base model")
    data = Path(cfg.out_dir) / "eval_data" / "eval_data.json"
    if not data.is_file():
        raise ConfigError(f"{data} is missing: run stage eval_data first (snakemake does)")
    if "longbench" in suites and e.longbench.path is not None:
        try:
            longbench.check_folder(e.longbench.path, list(e.longbench.tasks))
        except longbench.BenchmarkDataError as err:
            raise ConfigError(f"eval.longbench.path: {err}") from None
    error = checks.job_error(str(e.backend), suites)
    if error:
        raise ConfigError(error)
    return str(e.variant), suites


def scaling_for(cfg: DictConfig, method: str, searched: dict[str, Any] | None) -> Callable[[Any], Any]:
    """config -> the method's RopeScaling on that (original-RoPE) model config (searched: its search's result)."""
    def scaling(config: Any) -> Any:
        facts = dataclasses.replace(rope_facts_from_hf_config(config), train_len=int(cfg.model.train_len))
        return methods.method_scaling(method, facts, int(cfg.target_len), searched)

    return scaling


def training_free(cfg: DictConfig, model: Any, method: str, searched: dict[str, Any] | None) -> Any:
    """The base model with a method's RoPE scaling (searched: its search's result.json) and its weights
    untouched: the method before fine-tuning."""
    return scaling_for(cfg, method, searched)(model.config).apply_to_model(model)


def variant_rope(cfg: DictConfig, variant: str, free: bool) -> tuple[bool, dict[str, Any] | None]:
    """How the variant's checkpoint config gets its RoPE, the same on the hf and vLLM paths: (original_rope: its
    shipped scaling dropped, for the base and the training-free rows; rope_parameters written in: the maker's
    recommended scaling of the `shipped` variant, None where the checkpoint ships it and is loaded as it is)."""
    maker = maker_rope(cfg) if variant == SHIPPED else None
    return variant == BASE or free, None if maker is None else maker.config_edit


def load_model(cfg: DictConfig, path: str, original_rope: bool = False,
               rope_parameters: dict[str, Any] | None = None) -> tuple[Any, Any]:
    """The HF model (model.dtype on GPUs, float32 on CPUs) in eval mode, and its tokenizer."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, _ = load_base_model(cfg, stage_dtype(cfg, device), device, original_rope=original_rope, path=path,
                               rope_parameters=rope_parameters)
    return model, load_tokenizer(path)


def load_vllm(cfg: DictConfig, path: str, suite: str, free: bool, searched: dict[str, Any] | None,
              scratch: Path) -> tuple[backends.VllmModel, Any]:
    """The checkpoint vLLM loads for the job's one lm-eval suite, and the tokenizer: the base, training-free and
    recommended-scaling (`shipped`) rows get the RoPE the hf backend applies in-process written into a scratch
    config.json (variant_rope)."""
    variant = str(cfg.eval.variant)
    scaling = scaling_for(cfg, variant, searched) if free else None
    original_rope, rope_parameters = variant_rope(cfg, variant, free)
    model = backends.prepare_checkpoint(path, int(cfg.target_len), backends.max_model_len(cfg, suite), scratch,
                                        original_rope=original_rope, scaling=scaling, rope_parameters=rope_parameters)
    for change in model.changes:
        print(f"{path} for vLLM: {change}")
    return model, load_tokenizer(path)


def load_variant(cfg: DictConfig, path: str, suites: list[str], free: bool, searched: dict[str, Any] | None,
                 scratch: Path) -> tuple[Any, Any]:
    """The model the job's suites run on: a vLLM checkpoint (eval.backend = vllm, an lm-eval suite), else
    the HF model (the base and the base under a method's factors: the original RoPE, whatever it ships; the
    shipped variant: the maker's scaling, variant_rope)."""
    variant = str(cfg.eval.variant)
    if cfg.eval.backend == "vllm" and suites[0] in checks.LM_EVAL_SUITES:
        return load_vllm(cfg, path, suites[0], free, searched, scratch)
    original_rope, rope_parameters = variant_rope(cfg, variant, free)
    model, tokenizer = load_model(cfg, path, original_rope=original_rope, rope_parameters=rope_parameters)
    return (training_free(cfg, model, variant, searched) if free else model), tokenizer


def backend_facts(cfg: DictConfig, model: Any) -> dict[str, Any]:
    """What a result records of the loaded model: its rope_type (the shipped variant: also its maker's
    rope parameters and whether the checkpoint ships them); under vLLM also the backend and the config edits."""
    maker = maker_rope(cfg) if cfg.eval.variant == SHIPPED else None
    facts = {} if maker is None else {"maker_rope": {"rope_parameters": maker.rope_parameters,
                                                     "shipped_in_config": maker.shipped}}
    if isinstance(model, backends.VllmModel):
        # no changes: the checkpoint loaded as it is; else a scratch config.json with these edits
        return {"rope_type": model.rope_type, "backend": "vllm", "vllm_config_changes": list(model.changes), **facts}
    return {"rope_type": model.config.rope_parameters.get("rope_type", "default"), **facts}


def run(cfg: DictConfig) -> dict[str, dict[str, Any]]:
    """Every suite of eval.suite on the variant, in turn: one model load, per suite its own output
    folder (complete or absent) and MLflow run."""
    variant, suites = check_config(cfg)
    path, free = model_dir(cfg, variant), bool(cfg.eval.training_free)
    name = f"{variant} (training-free)" if free else variant
    searched = search_result(cfg, variant) if free else None  # a missing search fails before any model loads
    if cfg.eval.backend == "vllm" and suites[0] in checks.LM_EVAL_SUITES:
        backends.check_vllm()  # missing or too old: fails before any model loads
    data = Path(cfg.out_dir) / "eval_data"
    quiet_lm_eval()
    results: dict[str, dict[str, Any]] = {}
    with torch_threads(cfg.eval.num_threads), tempfile.TemporaryDirectory() as checkpoints:
        model, tokenizer = load_variant(cfg, path, suites, free, searched, Path(checkpoints))
        for suite in suites:
            out = eval_dir(cfg, variant, suite, training_free=free)
            # The experiment's seed (not run_seed) draws the test data: every replicate is scored on the same samples.
            run_name = f"evaluate-{variant}{'-training_free' if free else ''}-{suite}"
            with stage_run(cfg, run_name, per_seed=variant not in SHARED_VARIANTS) as tracker:
                tracker.set_tags({"variant": variant, "suite": suite, "model": path, "training_free": str(free)})
                with atomic_dir(out) as scratch:
                    result = SUITES[suite](cfg, model, tokenizer, data, scratch)
                    result = {"variant": variant, "suite": suite, "model": path, "training_free": free,
                              **backend_facts(cfg, model), **result}
                    write_json(scratch / f"{suite}.json", result)
                tracker.log_metrics(headline(suite, result))
                tracker.log_artifact(out, f"eval/{variant}/{suite}")
            print(f"evaluate {name}/{suite}: {json.dumps(headline(suite, result))}")
            results[suite] = result
    return results


main = hydra_stage(run)

if __name__ == "__main__":
    main()

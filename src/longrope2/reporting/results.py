"""The run's results read back, joined by sample id, and the paper's numbers beside them."""

from __future__ import annotations

import dataclasses
import importlib.resources
from fractions import Fraction
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig

from longrope2.core.artifacts import (
    BASE,
    SHIPPED,
    DamagedInputError,
    eval_dir,
    eval_variants,
    read_json,
)
from longrope2.core.checkpoint import maker_rope
from longrope2.core.checks import finetune_tokens
from longrope2.core.config import run_dir, to_dict
from longrope2.core.errors import ConfigError
from longrope2.reporting import claims, tables
from longrope2.rope import methods


def _str_keys(data: Any) -> Any:
    """Lengths are integer keys in the YAML and strings in our JSON results."""
    if isinstance(data, dict):
        return {str(k): _str_keys(v) for k, v in data.items()}
    return data


def paper_numbers(name: str | None) -> dict[str, Any]:
    """The paper's tables for one base model (docs/method.md §8), or {} for none."""
    if name is None:
        return {}
    data = _str_keys(yaml.safe_load(importlib.resources.files("longrope2.reporting").joinpath("paper_tables.yaml").read_text()))
    return {
        "table2": data["table2_ruler_avg"][name],
        "table4": data["table4_short"][name],
        "tables8_9": data["tables8_9_ruler_per_task"][f"{name}_longrope2"],
        "5": data["table5_rcd"][name], "6": data["table6_search_metric"][name],
        "7": data["table7_mixed_window"][name], "10": data["table10_searched_dims"][name],
    }


def seeds(cfg: DictConfig) -> list[int]:
    return [int(k) for k in cfg.seeds]


def _evaluated(cfg: DictConfig) -> list[tuple[str, str, bool]]:
    """(suite, variant, training-free) of every evaluation the experiment runs."""
    out = [(suite, variant, False) for suite in cfg.eval.suites for variant in eval_variants(cfg)]
    return out + [(suite, str(m), True) for suite in cfg.eval.training_free_suites for m in cfg.methods]


def variant_label(cfg: DictConfig, variant: str) -> str:
    """The name a variant's row has in the tables: its own, the shipped variant's
    "shipped (<rope_type> as its maker sets it)"."""
    maker = maker_rope(cfg) if variant == SHIPPED else None
    return variant if maker is None else f"{SHIPPED} ({maker.rope_type} as its maker sets it)"


def load_results(cfg: DictConfig) -> dict[str, dict[str, dict[str, Any]]]:
    """suite -> variant -> result (a fine-tuned variant's: its mean over the seeds; a method's training-free
    result under "<method> (training-free)"; the shipped variant's under variant_label); every (variant, suite,
    seed) of the experiment must exist."""
    results: dict[str, dict[str, dict[str, Any]]] = {}
    missing = []
    for suite, variant, free in _evaluated(cfg):
        paths = [eval_dir(cfg, variant, suite, k, training_free=free) / f"{suite}.json" for k in seeds(cfg)]
        paths = list(dict.fromkeys(paths))  # the base: one path for every seed
        absent = [str(p) for p in paths if not p.is_file()]
        if absent:
            missing += absent
            continue
        name = claims.training_free(variant) if free else variant_label(cfg, variant)
        results.setdefault(suite, {})[name] = tables.mean_over_seeds([read_json(p) for p in paths])
    if missing:
        raise ConfigError(f"report: evaluation results missing (run stage evaluate first): {', '.join(missing)}")
    return results


def _label(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def _read(path: Path) -> dict[str, Any] | None:
    return read_json(path) if path.is_file() else None


def _scored(data: dict[str, Any] | None, key: str | None, path: Path, source: str | None = None
            ) -> claims.Scored | None:
    """data["correct"][key] with data["ids"][key] (key None: data["correct"], data["ids"]) as claims.Scored;
    None when the file holds no outcomes there. Outcomes without ids are a stale file: stop, naming it."""
    if not data:
        return None
    correct, ids = data.get("correct"), data.get("ids")
    if key is not None:
        correct, ids = (correct or {}).get(key), (ids or {}).get(key)
    if not correct:
        return None
    if ids is None:
        raise DamagedInputError(f"{path}: per-sample outcomes{'' if key is None else f' at {key}'} without sample ids "
                                "(written before ids were recorded, or damaged): rerun the stage that wrote it")
    return claims.Scored(tuple(map(str, ids)), tuple(int(x) for x in correct), source or str(path))


def evidence_names(cfg: DictConfig) -> dict[str, str]:
    """Evidence keys -> names: "niah_<n>" (the needle grid at n tokens, for every length of eval.niah),
    "heldout_L" / "heldout_short" (stage train's held-out needle sets at L and L_train), "short:<task>"."""
    target, train_len = int(cfg.target_len), int(cfg.model.train_len)
    names = {"heldout_L": f"held-out {_label(target)}", "heldout_short": f"held-out {_label(train_len)}"}
    if "niah" in cfg.eval.suites:
        names |= {f"niah_{int(n)}": f"NIAH {_label(int(n))}" for n in cfg.eval.niah.lengths}
    if "short" in cfg.eval.suites:
        names |= {f"short:{t.name}": f"{t.name} (short suite)" for t in cfg.eval.short.tasks}
    return names


def paired_outcomes(cfg: DictConfig) -> tuple[dict[tuple[str, str], dict[int | None, claims.Scored]], dict[str, str]]:
    """Per-sample outcomes of every evaluated model by evidence and seed (claims.Outcomes; seed None: the base's
    evaluations, one model beside every seed), with their sample ids and files, and the evidence names
    (evidence_names)."""
    names = evidence_names(cfg)
    niah_keys = {key: key.removeprefix("niah_") for key in names if key.startswith("niah_")}
    short_tasks = [key.removeprefix("short:") for key in names if key.startswith("short:")]
    out: dict[tuple[str, str], dict[int | None, claims.Scored]] = {}

    def add(variant: str, evidence: str, seed: int | None, scored: claims.Scored | None) -> None:
        if scored is not None:
            out.setdefault((variant, names[evidence]), {})[seed] = scored

    def add_suites(variant: str, seed: int | None, free: bool = False) -> None:
        if niah_keys and (not free or "niah" in cfg.eval.training_free_suites):
            path = eval_dir(cfg, variant, "niah", seed, training_free=free) / "niah.json"
            niah = _read(path)
            for key, length in niah_keys.items():
                add(claims.training_free(variant) if free else variant, key, seed, _scored(niah, length, path))
        if short_tasks and not free:
            path = eval_dir(cfg, variant, "short", seed) / "short.json"
            tasks = (_read(path) or {}).get("tasks", {})
            for t in short_tasks:
                add(variant, f"short:{t}", seed, _scored(tasks.get(t), None, path, f"{path} ({t})"))

    add_suites(BASE, None)
    for k in seeds(cfg):
        for m in map(str, cfg.methods):
            add_suites(m, k)
            add_suites(m, k, free=True)
            path = run_dir(cfg, k) / "train" / m / "validation.json"
            validation = _read(path) or {}
            for key, split in (("heldout_L", "validation"), ("heldout_short", "validation_short")):
                add(m, key, k, _scored(validation.get("tuned", {}).get(split), None, path, f"{path} (tuned {split})"))
                # the base on this seed's held-out set (every method's validation.json has it: the first one)
                if (BASE, names[key]) not in out or k not in out[(BASE, names[key])]:
                    add(BASE, key, k, _scored(validation.get("base", {}).get(split), None, path,
                                              f"{path} (base {split})"))
    return out, names


def paper_table2_leads() -> dict[Fraction, tuple[str, ...]]:
    """The paper's Table 2 (both models): length / L -> the baselines LongRoPE2 outperforms at that ratio."""
    data = yaml.safe_load(importlib.resources.files("longrope2.reporting").joinpath("paper_tables.yaml").read_text())
    return claims.paper_table2_leads(data["table2_ruler_avg"])


def claim_comparisons(cfg: DictConfig) -> list[claims.Comparison]:
    """The paper's claims this run can test (longrope2.claims), each classified by its paired intervals, with
    Holm's adjustment within each claim.

    Table 2 is tested at every needle-grid length n with L_train < n <= L whose ratio n / L is a column of the
    paper's Table 2 (L/32 ... L), against the baselines LongRoPE2 leads there in both of the paper's models,
    and on the held-out set at L; 2 L, before fine-tuning and against PI / none are our additions."""
    outcomes, names = paired_outcomes(cfg)
    ran = [str(m) for m in cfg.methods]
    target, train_len = int(cfg.target_len), int(cfg.model.train_len)
    leads = paper_table2_leads()
    niah = sorted(int(key.removeprefix("niah_")) for key in names if key.startswith("niah_"))
    covered = [n for n in niah if train_len < n <= target and Fraction(n, target) in leads]
    at = [(names[f"niah_{n}"], leads[Fraction(n, target)]) for n in covered]
    held_out = [(names["heldout_L"], leads[Fraction(1)])]
    beyond = [(names[f"niah_{n}"], claims.TABLE2_BASELINES + claims.OUR_BASELINES) for n in niah if n > target]
    ours = [(evidence, claims.OUR_BASELINES) for evidence, _ in at + held_out]
    found = []
    for k in seeds(cfg):
        result = _read(run_dir(cfg, k) / "search" / "longrope2" / "result.json")
        if result is not None:
            found.append(result)
    short = [names["heldout_short"]] + [v for key, v in names.items() if key.startswith("short:")]
    hint = f" (experiment {cfg.experiment_name}: add it to `methods`)"
    try:
        return claims.decide(
            claims.table2(outcomes, ran, at + held_out, "Table 2, fine-tuned: LongRoPE2 outperforms", suggestion=hint)
            + claims.table2(outcomes, ran, beyond, "Table 2 beyond L, fine-tuned (our addition)", suggestion=hint)
            + claims.table2(outcomes, ran, at + beyond, "Table 2 before fine-tuning (our addition)", True,
                            suggestion=hint)
            + claims.table2(outcomes, ran, ours, "LongRoPE2 outperforms PI and no extension (our addition)",
                            suggestion=hint)
            + claims.retention(outcomes, ran, short)
            + claims.ablations(outcomes, ran, names.get(f"niah_{target}", names["heldout_L"]), names["heldout_short"],
                               "add its methods to `methods`, e.g. experiment=toy_ablations")
            + claims.critical_dim(found))
    except claims.OutcomeMismatch as e:  # a stale or partial result: stop, naming both files
        raise DamagedInputError(f"report: {e}") from None


def regime_line(cfg: DictConfig) -> str:
    """The fine-tuning budget as a share of the base's pretraining tokens (the paper: 10B of 15T, ~0.07 %)."""
    data = to_dict(cfg)
    tokens = finetune_tokens(data)
    gate = _read(Path(cfg.out_dir) / "pretrain" / "gate.json")
    base = (gate or {}).get("pretrain_tokens") or cfg.model.pretrain_tokens
    if not base:
        return f"Fine-tuning: {tokens:,} tokens (the base's pretraining tokens are unknown: model.pretrain_tokens)."
    return (f"Fine-tuning: {tokens:,} tokens = {100 * tokens / int(base):.2f} % of the base's {int(base):,} "
            "pretraining tokens (the paper: 10B of LLaMA3-8B's 15T, ~0.07 %).")


def ablation_tables(cfg: DictConfig, results: dict[str, dict[str, dict[str, Any]]],
                    paper: dict[str, Any]) -> list[tables.Table]:
    """Tables 5, 6, 7, 10 at the target length, for each ablation whose methods the experiment runs."""
    length = str(cfg.target_len)
    columns: dict[str, dict[str, float | None]] = {}
    if "ruler" in results:
        columns[f"RULER {length}"] = {m: r["average"].get(length) for m, r in results["ruler"].items()}
    if "niah" in results:
        columns[f"needle EM {length}"] = {m: r["mean_by_length"].get(length) for m, r in results["niah"].items()}
    if "short" in results:
        columns["short avg"] = {m: None if r.get("average") is None else 100 * r["average"]
                                for m, r in results["short"].items()}
        columns["retention"] = {m: r.get("retention") for m, r in results["short"].items()}
    out = []
    for table_id in tables.ABLATIONS:
        chosen = [m for m in methods.TABLES[table_id] if m in cfg.methods]
        if not set(chosen) - set(methods.TABLES["2"]):  # none of the ablation's own methods ran
            continue
        out.append(tables.ablation(table_id, chosen, columns, paper.get(table_id), length if paper else None))
    return out


def build_tables(cfg: DictConfig, results: dict[str, dict[str, dict[str, Any]]],
                 paper: dict[str, Any], comparisons: list[claims.Comparison] | None = None) -> list[tables.Table]:
    out = [claims.summary_table(comparisons), claims.detail_table(comparisons)] if comparisons else []
    table2 = str(cfg.report.table2_suite)

    def at_target(suite: str) -> int | None:
        return int(cfg.target_len) if suite == table2 else None

    if "ruler" in results:
        out.append(tables.ruler_by_length(results["ruler"], paper.get("table2"), at_target("ruler")))
        for variant, result in results["ruler"].items():
            per_task = paper.get("tables8_9") if variant == "longrope2" else None
            out.append(tables.ruler_per_task(variant, result, per_task))
    if "short" in results:
        out.append(tables.short_tasks(results["short"], paper.get("table4")))
    if "longbench" in results:
        out.append(tables.longbench(results["longbench"]))
    if "niah" in results:  # the paper's ordering: paired comparisons in the claims tables, not here
        niah = tables.niah_by_length(results["niah"], None)
        if table2 == "niah":
            niah = dataclasses.replace(niah, title=niah.title + ", this experiment's Table 2", notes=[
                "The paper's Table 2 ordering, fine-tuned and training-free: paired comparisons in claims.md and "
                "claims_detail.md."])
        out.append(niah)
    if "ppl" in results:
        out.append(tables.perplexity_by_length(results["ppl"]))
    return out + ablation_tables(cfg, results, paper)


def factors_by_method(cfg: DictConfig) -> dict[str, list[list[float]]]:
    """Every fine-tuned method's long factors, one list per seed, from seed<k>/train/<method>/train.json."""
    curves: dict[str, list[list[float]]] = {}
    for method in cfg.methods:
        for k in seeds(cfg):
            summary = run_dir(cfg, k) / "train" / str(method) / "train.json"
            lam = read_json(summary).get("long_factor") if summary.is_file() else None
            if lam:
                curves.setdefault(str(method), []).append(lam)
    return curves

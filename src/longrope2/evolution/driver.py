"""The GA driver: the search space from the config, candidate scoring across processes, the state."""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig
from tqdm.auto import tqdm

from longrope2.core import resume
from longrope2.core.config import to_dict
from longrope2.core.errors import ConfigError
from longrope2.core.outputs import atomic_file
from longrope2.core.processes import Workers
from longrope2.data.needles import NeedleSample
from longrope2.evolution import fitness, operators
from longrope2.evolution import space as space_
from longrope2.evolution.space import Individual, SearchSpace
from longrope2.lm import losses
from longrope2.rope import factors as rope
from longrope2.rope.hf_config import RopeFacts
from longrope2.rope.scaling import RopeScaling


def search_space(cfg: DictConfig, facts: RopeFacts, dims: dict[str, Any], c_range: tuple[int, int]) -> SearchSpace:
    s = cfg.search
    attention_range = tuple(float(x) for x in s.attention_range) if s.attention_factor == "search" else None
    return SearchSpace(
        n_pairs=facts.rotary_dim // 2, s=rope.extension_ratio(int(cfg.target_len), facts.train_len),
        d_tcd=int(dims["d_tcd"]), c_range=c_range, grid=float(s.grid),
        strict=s.monotone == "strictly_increasing", all_dims=bool(s.all_dims),
        last_step_max=None if s.last_step_max is None else float(s.last_step_max), attention_range=attention_range,
        operators=str(s.operators),
    )


def c_ranges(cfg: DictConfig, dims: dict[str, Any]) -> list[tuple[int, int]]:
    """One GA over the critical dims (paper Alg. 1) or one GA per fixed c (reference code).

    search.c_range, or the preset's: [d10_tcd, d_tcd] (paper); the reference code's default c,
    ceil(D log_base(L_train / 2 pi)) - 1 = d_tcd - 1.
    """
    if cfg.search.c_range is not None:
        lo, hi = (int(c) for c in cfg.search.c_range)
        if not 0 < lo <= hi <= int(dims["d_tcd"]):
            raise ConfigError(f"search.c_range = {[lo, hi]}: accepted: null or [lo, hi] with 0 < lo <= hi <= d_tcd "
                              f"= {dims['d_tcd']} (the OOD bound: dims from d_tcd need lambda >= s)")
    elif cfg.search.preset == "reference":
        lo = hi = int(dims["d_tcd"]) - 1
    else:
        lo, hi = int(dims["d10_tcd"]), int(dims["d_tcd"])
    if cfg.search.critical_dim_mode == "per_c":
        return [(c, c) for c in range(lo, hi + 1)]
    return [(lo, hi)]


def attention_of(cfg: DictConfig, ind: Individual, s: float, train_len: int) -> float:
    a = cfg.search.attention_factor
    if a == "search":
        return float(ind.attention_factor)
    if a == "default":
        return rope.longrope_attention_factor(s, train_len)
    return float(a)


class Evaluator:
    """Fitness of candidates; an iteration's candidates are shared among the processes."""

    def __init__(self, cfg: DictConfig, model: torch.nn.Module, facts: RopeFacts, samples: list[NeedleSample],
                 plain_ids: torch.Tensor, workers: Workers) -> None:
        self.cfg, self.model, self.facts, self.workers = cfg, model, facts, workers
        self.samples, self.plain_ids = samples, plain_ids
        self.target_len = int(cfg.target_len)
        self.s = rope.extension_ratio(self.target_len, facts.train_len)

    def scaling(self, ind: Individual) -> RopeScaling:
        return RopeScaling.longrope(self.facts, self.target_len, long_factor=list(ind.factors),
                                    attention_factor=attention_of(self.cfg, ind, self.s, self.facts.train_len),
                                    critical_dim=ind.c if 0 < ind.c < len(ind.factors) else None)

    def score(self, scaling: RopeScaling) -> float:
        out = fitness.evaluate(self.model, scaling, str(self.cfg.search.fitness), self.samples, self.plain_ids,
                               int(self.cfg.search.batch_size))
        return float(out["fitness"])

    def __call__(self, candidates: Sequence[Individual], progress: bool) -> list[float]:
        w = self.workers
        values = torch.zeros(len(candidates), dtype=torch.float64)
        mine = range(w.rank, len(candidates), w.world)
        for i in tqdm(mine, desc="candidates", leave=False, disable=not (progress and w.main)):
            values[i] = self.score(self.scaling(candidates[i]))
        if w.world > 1:  # each candidate is scored by exactly one process: the sum gathers them
            buf = values.to(w.device)
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            values = buf.cpu()
        return values.tolist()


def _median(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.median(finite) if finite else math.inf


def new_run_state(c_range: tuple[int, int], seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(np.random.SeedSequence([seed, *c_range]))
    return {"c_range": list(c_range), "iteration": -1, "population": [], "rng": rng.bit_generator.state,
            "done": False}


def run_ga(
    run: dict[str, Any],
    space: SearchSpace,
    knobs: DictConfig,
    evaluate: Callable[[Sequence[Individual]], list[float]],
    evaluated: list[tuple[Individual, float]],
    on_iteration: Callable[[dict[str, Any]], None],
) -> None:
    """Advance one GA run to knobs.iterations, calling on_iteration after each finished iteration.

    ``run`` (population, iteration, RNG state) is updated in place, so saving it in on_iteration
    and calling run_ga again after a kill continues exactly where it stopped.
    """
    rng = np.random.default_rng()
    rng.bit_generator.state = run["rng"]
    seen = {ind.key() for ind, _ in evaluated}

    def scored_population() -> list[tuple[Individual, float]]:
        return [(space_.from_dict(d), f) for d, f in run["population"]]

    def finish(population: list[tuple[Individual, float]], new: int) -> None:
        run["population"] = [(space_.to_dict(ind), f) for ind, f in population]
        run["rng"] = rng.bit_generator.state
        run["iteration"] += 1
        run["done"] = run["iteration"] >= int(knobs.iterations)
        best_ind, best_fit = operators.best(population)
        on_iteration({"iteration": run["iteration"], "new_candidates": new, "best_fitness": best_fit,
                      "median_fitness": _median([f for _, f in population]), "best_c": best_ind.c})

    if run["iteration"] < 0:
        size = int(knobs.population if knobs.initial_population is None else knobs.initial_population)
        pop = operators.initial_population(space, size, rng, mutation_prob=float(knobs.mutation_prob),
                                           layout=str(knobs.initial))
        fits = evaluate(pop)
        evaluated += list(zip(pop, fits))
        seen.update(ind.key() for ind in pop)
        finish(list(zip(pop, fits)), len(pop))
    while not run["done"]:
        previous = scored_population()
        parents, children = operators.next_generation(
            previous, space, parents=int(knobs.parents), mutants=int(knobs.mutants),
            crossovers=int(knobs.crossovers), mutation_prob=float(knobs.mutation_prob),
            crossover_prob=float(knobs.crossover_prob), rng=rng, seen=seen,
            crossover_tries=int(knobs.crossover_tries), crossover_base=str(knobs.crossover_base),
        )
        fits = evaluate(children)
        evaluated += list(zip(children, fits))
        fitness_of = {ind.key(): f for ind, f in previous}
        finish([(p, fitness_of[p.key()]) for p in parents] + list(zip(children, fits)), len(children))


def fingerprint(cfg: DictConfig, needle_dir: Path) -> str:
    """Everything that shapes the search: a changed setting or sample set starts a fresh search (core.resume)."""
    data = to_dict(cfg)
    search = {k: v for k, v in data["search"].items() if k not in ("processes",)}
    return resume.fingerprint({"search": search, "seed": data["seed"], "target_len": data["target_len"],
                               "model": str(cfg.model.path), "train_len": data["model"]["train_len"]},
                              [needle_dir / "needle_data.json", needle_dir / "search.pt"])


def new_search_state(key: str, ranges: list[tuple[int, int]], seed: int) -> dict[str, Any]:
    """A fresh search's state: one GA run per c range, nothing evaluated yet."""
    return {"version": resume.STATE_VERSION, "fingerprint": key, "wall_s": 0.0, "history": [], "evaluated": [],
            "runs": [new_run_state(r, seed) for r in ranges]}


def write_history(path: Path, history: list[dict[str, Any]]) -> None:
    fields = ["run", "c_lo", "c_hi", "iteration", "evaluations", "new_candidates", "best_fitness",
              "median_fitness", "best_c"]
    with atomic_file(path) as scratch, scratch.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows({k: row[k] for k in fields} for row in history)


def baselines(facts: RopeFacts, target_len: int, dims: dict[str, Any]) -> dict[str, RopeScaling]:
    """Training-free references: the methods the search must beat."""
    s = rope.extension_ratio(target_len, facts.train_len)
    n, d_tcd = facts.rotary_dim // 2, int(dims["d_tcd"])
    return {
        "none": RopeScaling.none(facts, target_len),
        "pi": RopeScaling.pi(facts, target_len),
        "ntk": RopeScaling.ntk(facts, target_len),
        "yarn": RopeScaling.yarn(facts, target_len),
        # LongRoPE2's rule at the theoretical critical dim: λ = s from d_tcd, NTK tie below
        "dtcd_rule": RopeScaling.longrope2(facts, target_len, tail=[s] * (n - d_tcd), critical_dim=d_tcd),
    }


def validate_methods(model: torch.nn.Module, scalings: dict[str, RopeScaling], sets: dict[str, list[NeedleSample]],
                     batch_size: int) -> dict[str, dict[str, Any]]:
    """Per method and split: needle-PPL, exact match and the per-sample outcomes (`<split>_correct`)."""
    out: dict[str, dict[str, Any]] = {}
    for name, scaling in tqdm(scalings.items(), desc="validation", leave=False):
        fitness.set_long_rope(model, scaling)
        row: dict[str, Any] = {}
        for split, samples in sets.items():
            scores = losses.needle_scores(model, samples, batch_size, per_sample=True)
            row |= {f"{split}_needle_ppl": scores["needle_ppl"], f"{split}_exact_match": scores["exact_match"],
                    f"{split}_correct": scores["correct"]}
        out[name] = row
    return out

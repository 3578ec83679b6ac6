"""Stage `search`: the evolutionary search of LongRoPE2's rescaling factors (docs/method.md §2-§5).

In:  the base model (model.path), the replicate's needle samples (stage needle_data), the critical dims of
     stage critical_dim, search.* (the GA's numbers, fitness, ablation switches, execution).
Out: <out_dir>/seed<k>/search/<search.method>/ (k = run_seed; longrope2; longrope, longrope2_plain_ppl,
     longrope2_all_dims set their own search.* switches, see longrope2.methods)
       result.json            best long_factor, its critical dim c, fitness, s, attention factor
       rope_parameters.json   the same as transformers `rope_parameters` (longrope, short factors ones)
       history.csv            best and median fitness per iteration (per run in per_c mode)
       validation.json        held-out needle-PPL and exact match: searched factors vs the baselines
       convergence.png, factors.png
     State after every iteration in <out_dir>/seed<k>/search/<method>/state/<hash>.json: a killed search resumes there.

Scale-out: `torchrun --nproc_per_node N -m longrope2.search ...` shares each iteration's candidates
among N processes (gloo on CPUs, NCCL on GPUs); every process runs the same seeded GA, so the
result does not depend on N.

    python -m longrope2.search experiment=toy
"""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import hashlib
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from omegaconf import DictConfig  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from longrope2 import evolution, fitness, methods, rope  # noqa: E402
from longrope2.artifacts import DamagedInputError, read_json  # noqa: E402
from longrope2.config import ConfigError, hydra_stage, run_dir, run_seed, to_dict  # noqa: E402
from longrope2.evolution import Individual, SearchSpace  # noqa: E402
from longrope2.inputs import load_causal_lm, load_needle_sets  # noqa: E402
from longrope2.needle import NeedleSample  # noqa: E402
from longrope2.outputs import atomic_file, save_figure, write_json  # noqa: E402
from longrope2.scaling import RopeFacts, RopeScaling, rope_facts_from_hf_config  # noqa: E402
from longrope2.toy import torch_threads  # noqa: E402
from longrope2.tracking import StageRun, stage_run  # noqa: E402

STATE_VERSION = 1


# --------------------------------------------------------------------------- processes


@dataclasses.dataclass(frozen=True)
class Workers:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_workers() -> Workers:
    """torch.distributed from torchrun's environment (one process: nothing to initialise)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world == 1:
        return Workers(device=torch.device("cuda" if cuda else "cpu"))
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    return Workers(dist.get_rank(), dist.get_world_size(), torch.device(f"cuda:{local}" if cuda else "cpu"))


# --------------------------------------------------------------------------- inputs


def load_model(cfg: DictConfig, device: torch.device) -> tuple[torch.nn.Module, RopeFacts]:
    """The base model (bf16 + SDPA on GPUs, fp32 on CPUs) prepared for in-place RoPE swaps."""
    dtype = getattr(torch, str(cfg.model.dtype)) if device.type == "cuda" else torch.float32
    try:
        model = load_causal_lm(str(cfg.model.path), int(cfg.target_len), original_rope=True, dtype=dtype,
                               attn_implementation="sdpa")
    except DamagedInputError:  # names the damaged file and its rule already
        raise
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.path = {cfg.model.path!r}: cannot load a causal LM there ({err})") from None
    model.to(device).eval()
    # The experiment's L_train wins over the config's window (Phi3-mini is extended from 2k, not 4k).
    facts = dataclasses.replace(rope_facts_from_hf_config(model.config), train_len=int(cfg.model.train_len))
    return fitness.prepare_for_search(model, facts), facts


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
        return rope.attention_temperature(s, train_len)
    return float(a)


# --------------------------------------------------------------------------- the search


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
        return [(evolution.from_dict(d), f) for d, f in run["population"]]

    def finish(population: list[tuple[Individual, float]], new: int) -> None:
        run["population"] = [(evolution.to_dict(ind), f) for ind, f in population]
        run["rng"] = rng.bit_generator.state
        run["iteration"] += 1
        run["done"] = run["iteration"] >= int(knobs.iterations)
        best_ind, best_fit = evolution.best(population)
        on_iteration({"iteration": run["iteration"], "new_candidates": new, "best_fitness": best_fit,
                      "median_fitness": _median([f for _, f in population]), "best_c": best_ind.c})

    if run["iteration"] < 0:
        size = int(knobs.population if knobs.initial_population is None else knobs.initial_population)
        pop = evolution.initial_population(space, size, rng, mutation_prob=float(knobs.mutation_prob),
                                           layout=str(knobs.initial))
        fits = evaluate(pop)
        evaluated += list(zip(pop, fits))
        seen.update(ind.key() for ind in pop)
        finish(list(zip(pop, fits)), len(pop))
    while not run["done"]:
        previous = scored_population()
        parents, children = evolution.next_generation(
            previous, space, parents=int(knobs.parents), mutants=int(knobs.mutants),
            crossovers=int(knobs.crossovers), mutation_prob=float(knobs.mutation_prob),
            crossover_prob=float(knobs.crossover_prob), rng=rng, seen=seen,
            crossover_tries=int(knobs.crossover_tries), crossover_base=str(knobs.crossover_base),
        )
        fits = evaluate(children)
        evaluated += list(zip(children, fits))
        fitness_of = {ind.key(): f for ind, f in previous}
        finish([(p, fitness_of[p.key()]) for p in parents] + list(zip(children, fits)), len(children))


# --------------------------------------------------------------------------- state


def fingerprint(cfg: DictConfig, needle_dir: Path) -> str:
    """Everything that shapes the search: a changed setting or sample set starts a fresh search."""
    data = to_dict(cfg)
    search = {k: v for k, v in data["search"].items() if k not in ("processes",)}
    digest = hashlib.sha256()
    digest.update(json.dumps({"search": search, "seed": data["seed"], "target_len": data["target_len"],
                              "model": str(cfg.model.path), "train_len": data["model"]["train_len"]},
                             sort_keys=True).encode())
    for name in ("needle_data.json", "search.pt"):
        digest.update((needle_dir / name).read_bytes())
    return digest.hexdigest()[:16]


def load_state(path: Path, key: str) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    state = json.loads(path.read_text())
    return state if state.get("version") == STATE_VERSION and state.get("fingerprint") == key else None


def save_state(path: Path, state: dict[str, Any]) -> None:
    with atomic_file(path) as scratch:
        scratch.write_text(json.dumps(state))


# --------------------------------------------------------------------------- outputs


def write_history(path: Path, history: list[dict[str, Any]]) -> None:
    fields = ["run", "c_lo", "c_hi", "iteration", "evaluations", "new_candidates", "best_fitness",
              "median_fitness", "best_c"]
    with atomic_file(path) as scratch, scratch.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows({k: row[k] for k in fields} for row in history)


def plot_convergence(history: list[dict[str, Any]], fitness_name: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    runs = sorted({row["run"] for row in history})
    for r in runs:
        rows = [row for row in history if row["run"] == r]
        label = "" if len(runs) == 1 else f" (c = {rows[0]['c_lo']})"
        line, = ax.plot([x["iteration"] for x in rows], [x["best_fitness"] for x in rows], "o-", ms=3,
                        label=f"best{label}")
        ax.plot([x["iteration"] for x in rows], [x["median_fitness"] for x in rows], "--", color=line.get_color(),
                alpha=0.6, label=f"median{label}")
    ax.set_xlabel("iteration")
    ax.set_ylabel(fitness_name.replace("_", "-"))
    ax.set_yscale("log")
    ax.set_title("Search convergence")
    ax.legend(fontsize=7)
    save_figure(fig, path)


def plot_factors(curves: dict[str, list[float]], c: int, dims: dict[str, Any], s: float, path: Path) -> None:
    """λ per frequency pair per method with c, d_tcd, s and 2s marked (paper Figure 4 style)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, lam in curves.items():
        ax.plot(range(len(lam)), lam, "o-" if name == "searched" else "-", ms=3, lw=2 if name == "searched" else 1,
                label=name)
    ax.axhline(s, color="grey", ls="--", lw=0.8, label=f"s = {s:g}")
    ax.axhline(2 * s, color="grey", ls=":", lw=0.8, label=f"2s = {2 * s:g}")
    ax.axvline(c, color="tab:red", ls="--", lw=0.8, label=f"searched c = {c}")
    ax.axvline(dims["d_tcd"], color="black", ls=":", lw=0.8, label=f"$d_{{tcd}}$ = {dims['d_tcd']}")
    ax.set_xlabel("frequency pair i")
    ax.set_ylabel("rescaling factor $\\lambda_i$")
    ax.set_title("Rescaling factors")
    ax.legend(fontsize=7)
    save_figure(fig, path)


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
            scores = fitness.needle_fitness(model, samples, batch_size, per_sample=True)
            row |= {f"{split}_needle_ppl": scores["needle_ppl"], f"{split}_exact_match": scores["exact_match"],
                    f"{split}_correct": scores["correct"]}
        out[name] = row
    return out


# --------------------------------------------------------------------------- stage


def with_method(cfg: DictConfig) -> DictConfig:
    """cfg with search.* set as search.method needs (e.g. longrope: all dims, plain-PPL fitness)."""
    cfg = copy.deepcopy(cfg)
    for key, value in methods.SEARCH_OVERRIDES[str(cfg.search.method)].items():
        cfg.search[key] = value
    return cfg


def run(cfg: DictConfig) -> dict[str, Any]:
    cfg = with_method(cfg)
    workers = init_workers()
    try:
        with torch_threads(cfg.search.num_threads):
            return _run(cfg, workers)
    finally:
        if workers.world > 1:
            dist.destroy_process_group()


def _run(cfg: DictConfig, workers: Workers) -> dict[str, Any]:
    out = run_dir(cfg) / "search" / str(cfg.search.method)
    needle_dir = run_dir(cfg) / "needle_data"
    dims = read_json(Path(cfg.out_dir) / "critical_dim" / "critical_dim.json", ("d_tcd", "d10_tcd"))
    ranges = c_ranges(cfg, dims)  # checked before the model loads
    needle_sets = load_needle_sets(needle_dir)  # split -> (samples, plain_ids)
    samples, plain_ids = needle_sets["search"]
    model, facts = load_model(cfg, workers.device)
    target_len = int(cfg.target_len)
    if samples[0].length != target_len:
        raise ConfigError(f"target_len = {target_len} but the needle samples in {needle_dir} have "
                          f"{samples[0].length} tokens: rerun stage needle_data")
    evaluator = Evaluator(cfg, model, facts, samples, plain_ids, workers)
    progress = workers.main

    key = fingerprint(cfg, needle_dir)
    state_path = out / "state" / f"{key}.json"
    state = load_state(state_path, key) or {
        "version": STATE_VERSION, "fingerprint": key, "wall_s": 0.0, "history": [], "evaluated": [],
        "runs": [new_run_state(r, run_seed(cfg)) for r in ranges],
    }
    evaluated = [(evolution.from_dict(d), f) for d, f in state["evaluated"]]
    resumed = sum(r["iteration"] + 1 for r in state["runs"])
    knobs = cfg.search

    tracker_cm = (stage_run(cfg, f"search-{cfg.search.method}", per_seed=True) if workers.main
                  else contextlib.nullcontext(StageRun()))
    with tracker_cm as tracker:
        if resumed and workers.main:
            print(f"resuming the search from {state_path} ({resumed} finished iterations)")
            tracker.mark_resumed(f"{resumed} finished iterations from {state_path}")
        for h in state["history"]:  # a resumed run logs its earlier iterations again
            tracker.log_metrics({"best_fitness": h["best_fitness"], "median_fitness": h["median_fitness"]},
                                step=h["step"])
        total = len(state["runs"]) * (int(knobs.iterations) + 1)
        bar = tqdm(total=total, initial=resumed, desc="search iterations", disable=not progress)
        for index, run_state in enumerate(state["runs"]):
            space = search_space(cfg, facts, dims, tuple(run_state["c_range"]))
            t_start = time.monotonic()

            def on_iteration(row: dict[str, Any], run_state: dict[str, Any] = run_state, index: int = index) -> None:
                nonlocal t_start
                now = time.monotonic()
                state["wall_s"] += now - t_start
                t_start = now
                row = {"run": index, "c_lo": run_state["c_range"][0], "c_hi": run_state["c_range"][1],
                       "evaluations": len(evaluated), "step": len(state["history"]), **row}
                state["history"].append(row)
                state["evaluated"] = [(evolution.to_dict(i), f) for i, f in evaluated]
                if workers.main:
                    save_state(state_path, state)
                    tracker.log_metrics({"best_fitness": row["best_fitness"], "median_fitness": row["median_fitness"],
                                         "best_c": row["best_c"], "evaluations": row["evaluations"]}, step=row["step"])
                bar.update(1)
                bar.set_postfix(best=f"{row['best_fitness']:.4g}", c=row["best_c"])

            run_ga(run_state, space, knobs, lambda cands: evaluator(cands, progress), evaluated, on_iteration)
        bar.close()

        finals = [evolution.best([(evolution.from_dict(d), f) for d, f in r["population"]]) for r in state["runs"]]
        best_ind, best_fit = evolution.best(finals)
        scaling = evaluator.scaling(best_ind)
        if not workers.main:
            return {}
        # Samples longer than L_train only: the long path is what the search chose.
        sets = {split: samples for split, (samples, _) in needle_sets.items() if split in ("search", "validation")}
        result = write_outputs(cfg, out, model, facts, dims, sets, state, best_ind, best_fit, scaling, tracker)
    return result


def write_outputs(cfg: DictConfig, out: Path, model: torch.nn.Module, facts: RopeFacts, dims: dict[str, Any],
                  sets: dict[str, list[NeedleSample]], state: dict[str, Any], best_ind: Individual,
                  best_fit: float, scaling: RopeScaling, tracker: StageRun) -> dict[str, Any]:
    target_len = int(cfg.target_len)
    s = rope.extension_ratio(target_len, facts.train_len)
    result = {
        "method": str(cfg.search.method), "all_dims": bool(cfg.search.all_dims),
        "fitness": str(cfg.search.fitness), "fitness_value": best_fit, "critical_dim": best_ind.c,
        "s": s, "attention_factor": scaling.attention_factor, "long_factor": list(scaling.long_factor),
        "short_factor": list(scaling.short_factor), "d_tcd": int(dims["d_tcd"]), "d10_tcd": int(dims["d10_tcd"]),
        "train_len": facts.train_len, "target_len": target_len, "evaluations": len(state["evaluated"]),
        "iterations": int(cfg.search.iterations), "critical_dim_mode": str(cfg.search.critical_dim_mode),
        "preset": str(cfg.search.preset), "operators": str(cfg.search.operators),
        "wall_s": state["wall_s"], "seed": run_seed(cfg),
    }
    write_json(out / "result.json", result)
    write_json(out / "rope_parameters.json", scaling.to_rope_parameters())
    write_history(out / "history.csv", state["history"])
    plot_convergence(state["history"], str(cfg.search.fitness), out / "convergence.png")

    # Held-out check: the searched factors against the training-free baselines (once, in the longrope2
    # search: the other searches' baselines would be the same numbers).
    references = baselines(facts, target_len, dims)
    compared = (references if str(cfg.search.method) == "longrope2" else {}) | {"searched": scaling}
    # The other processes have exited: the job's cores are this process's now.
    with torch_threads(int(cfg.resources.search.cpus)):
        table = validate_methods(model, compared, sets, int(cfg.search.batch_size))
    write_json(out / "validation.json", {"target_len": target_len, "samples": {k: len(v) for k, v in sets.items()},
                                         "methods": table})
    curves = {name: list(m.long_factor) for name, m in references.items() if name != "none"}
    curves["searched"] = list(scaling.long_factor)
    plot_factors(curves, best_ind.c, dims, s, out / "factors.png")

    split = "validation" if "validation" in sets else "search"
    tracker.log_metrics({"best_fitness": best_fit, "critical_dim": best_ind.c, "wall_s": state["wall_s"]}
                        | {f"{name}_{split}_{k}": row[f"{split}_{k}"] for name, row in table.items()
                           for k in ("needle_ppl", "exact_match")})
    for name in ("result.json", "rope_parameters.json", "history.csv", "validation.json", "convergence.png",
                 "factors.png"):
        tracker.log_artifact(out / name)
    print(f"searched c = {best_ind.c}, {cfg.search.fitness} = {best_fit:.4f}, {len(state['evaluated'])} "
          f"candidates in {state['wall_s']:.0f} s -> {out}")
    print(f"{split} set ({len(sets[split])} samples, {target_len} tokens):")
    for name, row in table.items():
        print(f"  {name:10s} needle-PPL {row[f'{split}_needle_ppl']:10.4f}   exact match "
              f"{row[f'{split}_exact_match']:.3f}")
    return result


main = hydra_stage(run)

if __name__ == "__main__":
    main()

"""Stage `search`: the evolutionary search of LongRoPE2's rescaling factors (docs/method.md §2-§5).

In:  the base model (model.path), the replicate's needle samples (stage needle_data), the critical dims of
     stage critical_dim, search.* (the GA's numbers, fitness, ablation switches, execution).
Out: <out_dir>/seed<k>/search/<search.method>/ (k = run_seed; longrope2; longrope, longrope2_plain_ppl,
     longrope2_all_dims set their own search.* switches, see longrope2.rope.methods)
       result.json            best long_factor, its critical dim c, fitness, s, attention factor
       rope_parameters.json   the same as transformers `rope_parameters` (longrope, short factors ones)
       history.csv            best and median fitness per iteration (per run in per_c mode)
       validation.json        held-out needle-PPL and exact match: searched factors vs the baselines
       convergence.png, factors.png
     State after every iteration in <out_dir>/seed<k>/checkpoints/search-<method>-<fingerprint>/state.json
     (longrope2.core.resume): a killed search resumes there; removed once the outputs are written.

Scale-out: `torchrun --nproc_per_node N -m longrope2.search ...` shares each iteration's candidates
among N processes (gloo on CPUs, NCCL on GPUs); every process runs the same seeded GA, so the
result does not depend on N.

    python -m longrope2.search experiment=toy
"""

from __future__ import annotations

import contextlib
import copy
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from tqdm.auto import tqdm

from longrope2.core import resume
from longrope2.core.artifacts import read_json
from longrope2.core.config import hydra_stage, run_dir, run_seed
from longrope2.core.errors import ConfigError
from longrope2.core.outputs import write_json
from longrope2.core.processes import Workers, init_workers, torch_threads
from longrope2.core.tracking import StageRun, stage_run
from longrope2.data.needles import NeedleSample, load_needle_sets
from longrope2.evolution import fitness, operators
from longrope2.evolution import space as space_
from longrope2.evolution.driver import (
    Evaluator,
    baselines,
    c_ranges,
    fingerprint,
    new_search_state,
    run_ga,
    search_space,
    validate_methods,
    write_history,
)
from longrope2.evolution.space import Individual
from longrope2.lm.loading import load_base_model, stage_dtype
from longrope2.reporting.figures import plot_convergence, plot_factors
from longrope2.rope import factors as rope
from longrope2.rope import methods
from longrope2.rope.hf_config import RopeFacts
from longrope2.rope.scaling import RopeScaling

# --------------------------------------------------------------------------- inputs


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
    model, facts = load_base_model(cfg, stage_dtype(cfg, workers.device), workers.device, "sdpa")
    fitness.prepare_for_search(model, facts)
    if samples[0].length != int(cfg.target_len):
        raise ConfigError(f"target_len = {cfg.target_len} but the needle samples in {needle_dir} have "
                          f"{samples[0].length} tokens: rerun stage needle_data")
    evaluator = Evaluator(cfg, model, facts, samples, plain_ids, workers)

    key = fingerprint(cfg, needle_dir)
    folder = resume.state_path(run_dir(cfg), f"search-{cfg.search.method}", key)
    if workers.main:
        resume.open_state_dir(folder)
    state = resume.load_json_state(folder / "state.json", key) or new_search_state(key, ranges, run_seed(cfg))
    tracker_cm = (stage_run(cfg, f"search-{cfg.search.method}", per_seed=True) if workers.main
                  else contextlib.nullcontext(StageRun()))
    with tracker_cm as tracker:
        best_ind, best_fit = _search(cfg, workers, state, folder / "state.json", evaluator, facts, dims, tracker)
        if not workers.main:
            return {}
        # Samples longer than L_train only: the long path is what the search chose.
        sets = {split: samples for split, (samples, _) in needle_sets.items() if split in ("search", "validation")}
        result = write_outputs(cfg, out, model, facts, dims, sets, state, best_ind, best_fit,
                               evaluator.scaling(best_ind), tracker)
    shutil.rmtree(folder, ignore_errors=True)  # the outputs are written: nothing left to resume
    return result


def _search(cfg: DictConfig, workers: Workers, state: dict[str, Any], state_file: Path, evaluator: Evaluator,
            facts: RopeFacts, dims: dict[str, Any], tracker: StageRun) -> tuple[Individual, float]:
    """Every GA run of the state from where it stopped, saving the state after each iteration; the best."""
    evaluated = [(space_.from_dict(d), f) for d, f in state["evaluated"]]
    resumed = sum(r["iteration"] + 1 for r in state["runs"])
    if resumed and workers.main:
        print(f"resuming the search from {state_file} ({resumed} finished iterations)")
        tracker.mark_resumed(f"{resumed} finished iterations from {state_file}")
    for h in state["history"]:  # a resumed run logs its earlier iterations again
        tracker.log_metrics({"best_fitness": h["best_fitness"], "median_fitness": h["median_fitness"]}, step=h["step"])
    bar = tqdm(total=len(state["runs"]) * (int(cfg.search.iterations) + 1), initial=resumed,
               desc="search iterations", disable=not workers.main)
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
            state["evaluated"] = [(space_.to_dict(i), f) for i, f in evaluated]
            if workers.main:
                resume.save_json_state(state_file, state)
                tracker.log_metrics({"best_fitness": row["best_fitness"], "median_fitness": row["median_fitness"],
                                     "best_c": row["best_c"], "evaluations": row["evaluations"]}, step=row["step"])
            bar.update(1)
            bar.set_postfix(best=f"{row['best_fitness']:.4g}", c=row["best_c"])

        run_ga(run_state, space, cfg.search, lambda cands: evaluator(cands, workers.main), evaluated, on_iteration)
    bar.close()
    finals = [operators.best([(space_.from_dict(d), f) for d, f in r["population"]]) for r in state["runs"]]
    return operators.best(finals)


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

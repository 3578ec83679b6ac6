"""Search quality: best fitness against evaluated candidates, for the factor search before and after
the plateau operators, both presets, and random search in the same space with the same budget.

Synthetic landscapes (a known optimum): LongRoPE2's space at the toy's size (16 pairs, s = 8) and at
LLaMA3-8B's (64 pairs, s = 16). The optimum λ* is a valid individual at a known critical dim c* in
[d10_tcd, d_tcd] with an increasing, non-flat tail; the fitness is the mean over all pairs of
(log λ_i - log λ*_i)^2 (0 at the optimum; the NTK head makes it depend on c and λ_c too), optionally
observed through Gaussian noise (the search ranks on noisy values; we report the true fitness of its pick).

    python benchmarks/search_quality.py                      # synthetic landscapes, 5 seeds (~3 min)
    python benchmarks/search_quality.py --toy results/toy_seeds  # + the toy's real needle-PPL, 3 seeds (~15 min)

--toy takes a toy run with needle sets for every seed (e.g. `experiment=toy_seeds`, or the stages
pretrain, critical_dim and needle_data run with seeds=[0,1,2]).

The "gap" is the true fitness of the d_tcd rule (λ = s from d_tcd, NTK below: the paper's starting
point) minus the optimum's (0); a search meets the bar when its pick closes >= 99 % of it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from longrope2.core.config import compose_config
from longrope2.evolution import space as evolution
from longrope2.evolution.driver import new_run_state, run_ga
from longrope2.evolution.space import Individual, SearchSpace
from longrope2.rope import factors as rope

BUDGET = 1344  # the paper's: 64 + 40 x 32


@dataclass(frozen=True)
class Landscape:
    name: str
    n_pairs: int
    s: float
    d10_tcd: int
    d_tcd: int
    c_star: int
    tail_lo: float  # λ*_c / s
    tail_hi: float  # λ*_{D-1} / s
    noise: float  # sd of the observation noise, as a fraction of the gap

    def optimum(self) -> np.ndarray:
        n = self.n_pairs - self.c_star
        x = np.linspace(0.0, 1.0, n)
        tail = np.round(self.s * (self.tail_lo + (self.tail_hi - self.tail_lo) * x ** 1.5), 2)
        tail = np.maximum.accumulate(tail)
        return rope.longrope2_factors(tail.tolist(), self.c_star, self.n_pairs).numpy()

    def space(self, c_range: tuple[int, int], **kw) -> SearchSpace:
        return SearchSpace(self.n_pairs, self.s, self.d_tcd, c_range, **kw)


# Noise: none; 0.1 % of the gap (ten times below the bar, so the bar stays reachable); 1 % (the bar
# itself: the pick by observed value is then the luckiest draw, and no search can certify the bar).
_SIZES = [("toy (16 pairs, s=8)", 16, 8.0, 2, 6, 4, 1.15, 1.6),
          ("llama3 (64 pairs, s=16)", 64, 16.0, 24, 35, 30, 1.3, 1.65)]
LANDSCAPES = [Landscape(name + (f", noise {noise:.1%} of the gap" if noise else ""), *rest, noise)
              for name, *rest in _SIZES for noise in (0.0, 0.001, 0.01)]


def true_fitness(lam: Sequence[float], star: np.ndarray) -> float:
    return float(np.mean((np.log(np.asarray(lam)) - np.log(star)) ** 2))


def reference_gap(ls: Landscape, star: np.ndarray) -> float:
    rule = rope.longrope2_factors([ls.s] * (ls.n_pairs - ls.d_tcd), ls.d_tcd, ls.n_pairs).numpy()
    return true_fitness(rule, star)


def knobs(preset: str, **overrides) -> DictConfig:
    """The preset's GA numbers as a paper experiment has them (the toy's budget would cut them)."""
    search = compose_config(["experiment=llama3_8b_128k", "model.path=unused", f"search={preset}"]).search
    cfg = OmegaConf.to_container(search)
    cfg.update(overrides)
    return OmegaConf.create(cfg)


def run_variant(ls: Landscape, variant: str, seed: int) -> tuple[list[float], Individual]:
    """Best TRUE fitness after each evaluation, and the pick (best by observed fitness)."""
    star = ls.optimum()
    gap = reference_gap(ls, star)
    noise_rng = np.random.default_rng([seed, 99])
    trace: list[float] = []
    picked: list[tuple[float, Individual]] = []

    def observe(cands: Sequence[Individual]) -> list[float]:
        out = []
        for ind in cands:
            f = true_fitness(ind.factors, star)
            obs = f + ls.noise * gap * float(noise_rng.standard_normal())
            out.append(obs)
            if not picked or obs < picked[0][0]:
                picked[:] = [(obs, ind)]
            trace.append(true_fitness(picked[0][1].factors, star))
        return out

    full = (ls.d10_tcd, ls.d_tcd)
    if variant == "random":
        rng = np.random.default_rng(seed)
        space = ls.space(full)
        lo, hi = round(ls.s * 100), round(2 * ls.s * 100)
        while len(trace) < BUDGET:
            c = int(rng.integers(full[0], full[1] + 1))
            tail = np.sort(rng.integers(lo, hi + 1, ls.n_pairs - c)) / 100
            observe([evolution.make_individual(space, c, tail.tolist())])
        return trace, picked[0][1]
    if variant in ("before", "paper"):
        k = knobs("paper", operators="neighbours" if variant == "before" else "plateau")
        ranges = [full]
    else:  # reference: its own c (d_tcd - 1), or the oracle c* (the GA alone)
        k = knobs("reference", iterations=(BUDGET - 128) // 32)
        c = ls.d_tcd - 1 if variant == "reference" else ls.c_star
        ranges = [(c, c)]
    for c_range in ranges:
        space = ls.space(c_range, strict=k.monotone == "strictly_increasing",
                         last_step_max=k.last_step_max, operators=str(k.operators))
        run_ga(new_run_state(c_range, seed), space, k, observe, [], lambda row: None)
    return trace, picked[0][1]


VARIANTS = {
    "before": "before this change (paper preset, literal operators)",
    "paper": "search=paper (plateau operators)",
    "reference": "search=reference (c = d_tcd - 1)",
    "reference_c*": "search=reference at c = c* (oracle c)",
    "random": "random search, same space and budget",
}


def synthetic(seeds: int, out: Path) -> list[dict]:
    rows = []
    fig, axes = plt.subplots(2, len(LANDSCAPES) // 2, figsize=(5 * len(LANDSCAPES) // 2, 8))
    for ax, ls in zip(axes.flat, LANDSCAPES):
        star = ls.optimum()
        gap = reference_gap(ls, star)
        for variant, label in VARIANTS.items():
            t0 = time.perf_counter()
            traces, picks = [], []
            for seed in range(seeds):
                trace, pick = run_variant(ls, variant, seed)
                traces.append(trace[:BUDGET])
                picks.append(pick)
            closed = [1 - true_fitness(p.factors, star) / gap for p in picks]
            rel = [float(np.max(np.abs(np.asarray(p.factors) / star - 1))) for p in picks]
            rows.append({
                "landscape": ls.name, "variant": variant, "evaluations": len(traces[0]),
                "gap_closed_median": statistics.median(closed), "gap_closed_worst": min(closed),
                "max_rel_factor_error_median": statistics.median(rel),
                "right_c": sum(p.c == ls.c_star for p in picks), "c_found": [p.c for p in picks], "seeds": seeds,
                "wall_s_per_run": (time.perf_counter() - t0) / seeds,
            })
            median = np.median(np.array([np.asarray(t) / gap for t in traces]), axis=0)
            ax.plot(np.arange(1, len(median) + 1), median, label=label)
        ax.set_yscale("log")
        ax.set_xlabel("evaluated candidates")
        ax.set_ylabel("best true fitness / gap (median over seeds)")
        ax.set_title(ls.name, fontsize=9)
        ax.axhline(0.01, color="grey", ls=":", lw=0.8)
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "search_quality.png", dpi=120)
    return rows


TOY_VARIANTS: dict[str, list[str]] = {
    "before": ["search.operators=neighbours"],  # the search before this change, bit for bit
    "paper": [],
    "reference": ["search=reference", "search.initial_population=32"],  # the toy's 160 candidates
}


def _toy_variant(run_dir: Path, variant: str, seeds: Sequence[int], out: Path) -> list[dict]:
    """One variant's searches in a work folder of its own (links to the run's base model, critical dims
    and needle sets), so that variants can run side by side."""
    work = out / "toy" / variant
    for name in ("base_model", "critical_dim"):
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        if not (work / name).exists():
            (work / name).symlink_to((run_dir / name).resolve())
    rows = []
    for seed in seeds:
        needles = work / f"seed{seed}" / "needle_data"
        if not needles.exists():
            needles.parent.mkdir(parents=True, exist_ok=True)
            needles.symlink_to((run_dir / f"seed{seed}" / "needle_data").resolve())
        done = work / f"seed{seed}" / "search" / "longrope2"
        if not (done / "validation.json").is_file():
            subprocess.run([sys.executable, "-m", "longrope2.search", "experiment=toy", f"out_dir={work}",
                            f"run_seed={seed}", f"seeds=[{','.join(map(str, seeds))}]", "tracking.enabled=false",
                            *TOY_VARIANTS[variant]], check=True, stdout=subprocess.DEVNULL)
        result = json.loads((done / "result.json").read_text())
        searched = json.loads((done / "validation.json").read_text())["methods"]["searched"]
        rows.append({"variant": variant, "seed": seed, "critical_dim": result["critical_dim"],
                     "search_needle_ppl": result["fitness_value"],
                     "heldout_needle_ppl": searched["validation_needle_ppl"],
                     "heldout_exact_match": searched["validation_exact_match"],
                     "wall_s": result["wall_s"], "tail": result["long_factor"][result["critical_dim"]:]})
    return rows


def toy(run_dir: Path, seeds: Sequence[int], out: Path, jobs: int) -> list[dict]:
    """The toy's real needle-PPL: one search per (variant, seed) on a toy run's base model and needle
    sets (needle_data for every seed), at the toy's budget (160 candidates); held-out needle-PPL and
    exact match (validation.json: 128 samples from books the search never saw)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        parts = pool.map(lambda v: _toy_variant(run_dir, v, seeds, out), TOY_VARIANTS)
    return [row for part in parts for row in part]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--toy", type=Path, default=None, help="a finished toy run (out_dir) for the real needle-PPL")
    ap.add_argument("--toy-seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--jobs", type=int, default=2, help="toy searches side by side (one core each)")
    ap.add_argument("--out", type=Path, default=Path("results/benchmarks/search_quality"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"budget": BUDGET, "synthetic": synthetic(args.seeds, args.out)}
    for r in report["synthetic"]:
        print(f"{r['landscape']:34s} {r['variant']:13s} gap closed median {r['gap_closed_median']:.4f} "
              f"worst {r['gap_closed_worst']:.4f}  max |λ/λ*-1| {r['max_rel_factor_error_median']:.3f}  "
              f"c {r['c_found']} (c* right {r['right_c']}/{r['seeds']})  {r['wall_s_per_run']:.1f} s/run")
    if args.toy is not None:
        report["toy"] = toy(args.toy, args.toy_seeds, args.out, args.jobs)
        for r in report["toy"]:
            print(f"toy {r['variant']:10s} seed {r['seed']}  c {r['critical_dim']}  search needle-PPL "
                  f"{r['search_needle_ppl']:.3f}  held-out {r['heldout_needle_ppl']:.3f} / "
                  f"{r['heldout_exact_match']:.3f}")
    (args.out / "search_quality.json").write_text(json.dumps(report, indent=1))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()

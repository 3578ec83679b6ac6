"""The training-free table of experiment smollm2_16k (docs/smollm2.md) from its NIAH results.

Per method and length: needle-PPL, exact match, n; then each method against LongRoPE2's rule at d_tcd on the
same samples: the exact-match difference (paired bootstrap interval, McNemar's exact p) and the mean
answer-token NLL difference (paired bootstrap; exp of it is the needle-PPL ratio). Per-sample NLLs are read
from the cells: with eval.niah.runs = 1 a cell's needle-PPL is one sample's exp(mean answer NLL); with more runs
the NLL pairs are cells (no interval).

    .venv/bin/python benchmarks/smollm2_training_free.py [results/smollm2_16k]
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from longrope2.reporting.stats import paired_difference

METHODS = ["none", "pi", "ntk", "yarn", "longrope2_dtcd"]
LABELS = {"none": "none", "pi": "PI", "ntk": "NTK", "yarn": "YaRN", "longrope2_dtcd": "LongRoPE2 rule at d_tcd"}
REFERENCE = "longrope2_dtcd"


def per_sample(niah: dict) -> dict[int, dict[str, list[float]]]:
    """length -> {"nll": mean answer NLL per cell (per sample when runs = 1), "correct": 0/1 per sample}."""
    out = {}
    for j, length in enumerate(niah["lengths"]):
        nll = [math.log(row[j]) for row in niah["needle_ppl"]]
        out[int(length)] = {"nll": nll, "correct": [float(x) for x in niah["correct"][str(length)]]}
    return out


def one_run_per_cell(niah: dict) -> bool:
    return all(r == 1 for row in niah["runs"] for r in row)


def main(folder: str = "results/smollm2_16k") -> None:
    root = Path(folder) / "seed0" / "eval_training_free"
    raw = {m: json.loads((root / m / "niah" / "niah.json").read_text()) for m in METHODS
           if (root / m / "niah" / "niah.json").is_file()}
    data = {m: per_sample(niah) for m, niah in raw.items()}
    paired_nll = all(one_run_per_cell(niah) for niah in raw.values())  # else the NLLs are cell means
    if not data:
        raise SystemExit(f"no results under {root}: run `snakemake --cores 2 --config experiment=smollm2_16k`")
    lengths = sorted(next(iter(data.values())))
    print("| method | " + " | ".join(f"needle-PPL {n // 1024}k | EM {n // 1024}k" for n in lengths) + " | n |")
    print("|---|" + "---|---|" * len(lengths) + "---|")
    for m, per in data.items():
        cells = []
        for n in lengths:
            s = per[n]
            cells += [f"{math.exp(sum(s['nll']) / len(s['nll'])):.3f}", f"{sum(s['correct']) / len(s['correct']):.2f}"]
        print(f"| {LABELS[m]} | " + " | ".join(cells) + f" | {len(per[lengths[0]]['correct'])} per length |")
    if REFERENCE not in data:
        return
    print(f"\nPaired against {LABELS[REFERENCE]} (method - rule; 95 % paired intervals: Tango's score interval for EM, t for NLL):\n")
    print("| method | length | EM diff [95 % CI] | McNemar p | answer NLL diff [95 % CI] | needle-PPL ratio |")
    print("|---|---|---|---|---|---|")
    for m in data:
        if m == REFERENCE:
            continue
        for n in lengths:
            a, b = data[m][n], data[REFERENCE][n]
            em = paired_difference(a["correct"], b["correct"])
            nll = paired_difference(a["nll"], b["nll"])
            interval = f"[{nll.low:+.3f}, {nll.high:+.3f}]" if paired_nll else "(cells)"
            nll_text = f"{nll.diff:+.3f} {interval}"
            print(f"| {LABELS[m]} | {n // 1024}k | {em.diff:+.2f} [{em.low:+.2f}, {em.high:+.2f}] | {em.p_value:.2f} | "
                  f"{nll_text} | {math.exp(nll.diff):.2f} |")


if __name__ == "__main__":
    main(*sys.argv[1:])

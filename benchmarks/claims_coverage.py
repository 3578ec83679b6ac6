"""Claims: coverage of the paired 95 % intervals and false verdict rates of `reporting.stats.classify`, 1 seed and
3 seeds.

A simulation of the report's comparisons "a > b" (src/longrope2/reporting/stats.py: `paired_difference` for one seed,
`replicated_difference` for several, `classify(diff, ">")` for the verdict) on per-item 0/1 outcomes.

Data-generating model. n items with difficulty u_j ~ Normal(0, σ_item) on the logit scale (σ_item = 1.5),
shared by both models and by every seed; model m has an accuracy level μ_m; seed k of a fine-tuned model m
adds a seed effect e_{k,m} ~ Normal(0, σ_seed) on the logit (training randomness); a one-model baseline has
none. Outcome y_{k,m,j} ~ Bernoulli(logistic(μ_m + u_j + e_{k,m})), a fresh draw per (seed, model, item): the
item-by-seed interaction of a re-trained model. Case A: a and b are both fine-tuned (both have seed effects
and their own draws per seed). Case B: a fine-tuned method against the base, one model, scored once: its
outcome vector is repeated beside each seed (shared items) or drawn once per seed's own items (nested).
Shared items: the same n items (the same u_j) for every seed (replicated_difference(..., shared_items=True),
the crossed random-effects t interval; where the seeds' share comes out below 0, max(MS_seed, MS_item) with
S - 1 df); nested: each seed its own n items (shared_items=False: the seeds' spread, or, where that is
smaller, the items' own sampling variance sum_k var(d_k) / n_k / S^2, with S - 1 df either way). On 0/1
outcomes either interval is then widened to its hull with Tango's score interval of the items counted once
(crossed: one "average seed", each item discordant by its seed-mean difference; nested: every seed's pairs)
and the p-value is the larger of the t test's and the score test's.

The TRUE difference Δ is the population one, E over items and seeds of P(a) - P(b) = G(μ_a, σ_a) -
G(μ_b, σ_b), with G(μ, σ) = E logistic(μ + σ Z), Z ~ N(0, 1), σ_m^2 = σ_item^2 + σ_seed,m^2 (σ_seed,m = 0 for
the base), computed by Gauss-Hermite quadrature (checked against 2e6 Monte-Carlo draws at start-up). μ_a is
set so that G(μ_a, σ_a) = the accuracy level, μ_b by root finding so that Δ is the target (Δ ∈ {0, 0.05,
0.10}). The seed-conditional difference of seed k is G(μ_a + e_{k,a}, σ_item) - G(μ_b + e_{k,b}, σ_item): the Δ
of that seed's trained models over the item population. A one-seed interval sees only the items' sampling
(the models are fixed), so it is built for the seed-conditional difference; the several-seed intervals are
built for the population Δ (items and seeds random).

Per cell (scenario x Δ): R experiments (1000; --quick 200). Reported: coverage of the 95 % interval (share of
experiments whose [low, high] contains the target), the rates of the verdicts "reproduced" (Δ = 0: a false
reproduced, nominal <= 2.5 %, one side of a two-sided 5 % test; Δ > 0: power) and "contradicted" (Δ = 0:
false, nominal <= 2.5 %), each with its Monte-Carlo standard error sqrt(p (1 - p) / R). Checked over every
simulated experiment: `classify` never says "reproduced" for an interval whose low end is <= 0 (the count is
printed and must be 0; the script exits 1 otherwise), no several-seed interval has zero width (must be 0),
and the script's vectorised mirror of the several-seed rule (`three_seed_rule`: branch, variance, df, t
interval and p, the score interval's hull and the larger p) must give replicated_difference's interval and
p-value on every experiment (the count of mismatches must be 0, else exit 1); the coverage and verdicts within
each branch, and those of the t interval alone (the rule before the hull), come from that mirror.

Near the ceiling (after the grid): 3 seeds, 64 shared items, the fine-tuned method against the base (case
B), both at accuracy 0.99, Δ = 0, σ_seed 0 and 0.5: the retention "a - b >= -0.024" (replicated_difference(...,
null=-0.024), classify(diff, ">=")). There "reproduced" is the right verdict (its rate is power),
"contradicted" a false one; printed with the share of experiments whose outcomes are identical in every seed,
the coverage of Δ = 0, and what the t interval alone said (its "reproduced" rate and zero-width intervals).

    python benchmarks/claims_coverage.py --out claims_coverage.json --figure docs/figures/claims_coverage.png  # ~40 s
    python benchmarks/claims_coverage.py --quick        # 200 experiments a cell, ~10 s

One-seed results depend on the outcomes only through (a_only, b_only, n), so `paired_difference` is called once
per distinct triple (on outcome vectors with those counts) and cached; the first replicates of each cell are
also checked against a direct call on the simulated vectors. The several-seed comparisons call
`replicated_difference` on every simulated experiment (most of the run time: a score interval's root finding
each).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy import optimize, special  # noqa: E402
from scipy.stats import t as t_dist  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from longrope2.reporting import stats

SIGMA_ITEM = 1.5
DELTAS = (0.0, 0.05, 0.10)
SEEDS = 3
NOMINAL_COVERAGE = stats.CONFIDENCE
NOMINAL_FALSE = (1 - stats.CONFIDENCE) / 2

_NODES, _WEIGHTS = np.polynomial.hermite_e.hermegauss(121)  # probabilists' Hermite: weight exp(-z^2 / 2)
_WEIGHTS = _WEIGHTS / math.sqrt(2 * math.pi)


def mean_accuracy(mu: np.ndarray | float, sigma: float) -> np.ndarray:
    """G(μ, σ) = E logistic(μ + σ Z), Z ~ N(0, 1), elementwise in μ (Gauss-Hermite quadrature)."""
    mu = np.asarray(mu, dtype=float)
    return special.expit(mu[..., None] + sigma * _NODES) @ _WEIGHTS


def solve_mu(target: float, sigma: float) -> float:
    """The μ with G(μ, σ) = target."""
    return float(optimize.brentq(lambda m: float(mean_accuracy(m, sigma)) - target, -30, 30, xtol=1e-13))


def check_quadrature(rng: np.random.Generator, draws: int = 2_000_000) -> float:
    """Largest |quadrature - Monte Carlo| over a few (μ, σ); raises if it exceeds 5 Monte-Carlo SEs."""
    worst = 0.0
    for mu, sigma in ((2.5, 1.5), (0.5, math.hypot(1.5, 0.5)), (-1.0, 1.5), (4.0, 1.58)):
        p = special.expit(mu + sigma * rng.standard_normal(draws))
        err = abs(float(mean_accuracy(mu, sigma)) - float(p.mean()))
        if err > 5 * float(p.std()) / math.sqrt(draws):
            raise RuntimeError(f"quadrature disagrees with Monte Carlo at μ={mu}, σ={sigma}: {err:.2e}")
        worst = max(worst, err)
    return worst


@dataclass(frozen=True)
class Scenario:
    n: int
    level: float  # population accuracy of a (b's is level - Δ)
    sigma_seed: float
    case: str  # "A": both fine-tuned | "B": fine-tuned vs the base (one model)
    shared: bool = True  # every seed scores the same items (False: each seed its own, nested)

    @property
    def label(self) -> str:
        return (f"n={self.n} acc={self.level:g} σs={self.sigma_seed:g} {self.case}"
                + ("" if self.shared else " nested"))

    def sigmas(self) -> tuple[float, float]:
        """(σ_a, σ_b): the population spread of each model's logit (items and seeds)."""
        s_a = math.hypot(SIGMA_ITEM, self.sigma_seed)
        return s_a, (s_a if self.case == "A" else SIGMA_ITEM)


def scenarios() -> list[Scenario]:
    grid = [Scenario(n, level, sigma, case) for n in (128, 320) for level in (0.9, 0.6)
            for sigma in (0.0, 0.5) for case in ("A", "B")]
    # nested (each seed its own items): with a seed effect, and without one (what the S - 1 df cost)
    return grid + [Scenario(320, 0.9, 0.5, "A", shared=False), Scenario(320, 0.9, 0.0, "A", shared=False)]


class OneSeed:
    """reporting.stats.paired_difference + classify, cached on (a_only, b_only, n): all they depend on for 0/1
    outcomes."""

    def __init__(self) -> None:
        self.cache: dict[tuple[int, int, int], tuple[float, float, float, str]] = {}

    def __call__(self, a_only: int, b_only: int, n: int) -> tuple[float, float, float, str]:
        key = (a_only, b_only, n)
        if key not in self.cache:
            a, b = np.zeros(n), np.zeros(n)
            a[:a_only] = 1
            b[a_only:a_only + b_only] = 1
            r = stats.paired_difference(a, b)
            self.cache[key] = (r.low, r.high, r.p, stats.classify(r, ">"))
        return self.cache[key]


def score_part(a_share: np.ndarray, b_share: np.ndarray, n: np.ndarray, null: float) -> tuple[np.ndarray, ...]:
    """Tango's score interval and the score test's p against `null` (at 0 McNemar's asymptotic test) of the
    items counted once, elementwise; both depend only on (a_share, b_share, n), so each distinct triple is
    computed once with stats' own functions."""
    triples, inverse = np.unique(np.stack([a_share, b_share, n], axis=1), axis=0, return_inverse=True)
    inverse = np.asarray(inverse).reshape(-1)
    out = np.array([(*stats.tango_interval(float(x), float(y), int(m)), stats.tango_p(null, float(x), float(y), int(m)))
                    for x, y, m in triples]).reshape(-1, 3)
    return out[inverse, 0], out[inverse, 1], out[inverse, 2]


def three_seed_rule(a: np.ndarray, b: np.ndarray, shared: bool, null: float = 0.0) -> dict[str, np.ndarray]:
    """Mirror of replicated_difference's several-seed rule on 0/1 outcomes, vectorised over experiments
    (R, S, n) with n > 1: branch, variance, degrees of freedom, the t interval and its p against `null`, then
    the hull with Tango's score interval of the items counted once and the larger of the two p-values (the
    score test's, at every null). Crossed (shared items): branch 0 Satterthwaite combination; 1 / 2 (the seeds'
    share estimated below 0, MS_seed / MS_item the larger) max(MS_seed, MS_item) with S - 1 df; the score part
    is one "average seed" on n items, each item discordant by its seed-mean difference (a's share the sum of
    its positive parts, b's of its negative parts, so the score interval is centred on the same estimate).
    Nested: branch 0 the seeds' spread, 1 the items' own sampling variance (the floor, where the spread is
    smaller), S - 1 df in both; the score part counts every seed's discordant pairs, on S n items. run_cell
    checks its interval and p against replicated_difference on every experiment."""
    d = a.astype(float) - b.astype(float)
    _, seeds, n = d.shape
    per_seed = d.mean(axis=2)  # (R, S)
    est = per_seed.mean(axis=1)
    if shared:
        item_mean = d.mean(axis=1)  # (R, n)
        ms_seed = n * per_seed.var(axis=1, ddof=1)
        ms_item = seeds * item_mean.var(axis=1, ddof=1)
        resid = d - per_seed[:, :, None] - item_mean[:, None, :] + est[:, None, None]
        ms_err = (resid ** 2).sum(axis=(1, 2)) / ((seeds - 1) * (n - 1))
        combined = ms_seed + ms_item - ms_err
        satt = combined >= np.maximum(ms_seed, ms_item)
        den = ms_seed ** 2 / (seeds - 1) + ms_item ** 2 / (n - 1) + ms_err ** 2 / ((seeds - 1) * (n - 1))
        with np.errstate(divide="ignore", invalid="ignore"):
            df_satt = np.where(den > 0, combined ** 2 / np.where(den > 0, den, 1), np.inf)
        branch = np.where(satt, 0, np.where(ms_seed >= ms_item, 1, 2))
        df = np.where(satt, df_satt, seeds - 1.0)
        var = np.where(satt, combined, np.maximum(ms_seed, ms_item)) / (n * seeds)
        a_only, b_only, items = (item_mean > 0).sum(axis=1), (item_mean < 0).sum(axis=1), np.full(est.shape, n)
        a_share, b_share = np.clip(item_mean, 0, None).sum(axis=1), np.clip(-item_mean, 0, None).sum(axis=1)
    else:
        spread = per_seed.var(axis=1, ddof=1) / seeds
        within = (d.var(axis=2, ddof=1) / n).sum(axis=1) / seeds ** 2
        branch = (spread < within).astype(int)
        var, df = np.maximum(spread, within), np.full(est.shape, seeds - 1.0)
        a_only, b_only, items = (d > 0).sum(axis=(1, 2)), (d < 0).sum(axis=(1, 2)), np.full(est.shape, seeds * n)
        a_share, b_share = a_only.astype(float), b_only.astype(float)
    ok = (var > 0) & (df > 0)  # else the t interval is a point, p 1 at the null and 0 elsewhere
    se = np.sqrt(np.where(ok, var, 1))
    df_ok = np.where(ok, df, 1)
    half = np.where(ok, t_dist.ppf(0.5 + stats.CONFIDENCE / 2, df_ok) * se, 0)
    t_p = np.where(ok, 2 * t_dist.sf(np.abs(est - null) / se, df_ok), np.where(est == null, 1.0, 0.0))
    t_low, t_high = est - half, est + half
    s_low, s_high, s_p = score_part(a_share, b_share, items, null)
    return {"branch": branch, "var": var, "df": df, "est": est, "t_low": t_low, "t_high": t_high, "t_p": t_p,
            "score_low": s_low, "score_high": s_high, "score_p": s_p,
            "score_widens": (s_low < t_low) | (s_high > t_high), "discordant": a_only + b_only,
            "low": np.minimum(t_low, s_low), "high": np.maximum(t_high, s_high), "p": np.maximum(t_p, s_p)}


def rate(x: np.ndarray) -> dict[str, float]:
    p = float(np.mean(x))
    return {"rate": p, "se": math.sqrt(p * (1 - p) / x.size)}


def simulate(sc: Scenario, delta: float, reps: int, rng: np.random.Generator) -> dict:
    """One cell's data: outcomes a, b (R, S, n) of 0/1, the population Δ and each seed's conditional Δ (R, S)."""
    s_a, s_b = sc.sigmas()
    mu_a = solve_mu(sc.level, s_a)
    mu_b = solve_mu(sc.level - delta, s_b)
    true = float(mean_accuracy(mu_a, s_a) - mean_accuracy(mu_b, s_b))
    n, S = sc.n, SEEDS

    u = rng.normal(0, SIGMA_ITEM, (reps, 1, n) if sc.shared else (reps, S, n))
    e_a = rng.normal(0, sc.sigma_seed, (reps, S))
    e_b = rng.normal(0, sc.sigma_seed, (reps, S)) if sc.case == "A" else np.zeros((reps, S))
    a = rng.random((reps, S, n)) < special.expit(mu_a + u + e_a[:, :, None])
    if sc.case == "B" and sc.shared:  # the base: one model, one score per item, beside each seed
        b = np.broadcast_to(rng.random((reps, 1, n)) < special.expit(mu_b + u), (reps, S, n))
    else:
        b = rng.random((reps, S, n)) < special.expit(mu_b + u + e_b[:, :, None])
    cond = mean_accuracy(mu_a + e_a, SIGMA_ITEM) - mean_accuracy(mu_b + e_b, SIGMA_ITEM)  # (R, S)
    return {"a": a, "b": b, "true": true, "cond": cond, "mu_a": mu_a, "mu_b": mu_b}


def run_cell(sc: Scenario, delta: float, reps: int, seed: int, cell: int, one_seed: OneSeed) -> dict:
    rng = np.random.default_rng(np.random.SeedSequence([seed, cell]))
    sim = simulate(sc, delta, reps, rng)
    a, b, true, cond, mu_a, mu_b = (sim[k] for k in ("a", "b", "true", "cond", "mu_a", "mu_b"))
    n, S = sc.n, SEEDS

    # One seed: seed 0 of each experiment.
    a_only = (a[:, 0] & ~b[:, 0]).sum(axis=1)
    b_only = (~a[:, 0] & b[:, 0]).sum(axis=1)
    one = [one_seed(int(x), int(y), n) for x, y in zip(a_only, b_only)]
    for r in range(min(3, reps)):  # the cache is exact: check against the simulated vectors themselves
        direct = stats.paired_difference(a[r, 0].astype(int), b[r, 0].astype(int))
        assert np.allclose((direct.low, direct.high, direct.p), one[r][:3]), (direct, one[r])
    low1, high1 = np.array([o[0] for o in one]), np.array([o[1] for o in one])
    verdict1 = np.array([o[3] for o in one])

    # Three seeds: replicated_difference on every experiment.
    low3, high3, p3, verdict3 = np.empty(reps), np.empty(reps), np.empty(reps), np.empty(reps, dtype=object)
    disc3 = np.empty(reps, dtype=int)
    for r in range(reps):
        res = stats.replicated_difference([(a[r, k], b[r, k]) for k in range(S)], shared_items=sc.shared)
        low3[r], high3[r], p3[r], verdict3[r] = res.low, res.high, res.p, stats.classify(res, ">")
        disc3[r] = res.discordant
    cond3 = cond.mean(axis=1)
    rule = three_seed_rule(a, b, sc.shared)  # the mirror: must reproduce every interval and p above
    mismatch = ~(np.isclose(rule["low"], low3, rtol=0, atol=1e-12)
                 & np.isclose(rule["high"], high3, rtol=0, atol=1e-12)
                 & np.isclose(rule["p"], p3, rtol=1e-9, atol=1e-15) & (rule["discordant"] == disc3))
    covered3 = (low3 <= true) & (true <= high3)
    # the t interval alone (the rule before the hull), from the mirror: what the hull changed
    t_sig = rule["t_p"] < 1 - stats.CONFIDENCE
    t_repro = (disc3 > 0) & (rule["t_low"] > 0) & t_sig
    t_contr = (disc3 > 0) & (rule["t_high"] < 0) & t_sig

    out = {
        "scenario": asdict(sc), "label": sc.label, "delta": delta, "reps": reps,
        "mu_a": mu_a, "mu_b": mu_b, "true_delta": true,
        "seed_conditional_delta_sd": float(cond[:, 0].std()),
        "one_seed": {
            "coverage_population": rate((low1 <= true) & (true <= high1)),
            "coverage_seed_conditional": rate((low1 <= cond[:, 0]) & (cond[:, 0] <= high1)),
            "reproduced": rate(verdict1 == stats.REPRODUCED),
            "contradicted": rate(verdict1 == stats.CONTRADICTED),
            "mean_half_width": float(np.mean((high1 - low1) / 2)),
            "mean_discordant": float(np.mean(a_only + b_only)),
        },
        "three_seeds": {
            "coverage_population": rate(covered3),
            "coverage_seeds_conditional": rate((low3 <= cond3) & (cond3 <= high3)),
            "reproduced": rate(verdict3 == stats.REPRODUCED),
            "contradicted": rate(verdict3 == stats.CONTRADICTED),
            "mean_half_width": float(np.mean((high3 - low3) / 2)),
            "median_half_width": float(np.median((high3 - low3) / 2)),
            "score_widens": float(np.mean(rule["score_widens"])),
            "t_alone": {"coverage_population": rate((rule["t_low"] <= true) & (true <= rule["t_high"])),
                        "reproduced": rate(t_repro), "contradicted": rate(t_contr),
                        "mean_half_width": float(np.mean((rule["t_high"] - rule["t_low"]) / 2))},
        },
        "checks": {  # counts over the cell's experiments; all must be 0
            "reproduced_with_low_le_0_one_seed": int(np.sum((verdict1 == stats.REPRODUCED) & (low1 <= 0))),
            "reproduced_with_low_le_0_three_seeds": int(np.sum((verdict3 == stats.REPRODUCED) & (low3 <= 0))),
            "zero_width_three_seeds": int(np.sum(high3 == low3)),
            "mirror_mismatch_three_seeds": int(np.sum(mismatch)),
        },
    }
    branch, df = rule["branch"], rule["df"]
    repro3 = verdict3 == stats.REPRODUCED

    def within(mask: np.ndarray) -> dict:
        """Coverage and "reproduced" among the experiments in one branch (None where there are none)."""
        return {"share": float(np.mean(mask)), "experiments": int(mask.sum()),
                "coverage": rate(covered3[mask]) if mask.any() else None,
                "reproduced": rate(repro3[mask]) if mask.any() else None}

    if sc.shared:
        out["three_seeds"]["crossed"] = {
            "share_satterthwaite": float(np.mean(branch == 0)), "share_ms_seed_alone": float(np.mean(branch == 1)),
            "share_ms_item_alone": float(np.mean(branch == 2)), "median_df": float(np.median(df)),
            "share_df_below_5": float(np.mean(df < 5)),
            "satterthwaite": within(branch == 0), "fallback": within(branch > 0)}
    else:  # nested: how often the items' sampling variance floors the seeds' spread, and exact ties
        per_seed = (a.astype(float) - b.astype(float)).mean(axis=2)
        out["three_seeds"]["nested"] = {
            "share_items_floor": float(np.mean(branch == 1)),
            "share_exact_ties": float(np.mean(np.ptp(per_seed, axis=1) == 0)),
            "exact_ties_positive": int(np.sum((np.ptp(per_seed, axis=1) == 0) & (per_seed[:, 0] > 0))),
            "spread": within(branch == 0), "floor": within(branch == 1)}
    return out


RETENTION_BOUND = -0.024  # the report's Table 4 bound, -(1 - 0.976) x the base's score, at a base near 1


def retention_scenarios() -> list[Scenario]:
    """Near the ceiling: a short task of 64 items that the base and the fine-tuned method (case B, the
    retention's comparison) both get right at 0.99, with and without a seed effect."""
    return [Scenario(64, 0.99, 0.0, "B"), Scenario(64, 0.99, 0.5, "B")]


def run_retention(sc: Scenario, reps: int, seed: int, cell: int, bound: float = RETENTION_BOUND) -> dict:
    """Δ = 0, the retention "a - b >= bound" (classify(diff, ">=") with null = bound < 0): "reproduced" is the
    right verdict (its rate is power), "contradicted" a false one. With the t interval alone, identical
    outcomes in every seed gave a point [0, 0] and p = 0: "reproduced" from no evidence."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, cell]))
    sim = simulate(sc, 0.0, reps, rng)
    a, b, true = sim["a"], sim["b"], sim["true"]
    low, high, p = np.empty(reps), np.empty(reps), np.empty(reps)
    verdict, disc = np.empty(reps, dtype=object), np.empty(reps, dtype=int)
    for r in range(reps):
        res = stats.replicated_difference([(a[r, k], b[r, k]) for k in range(SEEDS)], shared_items=sc.shared,
                                          null=bound)
        low[r], high[r], p[r], verdict[r], disc[r] = res.low, res.high, res.p, stats.classify(res, ">="), res.discordant
    rule = three_seed_rule(a, b, sc.shared, null=bound)
    mismatch = ~(np.isclose(rule["low"], low, rtol=0, atol=1e-12) & np.isclose(rule["high"], high, rtol=0, atol=1e-12)
                 & np.isclose(rule["p"], p, rtol=1e-9, atol=1e-15) & (rule["discordant"] == disc))
    t_sig = rule["t_p"] < 1 - stats.CONFIDENCE
    identical = np.all(a == b, axis=(1, 2))
    return {
        "scenario": asdict(sc), "label": sc.label, "delta": 0.0, "bound": bound, "reps": reps,
        "mu_a": sim["mu_a"], "mu_b": sim["mu_b"], "true_delta": true,
        "identical_outcomes": rate(identical), "mean_discordant": float(np.mean(disc)),
        "coverage": rate((low <= true) & (true <= high)),
        "reproduced": rate(verdict == stats.REPRODUCED), "contradicted": rate(verdict == stats.CONTRADICTED),
        "reproduced_identical": rate(verdict[identical] == stats.REPRODUCED) if identical.any() else None,
        "mean_half_width": float(np.mean((high - low) / 2)), "mean_low": float(np.mean(low)),
        "t_alone": {"coverage": rate((rule["t_low"] <= true) & (true <= rule["t_high"])),
                    "reproduced": rate((rule["t_low"] > bound) & t_sig),
                    "contradicted": rate((rule["t_high"] < bound) & t_sig),
                    "zero_width": int(np.sum(rule["t_high"] == rule["t_low"]))},
        "checks": {"reproduced_with_low_le_bound": int(np.sum((verdict == stats.REPRODUCED) & (low <= bound))),
                   "zero_width": int(np.sum(high == low)), "mirror_mismatch": int(np.sum(mismatch))},
    }


def pct(r: dict[str, float]) -> str:
    return f"{100 * r['rate']:.1f} ± {100 * r['se']:.1f}"


def tables(cells: list[dict]) -> str:
    by = {(c["label"], c["delta"]): c for c in cells}
    labels = list(dict.fromkeys(c["label"] for c in cells))

    def head(c: dict) -> str:
        sc = c["scenario"]
        return (f"| {sc['n']} | {sc['level']:g} | {sc['sigma_seed']:g} | {sc['case']} | "
                f"{'shared' if sc['shared'] else 'nested'} |")

    lines = ["Coverage of the 95 % interval (%, ± Monte-Carlo SE), at Δ = 0 / 0.05 / 0.10:", "",
             "| n | acc a | σ_seed | case | items | 1 seed, Δ_pop: 0 | .05 | .10 | 1 seed, Δ_seed: 0 | .05 | .10 "
             "| 3 seeds, Δ_pop: 0 | .05 | .10 |",
             "|---:|---:|---:|:---:|:---|" + "---:|" * 9]
    for lab in labels:
        cs = [by[(lab, d)] for d in DELTAS]
        lines.append(head(cs[0]) + "".join(
            f" {pct(c[k][m])} |" for k, m in (("one_seed", "coverage_population"),
                                               ("one_seed", "coverage_seed_conditional"),
                                               ("three_seeds", "coverage_population")) for c in cs))
    lines += ["", "Verdicts of classify(diff, \">\") (%, ± Monte-Carlo SE): false reproduced and false contradicted "
              "at Δ = 0 (nominal ≤ 2.5), power (reproduced) at Δ = 0.05 and 0.10; mean half-width of the "
              "interval at Δ = 0:", "",
              "| n | acc a | σ_seed | case | items | false repr., 1 seed | 3 seeds | false contr., 1 seed | 3 seeds "
              "| power .05, 1 seed | 3 seeds | power .10, 1 seed | 3 seeds | half-width, 1 seed | 3 seeds |",
              "|---:|---:|---:|:---:|:---|" + "---:|" * 10]
    for lab in labels:
        c0, c5, c10 = (by[(lab, d)] for d in DELTAS)
        cols = [pct(c0["one_seed"]["reproduced"]), pct(c0["three_seeds"]["reproduced"]),
                pct(c0["one_seed"]["contradicted"]), pct(c0["three_seeds"]["contradicted"]),
                pct(c5["one_seed"]["reproduced"]), pct(c5["three_seeds"]["reproduced"]),
                pct(c10["one_seed"]["reproduced"]), pct(c10["three_seeds"]["reproduced"]),
                f"{c0['one_seed']['mean_half_width']:.3f}", f"{c0['three_seeds']['mean_half_width']:.3f}"]
        lines.append(head(c0) + "".join(f" {x} |" for x in cols))
    return "\n".join(lines)


def figure(cells: list[dict], path: Path) -> None:
    labels = list(dict.fromkeys(c["label"] for c in cells))
    x = np.arange(len(labels))

    def pooled(key: str, metric: str, deltas=DELTAS) -> tuple[np.ndarray, np.ndarray]:
        """A rate pooled over the given Δ (equal reps per cell), with its Monte-Carlo SE."""
        p, se = [], []
        for lab in labels:
            rs = [c[key][metric] for c in cells if c["label"] == lab and c["delta"] in deltas]
            reps = sum(c["reps"] for c in cells if c["label"] == lab and c["delta"] in deltas)
            v = float(np.mean([r["rate"] for r in rs]))
            p.append(v)
            se.append(math.sqrt(v * (1 - v) / reps))
        return 100 * np.array(p), 100 * np.array(se)

    fig, axes = plt.subplots(3, 1, figsize=(11, 10.5), sharex=True)
    ax = axes[0]
    for off, (key, metric, name, marker) in zip((-0.2, 0, 0.2), (
            ("one_seed", "coverage_population", "1 seed, population Δ", "o"),
            ("one_seed", "coverage_seed_conditional", "1 seed, seed-conditional Δ (its target)", "s"),
            ("three_seeds", "coverage_population", "3 seeds, population Δ (its target)", "^"))):
        p, se = pooled(key, metric)
        ax.errorbar(x + off, p, yerr=1.96 * se, fmt=marker, capsize=2, label=name)
    ax.axhline(100 * NOMINAL_COVERAGE, color="k", ls="--", lw=1, label="95 %")
    ax.set_ylabel("coverage (%)")
    ax.set_title("Coverage of the 95 % interval (pooled over Δ = 0, 0.05, 0.10; bars ±1.96 MC SE)")
    ax.legend(fontsize=8, loc="lower left")
    ax = axes[1]
    for off, (key, metric, name, marker) in zip((-0.15, 0.15, -0.15, 0.15), (
            ("one_seed", "reproduced", "false reproduced, 1 seed", "o"),
            ("three_seeds", "reproduced", "false reproduced, 3 seeds", "^"),
            ("one_seed", "contradicted", "false contradicted, 1 seed", "x"),
            ("three_seeds", "contradicted", "false contradicted, 3 seeds", "+"))):
        p, se = pooled(key, metric, (0.0,))
        ax.errorbar(x + off, p, yerr=1.96 * se, fmt=marker, capsize=2, label=name)
    ax.axhline(100 * NOMINAL_FALSE, color="k", ls="--", lw=1, label="2.5 %")
    ax.set_ylabel("rate at Δ = 0 (%)")
    ax.set_title("False verdicts for \"a > b\" when Δ = 0")
    ax.legend(fontsize=8, ncol=2)
    ax = axes[2]
    for off, (delta, key, name, marker) in zip((-0.2, -0.067, 0.067, 0.2), (
            (0.05, "one_seed", "Δ = 0.05, 1 seed", "o"), (0.05, "three_seeds", "Δ = 0.05, 3 seeds", "^"),
            (0.10, "one_seed", "Δ = 0.10, 1 seed", "s"), (0.10, "three_seeds", "Δ = 0.10, 3 seeds", "v"))):
        p, se = pooled(key, "reproduced", (delta,))
        ax.errorbar(x + off, p, yerr=1.96 * se, fmt=marker, capsize=2, label=name)
    ax.set_ylabel("reproduced (%)")
    ax.set_ylim(-3, 103)
    ax.set_title("Power: \"reproduced\" when Δ > 0")
    ax.legend(fontsize=8, ncol=2)
    ax.set_xticks(x, labels, rotation=45, ha="right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="200 replications per cell (~10 s) instead of 1000 (~40 s)")
    ap.add_argument("--reps", type=int, default=None, help="replications per cell (overrides --quick)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="JSON of the figures")
    ap.add_argument("--figure", type=Path, default=None, help="PNG of coverage, false verdicts and power")
    args = ap.parse_args(argv)
    reps = args.reps or (200 if args.quick else 1000)

    t0, c0 = time.perf_counter(), time.process_time()
    quad_err = check_quadrature(np.random.default_rng(np.random.SeedSequence([args.seed, 10_000])))
    one_seed = OneSeed()
    grid = [(sc, d) for sc in scenarios() for d in DELTAS]
    cells = [run_cell(sc, d, reps, args.seed, i, one_seed)
             for i, (sc, d) in enumerate(tqdm(grid, desc="cells", file=sys.stderr, mininterval=2))]
    # after the grid, so the grid's cells keep their random streams
    ceiling = [run_retention(sc, reps, args.seed, len(grid) + i) for i, sc in enumerate(retention_scenarios())]
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0

    print(f"# claims_coverage: {reps} replications per cell, {len(grid)} cells, seed {args.seed}, "
          f"σ_item = {SIGMA_ITEM}, {SEEDS} seeds; quadrature vs Monte Carlo max |error| {quad_err:.1e}\n")
    print(tables(cells))
    checks = {k: sum(c["checks"][k] for c in cells) for k in cells[0]["checks"]}
    print(f"\nchecks over all {reps * len(grid)} simulated experiments: classify(...) == \"reproduced\" with "
          f"low <= 0: {checks['reproduced_with_low_le_0_three_seeds']} (3 seeds), "
          f"{checks['reproduced_with_low_le_0_one_seed']} (1 seed), must be 0; zero-width 3-seed intervals: "
          f"{checks['zero_width_three_seeds']}, must be 0; the script's mirror of the 3-seed rule vs "
          f"replicated_difference, intervals or p-values that differ: {checks['mirror_mismatch_three_seeds']}, "
          f"must be 0")
    for c in cells:  # the coverage and "reproduced" within each branch of the 3-seed rule (from the mirror)
        sub = c["three_seeds"].get("crossed") or c["three_seeds"]["nested"]
        parts = [f"{name} {100 * sub[key]['share']:.0f} %: coverage {pct(sub[key]['coverage'])}, "
                 f"reproduced {pct(sub[key]['reproduced'])}" for key, name in (
                     ("satterthwaite", "Satterthwaite"), ("fallback", "fallback"), ("spread", "spread"),
                     ("floor", "floor")) if key in sub and sub[key]["experiments"]]
        t = c["three_seeds"]["t_alone"]
        print(f"  branches, {c['label']}, Δ = {c['delta']:g}: " + "; ".join(parts)
              + f"; score interval wider than the t in {100 * c['three_seeds']['score_widens']:.0f} % (t alone: "
              f"coverage {pct(t['coverage_population'])}, reproduced {pct(t['reproduced'])}, "
              f"contradicted {pct(t['contradicted'])})")
    print(f"\nNear the ceiling: retention \"a - b >= {RETENTION_BOUND:g}\" (classify(diff, \">=\"), null = bound), "
          f"{SEEDS} seeds, shared items, Δ = 0 (\"reproduced\" is right: power; \"contradicted\" false), %:\n")
    print("| n | acc | σ_seed | case | identical outcomes | coverage of Δ | reproduced (power) | contradicted "
          "| reproduced when identical | mean low | t alone: reproduced | t alone: zero-width |")
    print("|---:|---:|---:|:---:|" + "---:|" * 8)
    for c in ceiling:
        sc, t = c["scenario"], c["t_alone"]
        rid = pct(c["reproduced_identical"]) if c["reproduced_identical"] else "-"
        print(f"| {sc['n']} | {sc['level']:g} | {sc['sigma_seed']:g} | {sc['case']} | {pct(c['identical_outcomes'])} "
              f"| {pct(c['coverage'])} | {pct(c['reproduced'])} | {pct(c['contradicted'])} | {rid} "
              f"| {c['mean_low']:+.4f} | {pct(t['reproduced'])} | {t['zero_width']} of {c['reps']} |")
    ceiling_checks = {k: sum(c["checks"][k] for c in ceiling) for k in ceiling[0]["checks"]}
    print(f"\nchecks over its {reps * len(ceiling)} experiments: \"reproduced\" with low <= bound: "
          f"{ceiling_checks['reproduced_with_low_le_bound']}, zero-width intervals: {ceiling_checks['zero_width']}, "
          f"mirror vs replicated_difference, differ: {ceiling_checks['mirror_mismatch']}; all must be 0")
    print(f"\nwall {wall:.1f} s, CPU {cpu:.1f} s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "settings": {"reps": reps, "seed": args.seed, "sigma_item": SIGMA_ITEM, "seeds": SEEDS,
                         "deltas": DELTAS, "confidence": stats.CONFIDENCE, "quadrature_mc_max_error": quad_err,
                         "retention_bound": RETENTION_BOUND},
            "wall_s": wall, "cpu_s": cpu, "checks": checks, "cells": cells,
            "ceiling_checks": ceiling_checks, "ceiling": ceiling}, indent=1))
    if args.figure:
        figure(cells, args.figure)
    failures = []
    bad = (checks["reproduced_with_low_le_0_three_seeds"] + checks["reproduced_with_low_le_0_one_seed"]
           + ceiling_checks["reproduced_with_low_le_bound"])
    if bad:
        failures.append(f"{bad} \"reproduced\" verdicts with the interval's low end <= 0 (or the bound)")
    zero_width = checks["zero_width_three_seeds"] + ceiling_checks["zero_width"]
    if zero_width:
        failures.append(f"{zero_width} zero-width 3-seed intervals")
    if checks["mirror_mismatch_three_seeds"] + ceiling_checks["mirror_mismatch"]:
        failures.append(f"the mirror of the 3-seed rule differs from replicated_difference on "
                        f"{checks['mirror_mismatch_three_seeds'] + ceiling_checks['mirror_mismatch']} experiments")
    for f in failures:
        print(f"FAILED: {f}", file=sys.stderr)
    return 1 if failures else 0

if __name__ == "__main__":
    sys.exit(main())

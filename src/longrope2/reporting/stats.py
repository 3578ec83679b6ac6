"""Paired comparisons of two models scored on the SAME items, and the verdict rules of the paper's claims.

Pure functions of per-item outcomes (1 = exact match, 0 = miss); no I/O. Each item and each seed is counted
once (docs/method.md §7):

- one seed (`paired_difference`): Tango's score interval for a difference of paired proportions (it holds
  its level with few discordant pairs, where a percentile bootstrap is too narrow) and McNemar's exact
  two-sided p-value (a binomial test on the discordant pairs);
- several seeds (`replicated_difference`): the mean over seeds of each seed's paired difference, with a
  t interval whose variance has both the items' and the seeds' share. Items shared by every seed (the
  evaluation suites): the crossed random-effects variance of a grand mean, (MS_seed + MS_item - MS_error)
  / (n S), Satterthwaite's degrees of freedom (S - 1 where the seeds' share is truncated at 0); items drawn
  per seed (the held-out sets): the seeds' spread, S - 1 degrees of freedom, at least the items' own
  sampling variance; for 0/1 outcomes never narrower than the score interval of the items counted once;
- `holm`: Holm's step-down adjustment of a claim's p-values (the family-wise error of "contradicted if any");
- `classify`: "a > b" (superiority) and "a - b >= bound" (a retention), from the interval AND the adjusted p.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
from scipy import optimize
from scipy import stats as sps

CONFIDENCE = 0.95


# The difference in exact match the default run is sized to resolve (a +-0.05 half-width).
RESOLVABLE = 0.05


REPRODUCED, CONTRADICTED, UNRESOLVED = "reproduced", "contradicted", "unresolved"


@dataclass(frozen=True)
class PairedDifference:
    diff: float  # mean(a) - mean(b), over items (and seeds)
    low: float  # confidence interval of diff
    high: float
    n: int  # items, each counted once
    a_only: int  # items a got right more often than b (one seed: right where b is wrong)
    b_only: int
    p_value: float  # two-sided, against `null`
    seeds: int = 1
    interval: str = "score"  # score (Tango, one seed) | t (one seed, non-binary) | crossed | nested (seeds)
    null: float = 0.0  # the difference the p-value tests against (0, or a retention's bound)
    p_adjusted: float | None = None  # Holm-adjusted within its claim

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    @property
    def resolves(self) -> bool:
        """Whether this comparison can tell a RESOLVABLE difference from none (its interval is narrow enough)."""
        return self.half_width <= RESOLVABLE

    @property
    def discordant(self) -> int:
        return self.a_only + self.b_only

    @property
    def p(self) -> float:
        """The p-value a verdict uses: Holm-adjusted where the claim was adjusted."""
        return self.p_value if self.p_adjusted is None else self.p_adjusted


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p-value: the discordant pairs against Binomial(a_only + b_only, 1/2)."""
    n = a_only + b_only
    return 1.0 if n == 0 else float(sps.binomtest(a_only, n, 0.5).pvalue)


def tango_statistic(delta: float, a_only: float, b_only: float, n: int) -> float:
    """Tango's (1998) score statistic for H0: p(a only) - p(b only) = delta on n paired binary items.

    (a_only - b_only - n delta) / sqrt(n (2 q + delta (1 - delta))), q the restricted maximum-likelihood
    estimate of p(b only) given delta (the positive root of 2n q^2 + B q + C = 0)."""
    b, c = a_only, b_only
    big_b = -b - c + (2 * n - b + c) * delta
    big_c = -c * delta * (1 - delta)
    q = (math.sqrt(max(big_b * big_b - 8 * n * big_c, 0.0)) - big_b) / (4 * n)
    var = n * (2 * q + delta * (1 - delta))
    num = b - c - n * delta
    if var <= 0:
        return 0.0 if num == 0 else math.copysign(math.inf, num)
    return num / math.sqrt(var)


def tango_interval(a_only: float, b_only: float, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Tango's score interval for p(a only) - p(b only): every delta whose score test keeps H0 at 1 - confidence.

    The statistic falls monotonically in delta, so each end is one root."""
    if not 0 <= a_only + b_only <= n or n <= 0:
        raise ValueError(f"need 0 <= a_only + b_only <= n and n > 0, got {a_only}, {b_only}, {n}")
    z = float(sps.norm.ppf(0.5 + confidence / 2))
    est = (a_only - b_only) / n
    eps = 1e-12

    def f(delta: float, target: float) -> float:
        return tango_statistic(delta, a_only, b_only, n) - target

    low = -1.0 if est <= -1 + eps or f(-1 + eps, z) <= 0 else optimize.brentq(f, -1 + eps, est, args=(z,), xtol=1e-12)
    high = 1.0 if est >= 1 - eps or f(1 - eps, -z) >= 0 else optimize.brentq(f, est, 1 - eps, args=(-z,), xtol=1e-12)
    return float(low), float(high)


def tango_p(null: float, a_only: float, b_only: float, n: int) -> float:
    """Two-sided p-value of the score test of H0: difference = null (at 0: McNemar's asymptotic test)."""
    return float(2 * sps.norm.sf(abs(tango_statistic(null, a_only, b_only, n))))


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = CONFIDENCE,
                      null: float = 0.0) -> PairedDifference:
    """a, b: one seed's per-item outcomes of two models on the same items, in the same order.

    0/1 outcomes: Tango's score interval, McNemar's exact p (null 0) or the score test's (null != 0).
    Other values (e.g. a per-item NLL): a paired t interval and p."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)  # (n,)
    if x.shape != y.shape or x.ndim != 1 or x.size == 0:
        raise ValueError("paired outcomes need two equal-length, non-empty 1-d sequences "
                         f"(got {x.shape} and {y.shape})")
    d = x - y
    n, a_only, b_only = int(d.size), int(np.sum(d > 0)), int(np.sum(d < 0))
    if np.isin(x, (0.0, 1.0)).all() and np.isin(y, (0.0, 1.0)).all():
        low, high = tango_interval(a_only, b_only, n, confidence)
        p = mcnemar_exact(a_only, b_only) if null == 0 else tango_p(null, a_only, b_only, n)
        return PairedDifference(float(d.mean()), low, high, n, a_only, b_only, p, null=null)
    low, high, p = _t_interval(float(d.mean()), float(d.var(ddof=1)) / n if n > 1 else 0.0, n - 1, confidence, null)
    return PairedDifference(float(d.mean()), low, high, n, a_only, b_only, p, interval="t", null=null)


def _t_interval(est: float, var: float, df: float, confidence: float, null: float) -> tuple[float, float, float]:
    """(low, high, two-sided p against null) of a t interval; a zero variance is a point."""
    if var <= 0 or df <= 0:
        return est, est, 1.0 if est == null else 0.0
    se = math.sqrt(var)
    t = float(sps.t.ppf(0.5 + confidence / 2, df))
    return est - t * se, est + t * se, float(2 * sps.t.sf(abs(est - null) / se, df))


def _crossed(d: list[np.ndarray], per_seed: np.ndarray, est: float) -> tuple:
    """(n, var, df, a_only, b_only, a_share, b_share) of seeds that scored the same n items (two-way ANOVA)."""
    seeds = len(d)
    m = np.stack(d)  # (S, n)
    n = m.shape[1]
    item_mean = m.mean(axis=0)  # (n,)
    ms_seed = n * float(per_seed.var(ddof=1))
    ms_item = seeds * float(item_mean.var(ddof=1)) if n > 1 else 0.0
    resid = m - per_seed[:, None] - item_mean[None, :] + est
    ms_err = float((resid ** 2).sum()) / ((seeds - 1) * (n - 1)) if n > 1 else 0.0
    combined = ms_seed + ms_item - ms_err
    if combined >= max(ms_seed, ms_item):
        den = ms_seed ** 2 / (seeds - 1) + (ms_item ** 2 / (n - 1) if n > 1 else 0.0) + (
            ms_err ** 2 / ((seeds - 1) * (n - 1)) if n > 1 else 0.0)
        df = combined ** 2 / den if den > 0 else math.inf
    else:  # the seeds' share estimated below 0: truncated, and its 2 df kept (benchmarks/claims_coverage.py:
        # with n - 1 df this branch covered 57-81 % under a real seed effect)
        combined, df = max(ms_seed, ms_item), seeds - 1
    # one "average seed": each item's seed-mean discordance, so (a_share - b_share) / n is the estimate
    a_share, b_share = float(np.clip(item_mean, 0, None).sum()), float(np.clip(-item_mean, 0, None).sum())
    return (n, combined / (n * seeds), df, int(np.sum(item_mean > 0)), int(np.sum(item_mean < 0)), a_share,
            b_share)


def _nested(d: list[np.ndarray], per_seed: np.ndarray, est: float) -> tuple:
    """(n, var, df, a_only, b_only, a_share, b_share) of seeds that each scored their own items."""
    seeds = len(d)
    n = int(sum(dk.size for dk in d))
    var, df = float(per_seed.var(ddof=1)) / seeds, seeds - 1
    # at least the items' own sampling variance: seeds whose differences tie by chance are not certainty
    within = sum(float(dk.var(ddof=1)) / dk.size for dk in d if dk.size > 1) / seeds ** 2
    if var < within:  # the seeds' spread came out small: its S - 1 df stay (the seeds' share is unknown)
        var = within
    a_only, b_only = int(sum((dk > 0).sum() for dk in d)), int(sum((dk < 0).sum() for dk in d))
    return n, var, df, a_only, b_only, float(a_only), float(b_only)


def replicated_difference(pairs: Sequence[tuple[Sequence[float], Sequence[float]]], shared_items: bool,
                          confidence: float = CONFIDENCE, null: float = 0.0) -> PairedDifference:
    """pairs[k] = (a, b): seed k's per-item outcomes of the two models, paired. One seed: `paired_difference`.

    shared_items: every seed scored the same items in the same order (a model that is one model, e.g. the
    base, is repeated beside each seed): each item is counted once, and the variance is the crossed
    random-effects one, (MS_seed + MS_item - MS_error) / (n S), with Satterthwaite's degrees of freedom; where
    the seeds' share comes out below 0, the larger of MS_seed and MS_item with S - 1 degrees of freedom (a
    truncated seed share is uncertain, not absent). Otherwise (each seed its own items): the spread of the
    seeds' paired differences, S - 1 degrees of freedom, at least the items' own sampling variance.
    0/1 outcomes: the interval is the hull of that t interval and Tango's score interval of the items counted
    once (crossed: each item's seed-mean discordance, so that the score interval is centred on the same
    estimate; nested: every seed's items), the p-value the larger of the two."""
    if not pairs:
        raise ValueError("replicated_difference needs at least one seed")
    if len(pairs) == 1:
        return paired_difference(*pairs[0], confidence=confidence, null=null)
    d = [np.asarray(a, dtype=float) - np.asarray(b, dtype=float) for a, b in pairs]
    for k, (a, b) in enumerate(pairs):
        if np.shape(a) != np.shape(b) or d[k].ndim != 1 or d[k].size == 0:
            raise ValueError(f"seed {k}: paired outcomes need two equal-length, non-empty 1-d sequences")
    seeds = len(d)
    per_seed = np.array([dk.mean() for dk in d])  # (S,)
    est = float(per_seed.mean())
    if shared_items and len({dk.size for dk in d}) != 1:
        raise ValueError("shared_items: every seed needs the same items")
    n, var, df, a_only, b_only, a_share, b_share = (_crossed if shared_items else _nested)(d, per_seed, est)
    kind = "crossed" if shared_items else "nested"
    low, high, p = _t_interval(est, var, df, confidence, null)
    if all(np.isin(np.asarray(x, dtype=float), (0.0, 1.0)).all() for pair in pairs for x in pair):
        # 0/1 outcomes: never narrower than the score interval of the items counted once (a t interval on
        # a handful of discordant items, or none, is a point: identical outcomes in every seed are not certainty)
        s_low, s_high = tango_interval(a_share, b_share, n, confidence)
        low, high, p = min(low, s_low), max(high, s_high), max(p, tango_p(null, a_share, b_share, n))
    return PairedDifference(est, low, high, n, a_only, b_only, p, seeds=seeds, interval=kind, null=null)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (same order as given): the i-th smallest times (m - i), running max."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def adjust(results: Sequence[PairedDifference]) -> list[PairedDifference]:
    """The results of one claim with their Holm-adjusted p-values."""
    return [replace(r, p_adjusted=p) for r, p in zip(results, holm([r.p_value for r in results]))]


def classify(diff: PairedDifference, op: str, alpha: float = 1 - CONFIDENCE) -> str:
    """A claim about a - b from its interval and its (adjusted) p-value; both must agree.

    op ">" (superiority, the paper's "outperforms"): reproduced when the interval lies above 0 and p < alpha,
    contradicted when it lies below 0 and p < alpha (b better), else unresolved, and always unresolved with no
    discordant item (identical outcomes: a floor or a ceiling tells nothing).
    op ">=" (a retention, "a - b >= diff.null", null < 0): reproduced when the interval lies above the bound
    and p < alpha, contradicted when it lies below it and p < alpha, else unresolved."""
    if op not in (">", ">="):
        raise ValueError(f"op = {op!r}: accepted: '>' or '>='")
    if op == ">" and diff.discordant == 0:
        return UNRESOLVED
    significant = diff.p < alpha
    if diff.low > diff.null and significant:
        return REPRODUCED
    if diff.high < diff.null and significant:
        return CONTRADICTED
    return UNRESOLVED


def noninferior(diff: PairedDifference, margin: float = RESOLVABLE) -> bool:
    """a no worse than b by more than `margin` (the interval's low end above -margin): shown beside a
    superiority verdict, never counted as one (our addition)."""
    return diff.low > -margin


def classify_seeds(holds: Sequence[bool]) -> str:
    """A claim checked once per seed (no sampling noise within a seed): reproduced if it holds in every
    seed, contradicted if in none, else unresolved."""
    if not holds:
        raise ValueError("classify_seeds needs at least one seed")
    return REPRODUCED if all(holds) else CONTRADICTED if not any(holds) else UNRESOLVED

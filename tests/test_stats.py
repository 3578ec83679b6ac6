"""Paired comparisons (stats.py) and the paper's claims classified by them (claims.py).

Oracles: the closed-form binomial (McNemar), a numerical restricted maximum likelihood (Tango's score
statistic), exact enumeration of the multinomial (the interval's coverage), textbook Holm, the closed-form
variance of a grand mean under crossed random effects."""

from __future__ import annotations

import math
import random
from fractions import Fraction

import numpy as np
import pytest
from scipy import optimize
from scipy import stats as sps

from longrope2.reporting import claims, stats


def _pairs(n_both: int, n_a: int, n_b: int, n_none: int) -> tuple[list[int], list[int]]:
    a = [1] * n_both + [1] * n_a + [0] * n_b + [0] * n_none
    b = [1] * n_both + [0] * n_a + [1] * n_b + [0] * n_none
    return a, b


def test_mcnemar_exact_is_the_two_sided_binomial_on_discordant_pairs():
    for a_only, b_only in ((0, 0), (3, 0), (10, 4), (7, 21), (50, 50)):
        n = a_only + b_only
        k = min(a_only, b_only)
        expected = 1.0 if n == 0 else min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)
        assert stats.mcnemar_exact(a_only, b_only) == pytest.approx(expected, rel=1e-12)


def _score_by_numerical_mle(delta: float, b: int, c: int, n: int) -> float:
    """Tango's statistic from first principles: maximise the multinomial likelihood of (a only, b only, rest)
    under p(a only) - p(b only) = delta numerically, then (b - c - n delta) / sqrt(n Var) with the paired
    variance p10 + p01 - delta^2."""
    m = n - b - c
    lo, hi = max(0.0, -delta), (1 - delta) / 2

    def nll(q: float) -> float:
        p10, p01, rest = q + delta, q, 1 - 2 * q - delta
        return -sum(k * math.log(max(p, 1e-300)) for k, p in ((b, p10), (c, p01), (m, rest)) if k)

    q = optimize.minimize_scalar(nll, bounds=(lo + 1e-13, hi - 1e-13), method="bounded",
                                 options={"xatol": 1e-13}).x
    return (b - c - n * delta) / math.sqrt(n * ((q + delta) + q - delta * delta))


@pytest.mark.parametrize(("b", "c", "n"), [(40, 10, 320), (0, 2, 128), (3, 0, 64), (7, 21, 100), (0, 0, 50)])
def test_tango_statistic_matches_the_numerical_restricted_mle(b, c, n):
    for delta in (-0.3, -0.05, 0.0, 0.02, 0.1, 0.4):
        if not -1 < delta < 1:
            continue
        assert stats.tango_statistic(delta, b, c, n) == pytest.approx(_score_by_numerical_mle(delta, b, c, n),
                                                                      rel=1e-5, abs=1e-7)


def test_tango_interval_is_where_the_score_test_keeps_h0():
    z = sps.norm.ppf(0.975)
    for b, c, n in ((40, 10, 320), (0, 2, 128), (5, 1, 60)):
        low, high = stats.tango_interval(b, c, n)
        assert abs(_score_by_numerical_mle(low, b, c, n) - z) < 1e-4
        assert abs(_score_by_numerical_mle(high, b, c, n) + z) < 1e-4
        assert low < (b - c) / n < high
    # the case: 0 vs 2 discordant of 128; the percentile bootstrap's low end was -0.039
    assert stats.tango_interval(0, 2, 128)[0] == pytest.approx(-0.0552, abs=5e-4)
    assert stats.tango_interval(5, 0, 5) == (pytest.approx(0.131, abs=1e-3), 1.0)


def test_tango_interval_holds_its_level_by_exact_enumeration():
    """Exact coverage over every outcome of the paired multinomial, few discordant pairs included."""
    n = 40
    for p10, p01 in ((0.02, 0.01), (0.05, 0.05), (0.15, 0.05), (0.0, 0.03)):
        delta, covered = p10 - p01, 0.0
        for b in range(n + 1):
            for c in range(n + 1 - b):
                prob = sps.multinomial.pmf([b, c, n - b - c], n, [p10, p01, 1 - p10 - p01])
                if prob < 1e-12:
                    continue
                low, high = stats.tango_interval(b, c, n)
                covered += prob * (low <= delta <= high)
        assert covered >= 0.93, (p10, p01, covered)


def test_paired_difference_counts_interval_and_pairing():
    a, b = _pairs(200, 40, 10, 70)
    r = stats.paired_difference(a, b)
    assert (r.n, r.a_only, r.b_only, r.seeds, r.interval) == (320, 40, 10, 1, "score")
    assert r.diff == pytest.approx(30 / 320)
    assert r.low > 0 and r.p_value == pytest.approx(stats.mcnemar_exact(40, 10))
    # the Wald interval of the paired difference agrees to ~10 % with this many discordant pairs
    p10, p01 = 40 / 320, 10 / 320
    se = math.sqrt((p10 + p01 - (p10 - p01) ** 2) / 320)
    assert r.half_width == pytest.approx(1.96 * se, rel=0.1)
    # identical outcomes: no discordant pair, yet the interval is not a point (the samples bound it)
    same = stats.paired_difference([1] * 10, [1] * 10)
    assert same.discordant == 0 and same.low < 0 < same.high and same.p_value == 1.0
    with pytest.raises(ValueError, match=r"paired outcomes need two equal-length, non-empty 1-d sequences"):
        stats.paired_difference([1, 0, 1], [1, 0])


def test_more_samples_narrow_the_interval():
    rng = random.Random(0)
    widths = []
    for n in (40, 160, 640):
        a = [int(rng.random() < 0.8) for _ in range(n)]
        b = [int(rng.random() < 0.7) for _ in range(n)]
        widths.append(stats.paired_difference(a, b).half_width)
    assert widths[0] > widths[1] > widths[2]
    assert not stats.paired_difference(*_pairs(10, 4, 2, 4)).resolves


def test_holm_matches_the_textbook_step_down():
    p = [0.01, 0.04, 0.03, 0.005]
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 -> 0.02, 0.03, 0.06, 0.04 -> running max 0.02, 0.03, 0.06, 0.06
    assert stats.holm(p) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([0.5]) == [0.5] and stats.holm([0.6, 0.9]) == [1.0, 1.0]


@pytest.mark.parametrize(
    ("counts", "verdict"),
    [
        ((200, 40, 5, 75), stats.REPRODUCED),
        ((200, 5, 40, 75), stats.CONTRADICTED),
        ((200, 0, 0, 120), stats.UNRESOLVED),  # the same outcomes everywhere: a floor / ceiling tells nothing
        ((120, 0, 1, 7), stats.UNRESOLVED),
        ((200, 10, 10, 100), stats.UNRESOLVED),  # equal discordance: the interval straddles 0
        ((126, 2, 0, 0), stats.UNRESOLVED),  # 2 vs 0 of 128: McNemar p = 0.5 (the old bootstrap said > 0)
        ((300, 6, 0, 14), stats.REPRODUCED),  # 6 vs 0: p = 0.031 and the score interval above 0
    ],
)
def test_classify_superiority(counts, verdict):
    r = stats.paired_difference(*_pairs(*counts))
    assert stats.classify(r, ">") == verdict
    if verdict == stats.REPRODUCED:
        assert r.low > 0  # never reproduced with an interval that reaches 0


def test_holm_can_turn_a_verdict_unresolved_and_a_retention_is_tested_against_its_bound():
    r = stats.paired_difference(*_pairs(300, 6, 0, 14))  # p = 0.031
    assert stats.classify(stats.adjust([r, r])[0], ">") == stats.UNRESOLVED  # 0.062 after Holm over two
    retained = stats.paired_difference(*_pairs(290, 2, 3, 25), null=-0.05)
    assert retained.p_value == pytest.approx(2 * sps.norm.sf(stats.tango_statistic(-0.05, 2, 3, 320)))
    assert stats.classify(retained, ">=") == stats.REPRODUCED
    lost = stats.paired_difference(*_pairs(200, 0, 60, 60), null=-0.05)
    assert stats.classify(lost, ">=") == stats.CONTRADICTED
    with pytest.raises(ValueError, match=r"op = '<': accepted: '>' or '>='"):
        stats.classify(r, "<")


def test_replicated_difference_crossed_is_the_random_effects_variance():
    """Seeds sharing the items: Var(grand mean) = (MS_seed + MS_item - MS_err) / (n S) with Satterthwaite's df
    (S - 1 where the seeds' share comes out below 0), from a hand-written two-way ANOVA (sums of squares);
    0/1 outcomes: the hull with Tango's interval of the items counted once."""
    rng = np.random.default_rng(0)
    for trial in range(6):
        a = (rng.random((3, 50)) < 0.75).astype(int)
        b = (rng.random((1, 50)) < 0.55).astype(int)  # one model (the base) beside every seed
        r = stats.replicated_difference([(a[k], b[0]) for k in range(3)], shared_items=True)
        d = a - b  # (S, n)
        S, n = d.shape
        grand = d.mean()
        ss_seed = n * ((d.mean(1) - grand) ** 2).sum()
        ss_item = S * ((d.mean(0) - grand) ** 2).sum()
        ss_err = ((d - grand) ** 2).sum() - ss_seed - ss_item
        ms = ss_seed / (S - 1), ss_item / (n - 1), ss_err / ((S - 1) * (n - 1))
        combined = ms[0] + ms[1] - ms[2]
        if combined >= max(ms[0], ms[1]):
            df = combined ** 2 / (ms[0] ** 2 / (S - 1) + ms[1] ** 2 / (n - 1) + ms[2] ** 2 / ((S - 1) * (n - 1)))
        else:
            combined, df = max(ms[0], ms[1]), S - 1
        half = sps.t.ppf(0.975, df) * math.sqrt(combined / (n * S))
        item = d.mean(0)
        s_low, s_high = stats.tango_interval(float(item.clip(0).sum()), float((-item).clip(0).sum()), n)
        assert s_low < grand < s_high  # the score interval of the "average seed" is around the same estimate
        assert r.diff == pytest.approx(grand) and (r.seeds, r.n, r.interval) == (3, 50, "crossed")
        assert r.low == pytest.approx(min(grand - half, s_low)) and r.high == pytest.approx(max(grand + half, s_high))
    # the same items copied into three seeds are counted once: 50 items, not 150 pairs
    copied = stats.replicated_difference([(a[0], b[0])] * 3, shared_items=True)
    one = stats.paired_difference(a[0], b[0])
    assert copied.n == 50 and copied.low <= one.low and copied.high >= one.high
    # identical outcomes in every seed are not certainty: the score interval of 64 items, not a point
    same = stats.replicated_difference([([1] * 64, [1] * 64)] * 3, shared_items=True, null=-0.024)
    assert same.low == pytest.approx(stats.tango_interval(0, 0, 64)[0]) and stats.classify(same, ">=") == stats.UNRESOLVED


def test_replicated_difference_nested_uses_the_seeds_spread():
    per_seed = [([1] * 30 + [0] * 10, [1] * 20 + [0] * 20), ([1] * 25 + [0] * 15, [1] * 22 + [0] * 18),
                ([1] * 28 + [0] * 12, [1] * 28 + [0] * 12)]
    r = stats.replicated_difference(per_seed, shared_items=False)
    diffs = np.array([10 / 40, 3 / 40, 0.0])
    se = diffs.std(ddof=1) / math.sqrt(3)
    assert r.diff == pytest.approx(diffs.mean()) and r.interval == "nested" and r.n == 120
    assert r.high == pytest.approx(diffs.mean() + sps.t.ppf(0.975, 2) * se)
    assert r.p_value == pytest.approx(2 * sps.t.sf(diffs.mean() / se, 2))


def test_seeds_whose_differences_tie_are_not_certainty():
    """Three seeds, each 2 vs 1 discordant of 128 (each alone: p = 1): the seeds' spread is 0, yet the items'
    sampling variance stays (a zero-width interval with p = 0 would call it reproduced)."""
    a, b = [1, 1, 0] + [0] * 125, [0, 0, 1] + [0] * 125
    r = stats.replicated_difference([(a, b)] * 3, shared_items=False)
    assert r.low < 0 < r.high and r.p_value > 0.05 and stats.classify(r, ">") == stats.UNRESOLVED
    d = np.array(a) - np.array(b)
    assert r.half_width == pytest.approx(sps.t.ppf(0.975, 2) * math.sqrt(d.var(ddof=1) / 128 / 3))


def test_seeds_claims():
    assert stats.classify_seeds([True, True]) == stats.REPRODUCED
    assert stats.classify_seeds([False]) == stats.CONTRADICTED
    assert stats.classify_seeds([True, False]) == stats.UNRESOLVED


# ---- claims: pairing by ids, the paper's Table 2 ordering, Holm within a claim ----


def _scored(flags: list[int], source: str = "x.json", prefix: str = "s") -> claims.Scored:
    return claims.Scored(tuple(f"{prefix}{i}" for i in range(len(flags))), tuple(flags), source)


def _outcomes() -> dict[tuple[str, str], dict[int | None, claims.Scored]]:
    """A toy 'paper-like' run: longrope2 best, yarn = longrope = ntk, pi and none fail; 320 samples."""
    good = [1] * 300 + [0] * 20
    same = [1] * 280 + [0] * 40
    bad = [0] * 300 + [1] * 20
    out = {}
    for ev in ("NIAH 1k", "NIAH 2k"):
        for name, flags in (("longrope2", good), ("longrope", same), ("yarn", same), ("ntk", same), ("pi", bad),
                            ("none", bad), (claims.training_free("longrope2"), same),
                            (claims.training_free("yarn"), good)):
            out[(name, ev)] = {0: _scored(flags, f"{name}.json")}
        out[("base", ev)] = {None: _scored(bad, "base.json")}
    return out


def test_paper_table2_leads_follow_both_models():
    table2 = {"phi3": {"longrope2": {4096: 90.4, 131072: 58.8}, "ntk": {4096: 91.3, 131072: 49.4},
                       "longrope": {4096: 88.4, 131072: 53.7}, "yarn": {4096: 85.7, 131072: 39.4}},
              "llama": {"longrope2": {4096: 94.6, 131072: 82.0}, "ntk": {4096: 94.4, 131072: 73.2},
                        "longrope": {4096: 94.6, 131072: 73.4}, "yarn": {4096: 91.9, 131072: 49.4}}}
    leads = claims.paper_table2_leads(table2)
    assert leads[Fraction(1, 32)] == ("yarn",)  # NTK leads in Phi3, LongRoPE ties in LLaMA: not a claim there
    assert leads[Fraction(1)] == ("longrope", "ntk", "yarn")


def test_table2_is_superiority_with_holm_within_the_claim():
    methods = ["none", "pi", "ntk", "yarn", "longrope", "longrope2"]
    at = [("NIAH 1k", claims.TABLE2_BASELINES)]
    rows = claims.decide(claims.table2(_outcomes(), methods, at, "T2"))
    assert [r.statement for r in rows] == ["longrope2 > longrope", "longrope2 > ntk", "longrope2 > yarn"]
    assert all(r.verdict == stats.REPRODUCED and r.result.p_adjusted >= r.result.p_value for r in rows)
    # before fine-tuning: the training-free variants (yarn better here)
    before = claims.decide(claims.table2(_outcomes(), ["yarn", "longrope2"], [("NIAH 2k", ("yarn",))], "T2", True))
    assert before[0].verdict == stats.CONTRADICTED
    # a baseline that did not run: an unresolved comparison that says so, not a guess
    missing = claims.decide(claims.table2(_outcomes(), ["yarn", "longrope2"], at, "T2", suggestion=" (add it)"))
    assert [r.verdict for r in missing] == [stats.UNRESOLVED, stats.UNRESOLVED, stats.REPRODUCED]
    assert missing[0].note == "longrope not run by this experiment (add it)"


def test_identical_models_are_unresolved_at_any_n():
    flags = [1] * 5000 + [0] * 5
    out = {("longrope2", "e"): {0: _scored(flags)}, ("yarn", "e"): {0: _scored(flags)}}
    rows = claims.decide(claims.table2(out, ["yarn", "longrope2"], [("e", ("yarn",))], "T2"))
    assert rows[0].verdict == stats.UNRESOLVED and "no discordant sample" in claims.detail_table(rows).rows[0][-1]


def test_pairing_joins_on_ids_and_stops_on_a_mismatch():
    a = claims.Scored(("x", "y", "z"), (1, 1, 0), "a.json")
    b = claims.Scored(("z", "x", "y"), (0, 0, 1), "b.json")  # the same samples in another order
    r = claims.paired({("a", "e"): {0: a}, ("b", "e"): {0: b}}, "a", "b", "e")
    assert (r.a_only, r.b_only) == (1, 0)  # x: 1 vs 0; y: 1 vs 1; z: 0 vs 0
    stale = claims.Scored(("x", "y", "w"), (1, 1, 0), "stale/b.json")
    with pytest.raises(claims.OutcomeMismatch, match=r"a\.json and stale/b\.json .*ids disagree"):
        claims.paired({("a", "e"): {0: a}, ("b", "e"): {0: stale}}, "a", "b", "e")


def test_seeds_are_counted_once():
    """The same 50 items in two seeds with identical outcomes: 50 items, not 100 pairs (the old pooling's
    p = 1.6e-30 for 50 pairs copied twice)."""
    a, b = [1] * 45 + [0] * 5, [0] * 45 + [1] * 5
    out = {("m", "e"): {0: _scored(a), 1: _scored(a)}, ("base", "e"): {None: _scored(b)}}
    r = claims.paired(out, "m", "base", "e")
    assert (r.n, r.seeds, r.a_only, r.b_only) == (50, 2, 45, 5)
    assert r.diff == pytest.approx(0.8)


def test_retention_ablations_and_critical_dim():
    out = {("longrope2", "short"): {0: _scored([1] * 98 + [0] * 2)}, ("base", "short"): {None: _scored([1] * 99 + [0])},
           ("yarn", "short"): {0: _scored([1] * 60 + [0] * 40)}}
    rows = claims.decide(claims.retention(out, ["yarn", "longrope2"], ["short"]))
    assert [r.statement.split(" ")[0] for r in rows] == ["longrope2", "longrope2"]
    assert rows[1].statement == "longrope2 > yarn" and rows[1].verdict == stats.REPRODUCED
    assert [r.claim for r in rows] == ["Table 4, short-context retention", "Table 4, LongRoPE2 outperforms on short tasks"]
    assert rows[0].verdict == stats.UNRESOLVED  # -0.01 with 100 samples: the interval crosses -0.024
    assert rows[0].result.null == pytest.approx(-(1 - claims.PAPER_RETENTION) * 0.99)
    ablations = claims.ablations({}, ["longrope2"], "NIAH 1k", "short", "e.g. experiment=toy_ablations")
    assert len(ablations) == len(claims.ABLATION_CLAIMS)
    assert all(r.verdict == stats.UNRESOLVED and "not run" in r.note for r in ablations)
    found = claims.critical_dim([{"critical_dim": 5, "d_tcd": 6, "s": 8.0, "long_factor": [1.0] * 5 + [9.0] * 11},
                                 {"critical_dim": 6, "d_tcd": 6, "s": 8.0, "long_factor": [1.0] * 6 + [7.5] * 10}])
    assert [r.verdict for r in found] == [stats.REPRODUCED, stats.UNRESOLVED]
    assert found[1].note.startswith("1 of 2 seeds")
    at_s = claims.critical_dim([{"critical_dim": 6, "d_tcd": 6, "s": 8.0, "long_factor": [1.0] * 6 + [8.0] * 10}])
    assert at_s[1].verdict == stats.REPRODUCED and at_s[1].statement == "λ_i ≥ s for every i ≥ c"


def test_claim_tables_summarise_every_comparison():
    rows = claims.table2(_outcomes(), ["none", "pi", "ntk", "yarn", "longrope", "longrope2"],
                         [("NIAH 1k", claims.TABLE2_BASELINES)], "T2")
    rows = claims.decide(rows + claims.ablations({}, ["longrope2"], "NIAH 1k", "short", "x"))
    summary = claims.summary_table(rows)
    t2 = next(r for r in summary.rows if r[0] == "T2")
    assert t2[1] == 3 and sum(t2[2:5]) == t2[1]
    detail = claims.detail_table(rows)
    assert len(detail.rows) == len(rows)
    assert detail.rows[0][5].count("[") == 1 and detail.rows[0][9] in ("yes", "no")

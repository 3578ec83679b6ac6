"""Paired comparisons (stats.py) and the paper's claims classified by them (claims.py)."""

from __future__ import annotations

import math
import random

import pytest

from longrope2 import claims, stats


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


def test_paired_difference_counts_and_interval():
    a, b = _pairs(200, 40, 10, 70)
    r = stats.paired_difference(a, b)
    assert (r.n, r.a_only, r.b_only) == (320, 40, 10)
    assert r.diff == pytest.approx(30 / 320)
    assert r.low < r.diff < r.high and r.low > 0  # 40 vs 10 discordant: resolved
    # the normal approximation of the paired difference: the bootstrap agrees to ~10 %
    p10, p01 = 40 / 320, 10 / 320
    se = math.sqrt((p10 + p01 - (p10 - p01) ** 2) / 320)
    assert r.half_width == pytest.approx(1.96 * se, rel=0.1)
    assert stats.paired_difference(a, b) == r  # fixed seed: the same numbers every run
    # the pairing matters: the same marginals with every miss shared would be a zero-width interval
    assert stats.paired_difference([1] * 10, [1] * 10) == stats.PairedDifference(0.0, 0.0, 0.0, 10, 0, 0, 1.0)


def test_more_samples_narrow_the_interval():
    rng = random.Random(0)
    widths = []
    for n in (40, 160, 640):
        a = [int(rng.random() < 0.8) for _ in range(n)]
        b = [int(rng.random() < 0.7) for _ in range(n)]
        widths.append(stats.paired_difference(a, b).half_width)
    assert widths[0] > widths[1] > widths[2]
    assert not stats.paired_difference(*_pairs(10, 4, 2, 4)).resolves


def test_paired_difference_rejects_unpaired_input():
    with pytest.raises(ValueError, match=r"paired outcomes need two equal-length, non-empty 1-d sequences"):
        stats.paired_difference([1, 0, 1], [1, 0])
    with pytest.raises(ValueError, match=r"paired outcomes need"):
        stats.paired_difference([], [])


@pytest.mark.parametrize(
    ("counts", "op", "verdict"),
    [
        ((200, 40, 5, 75), ">", stats.REPRODUCED),
        ((200, 5, 40, 75), ">", stats.CONTRADICTED),
        ((200, 0, 0, 120), ">", stats.UNRESOLVED),  # the same outcomes everywhere: a floor / ceiling tells nothing
        ((120, 0, 1, 7), ">", stats.UNRESOLVED),  # one discordant pair: the interval [-0.008, 0] alone would say b
        ((200, 10, 10, 100), ">", stats.UNRESOLVED),  # equal discordance: the interval straddles 0
        ((200, 10, 10, 100), ">=", stats.REPRODUCED),  # no worse by 0.05: resolved
        ((20, 3, 5, 12), ">=", stats.UNRESOLVED),  # too few samples either way
        ((200, 5, 40, 75), ">=", stats.CONTRADICTED),
    ],
)
def test_classify(counts, op, verdict):
    r = stats.paired_difference(*_pairs(*counts))
    assert stats.classify(r, op) == verdict


def test_classify_rejects_an_unknown_operator():
    with pytest.raises(ValueError, match=r"op = '<': accepted: '>' or '>='"):
        stats.classify(stats.paired_difference([1], [0]), "<")


def test_seeds_claims():
    assert stats.classify_seeds([True, True]) == stats.REPRODUCED
    assert stats.classify_seeds([False]) == stats.CONTRADICTED
    assert stats.classify_seeds([True, False]) == stats.UNRESOLVED


def _outcomes() -> dict[tuple[str, str], list[int]]:
    """A toy 'paper-like' run: longrope2 best, yarn = longrope, pi and none fail; 320 samples."""
    good = [1] * 300 + [0] * 20
    same = [1] * 280 + [0] * 40
    bad = [0] * 300 + [1] * 20
    out = {}
    for ev in ("NIAH 1k", "NIAH 2k"):
        out |= {("longrope2", ev): good, ("longrope", ev): same, ("yarn", ev): same, ("ntk", ev): same,
                ("pi", ev): bad, ("none", ev): bad, ("base", ev): bad,
                (claims.training_free("longrope2"), ev): same, (claims.training_free("yarn"), ev): good}
    return out


def test_table2_classifies_every_ordering_claim_of_the_methods_that_ran():
    methods = ["none", "pi", "ntk", "yarn", "longrope", "longrope2"]
    rows = claims.table2(_outcomes(), methods, ["NIAH 1k"], "T2")
    assert len(rows) == len(claims.PAPER_ORDER)
    verdicts = {r.statement: r.verdict for r in rows}
    assert verdicts["longrope2 ≥ yarn"] == stats.REPRODUCED
    assert verdicts["longrope2 > pi"] == stats.REPRODUCED
    assert verdicts["yarn > none"] == stats.REPRODUCED
    # before fine-tuning: 'none' is the base, the others their training-free variants (yarn better here)
    before = {r.statement: r for r in claims.table2(_outcomes(), ["none", "yarn", "longrope2"], ["NIAH 2k"], "T2",
                                                    before_tuning=True)}
    assert before["longrope2 ≥ yarn"].verdict == stats.CONTRADICTED
    assert before["longrope2 > none"].result.n == 320
    # a method that did not run: its claims are left out, not guessed
    assert all("longrope " not in r.statement for r in claims.table2(_outcomes(), ["yarn", "longrope2"],
                                                                      ["NIAH 1k"], "T2"))


def test_retention_ablations_and_critical_dim():
    out = {("longrope2", "short"): [1] * 98 + [0] * 2, ("base", "short"): [1] * 99 + [0],
           ("yarn", "short"): [1] * 60 + [0] * 40}
    rows = claims.retention(out, ["yarn", "longrope2"], ["short"])
    assert [r.statement.split(" ")[0] for r in rows] == ["longrope2", "longrope2"]
    assert rows[1].statement == "longrope2 > yarn" and rows[1].verdict == stats.REPRODUCED
    assert rows[0].verdict == stats.UNRESOLVED  # -0.01 with 100 samples: the interval crosses -0.024
    ablations = claims.ablations({}, ["longrope2"], "NIAH 1k", "short", "e.g. experiment=toy_ablations")
    assert len(ablations) == len(claims.ABLATION_CLAIMS)
    assert all(r.verdict == stats.UNRESOLVED and "not run" in r.note for r in ablations)
    found = claims.critical_dim([{"critical_dim": 5, "d_tcd": 6, "s": 8.0, "long_factor": [1.0] * 5 + [9.0] * 11},
                                 {"critical_dim": 6, "d_tcd": 6, "s": 8.0, "long_factor": [1.0] * 6 + [7.5] * 10}])
    assert [r.verdict for r in found] == [stats.REPRODUCED, stats.UNRESOLVED]
    assert found[1].note.startswith("1 of 2 seeds")
    # the bound is inclusive, as the search's: a tail at exactly s holds
    at_s = claims.critical_dim([{"critical_dim": 6, "d_tcd": 6, "s": 8.0, "long_factor": [1.0] * 6 + [8.0] * 10}])
    assert at_s[1].verdict == stats.REPRODUCED and at_s[1].statement == "λ_i ≥ s for every i ≥ c"


def test_claim_tables_summarise_every_comparison():
    rows = claims.table2(_outcomes(), ["none", "pi", "ntk", "yarn", "longrope", "longrope2"], ["NIAH 1k"], "T2")
    rows += claims.ablations({}, ["longrope2"], "NIAH 1k", "short", "x")
    summary = claims.summary_table(rows)
    t2 = next(r for r in summary.rows if r[0] == "T2")
    assert t2[1] == len(claims.PAPER_ORDER) and sum(t2[2:5]) == t2[1]
    detail = claims.detail_table(rows)
    assert len(detail.rows) == len(rows)
    assert detail.rows[0][4].count("[") == 1

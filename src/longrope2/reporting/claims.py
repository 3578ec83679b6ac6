"""The paper's claims a run can test, each classified reproduced / contradicted / unresolved by a paired interval.

Pure functions of per-item outcomes (reporting/stats.py) and search results; no I/O. An evidence is one set of items that
every compared model was scored on (e.g. "NIAH 1k": the needle grid's items at 1024 tokens);
outcomes[(variant, evidence)] maps a seed to that variant's `Scored` items (seed None: one model beside every
seed, e.g. the base). Pairing joins on item ids and stops on any mismatch; each item and each seed is counted
once (stats.replicated_difference). Variants: "base" (the original model), a method (fine-tuned),
"<method> (training-free)" (its factors on the base, not fine-tuned).

Claims (LongRoPE2, arXiv 2502.20082), each tested as the paper states it:
- Table 2: LongRoPE2 outperforms LongRoPE, NTK and YaRN (superiority) at every length of the run that the
  paper's columns cover (L_train < length <= L, at the ratios length / L of the paper's columns, against the
  methods LongRoPE2 leads at that ratio in both of the paper's models). Beyond L, before fine-tuning, and
  against PI and the unextended model: this project's additions, labelled so;
- Table 4: LongRoPE2 keeps >= 97.6 % of the base's short score (the paper's lower retention, Phi3-mini) and
  outperforms LongRoPE, NTK and YaRN there;
- Tables 5, 6, 7, 10: NTK / YaRN at the searched critical dim > at d_tcd; needle-driven > plain-PPL search;
  mixed-window > long-only training (long and short); search from the critical dim > all dims;
- the critical-dim finding (§3): the searched critical dim c <= d_tcd, and every factor from c on >= s.
Within a claim, p-values are Holm-adjusted: "contradicted if any comparison is" holds its 5 % level.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Any

from longrope2.reporting import stats
from longrope2.reporting.stats import (
    CONTRADICTED,
    REPRODUCED,
    UNRESOLVED,
    PairedDifference,
)
from longrope2.reporting.tables import TABLE2_BASELINES, Table

BASE = "base"


PAPER_RETENTION = 0.976  # Table 4: 61.7 / 63.2 (Phi3-mini); LLaMA3-8B 98.6 %


OUR_BASELINES = ("pi", "none")  # in this project's Table 2, not in the paper's


@dataclass(frozen=True)
class Scored:
    """One model's 0/1 outcomes on one evidence (one seed), by item id, and the file they came from."""

    ids: tuple[str, ...]
    correct: tuple[int, ...]
    source: str


Outcomes = Mapping[tuple[str, str], Mapping[int | None, Scored]]


class OutcomeMismatch(ValueError):
    """Two outcome files that should hold the same items do not; the message names both."""


def training_free(method: str) -> str:
    return f"{method} (training-free)"


@dataclass(frozen=True)
class Comparison:
    claim: str  # the group: "Table 2, fine-tuned", ...
    statement: str  # "longrope2 > pi"
    evidence: str  # the items: "NIAH 1k", ...
    verdict: str = UNRESOLVED  # set by `decide` for the comparisons with a result
    result: PairedDifference | None = None
    note: str = ""
    op: str = ">"  # ">" superiority | ">=" a - b >= result.null (a retention)


def _aligned(x: Scored, y: Scored) -> tuple[list[str], list[int], list[int]]:
    """Both models' outcomes on the same items, joined on ids (sorted by id)."""
    for s in (x, y):
        if len(s.ids) != len(s.correct) or len(set(s.ids)) != len(s.ids):
            raise OutcomeMismatch(f"{s.source}: {len(s.ids)} sample ids (distinct: {len(set(s.ids))}) for "
                                  f"{len(s.correct)} outcomes: every outcome needs its own id")
    if set(x.ids) != set(y.ids):
        only_x, only_y = sorted(set(x.ids) - set(y.ids)), sorted(set(y.ids) - set(x.ids))
        raise OutcomeMismatch(f"{x.source} and {y.source} should hold the same samples, but their ids disagree: "
                              f"{len(only_x)} only in the first (e.g. {only_x[:3]}), {len(only_y)} only in the second "
                              f"(e.g. {only_y[:3]}); rerun the stale evaluation")
    a, b = dict(zip(x.ids, x.correct)), dict(zip(y.ids, y.correct))
    ids = sorted(a)
    return ids, [a[i] for i in ids], [b[i] for i in ids]


def paired(outcomes: Outcomes, a: str, b: str, evidence: str, null: float = 0.0) -> PairedDifference | None:
    """a − b on one evidence, every seed paired on item ids; None when either model has no outcomes on it."""
    xs, ys = outcomes.get((a, evidence)), outcomes.get((b, evidence))
    if not xs or not ys:
        return None
    seeds = sorted(k for k in set(xs) | set(ys) if k is not None)
    pairs, item_sets = [], []
    for k in seeds or [None]:
        x, y = xs.get(k, xs.get(None)), ys.get(k, ys.get(None))
        if x is None or y is None:
            raise OutcomeMismatch(f"{evidence}: {a if x is None else b} has no outcomes for seed {k} "
                                  f"(the other has: {(y or x).source})")
        ids, xa, ya = _aligned(x, y)
        pairs.append((xa, ya))
        item_sets.append(ids)
    shared = all(ids == item_sets[0] for ids in item_sets)
    return stats.replicated_difference(pairs, shared_items=shared, null=null)


def compare(outcomes: Outcomes, claim: str, a: str, b: str, evidence: str, label_a: str | None = None,
            label_b: str | None = None) -> Comparison | None:
    """One paired superiority comparison "a > b" on one evidence; None when either model has no outcomes on it."""
    result = paired(outcomes, a, b, evidence)
    if result is None:
        return None
    return Comparison(claim, f"{label_a or a} > {label_b or b}", evidence, result=result)


def paper_table2_leads(table2: Mapping[str, Mapping[str, Mapping[Any, float]]],
                       target_len: int = 131072) -> dict[Fraction, tuple[str, ...]]:
    """length / L -> the Table 2 baselines LongRoPE2 outperforms at that ratio in EVERY one of the paper's models
    (table2: model -> method -> length -> RULER average; the paper's L is 128k for both)."""
    leads: dict[Fraction, tuple[str, ...]] = {}
    lengths = sorted({int(n) for by_method in table2.values() for scores in by_method.values() for n in scores})
    for n in lengths:
        beaten = tuple(m for m in TABLE2_BASELINES if all(
            float(t["longrope2"][_key(t["longrope2"], n)]) > float(t[m][_key(t[m], n)]) for t in table2.values()))
        leads[Fraction(n, target_len)] = beaten
    return leads


def _key(scores: Mapping[Any, float], n: int) -> Any:
    return n if n in scores else str(n)


def table2(outcomes: Outcomes, methods: Sequence[str], at: Sequence[tuple[str, Sequence[str]]], claim: str,
           before_tuning: bool = False, suggestion: str = "") -> list[Comparison]:
    """LongRoPE2 > each baseline of `at` = [(evidence, baselines)], on each evidence. before_tuning: the methods'
    training-free variants (none before tuning is the base). A baseline this experiment does not run, or an
    evidence without outcomes, is an unresolved comparison that says so."""
    def variant(m: str) -> str:
        return (BASE if m == "none" else training_free(m)) if before_tuning else m

    out = []
    for evidence, baselines in at:
        for b in baselines:
            if "longrope2" not in methods or b not in methods:
                missing = "longrope2" if "longrope2" not in methods else b
                out.append(Comparison(claim, f"longrope2 > {b}", evidence,
                                      note=f"{missing} not run by this experiment{suggestion}"))
                continue
            c = compare(outcomes, claim, variant("longrope2"), variant(b), evidence, "longrope2", b)
            out.append(c or Comparison(claim, f"longrope2 > {b}", evidence, note="no outcomes on these samples"))
    return out


def retention(outcomes: Outcomes, methods: Sequence[str], evidences: Sequence[str]) -> list[Comparison]:
    """Table 4 on short (within L_train) items: LongRoPE2 loses at most 1 - PAPER_RETENTION of the base's score,
    and outperforms LongRoPE, NTK and YaRN there."""
    # two statements of Table 4, each its own family (Holm within each)
    claim, ahead, out = "Table 4, short-context retention", "Table 4, LongRoPE2 outperforms on short tasks", []
    if "longrope2" not in methods:
        return out
    for evidence in evidences:
        base = outcomes.get((BASE, evidence))
        if base:
            scored = list(base.values())
            base_score = sum(sum(s.correct) for s in scored) / sum(len(s.correct) for s in scored)
            bound = -(1 - PAPER_RETENTION) * base_score
            result = paired(outcomes, "longrope2", BASE, evidence, null=bound)
            if result is not None:
                out.append(Comparison(claim, f"longrope2 − base ≥ {bound:+.3f} (retention ≥ {PAPER_RETENTION:.1%})",
                                      evidence, result=result, op=">="))
    for other in TABLE2_BASELINES:
        for evidence in evidences:
            if other in methods:
                c = compare(outcomes, ahead, "longrope2", other, evidence)
                if c is not None:
                    out.append(c)
    return out


# Ablations: (table, claim, a, b); a > b on the long evidence (and the short one for Table 7).
ABLATION_CLAIMS: tuple[tuple[str, str, str, str], ...] = (
    ("5", "Table 5, NTK / YaRN at the searched critical dim", "ntk_rcd", "ntk"),
    ("5", "Table 5, NTK / YaRN at the searched critical dim", "yarn_rcd", "yarn"),
    ("6", "Table 6, needle-driven vs plain-PPL search", "longrope2", "longrope2_plain_ppl"),
    ("7", "Table 7, mixed context window training", "longrope2", "longrope2_no_mixed"),
    ("10", "Table 10, search from the critical dim vs all dims", "longrope2", "longrope2_all_dims"),
)


def ablations(outcomes: Outcomes, methods: Sequence[str], long_evidence: str, short_evidence: str,
              suggestion: str) -> list[Comparison]:
    """Each ablation claim, on the target-length evidence (Table 7: and the short one); a claim whose methods
    this experiment does not run is unresolved, with `suggestion` (the experiment that runs it)."""
    out = []
    for table, claim, a, b in ABLATION_CLAIMS:
        if a not in methods or b not in methods:
            out.append(Comparison(claim, f"{a} > {b}", "—", note=f"not run by this experiment ({suggestion})"))
            continue
        for evidence in (long_evidence, short_evidence) if table == "7" else (long_evidence,):
            c = compare(outcomes, claim, a, b, evidence)
            if c is not None:
                out.append(c)
    return out


def critical_dim(search_results: Sequence[Mapping[str, Any]]) -> list[Comparison]:
    """The critical-dim finding, once per seed's longrope2 search: c <= d_tcd; every λ_i for i >= c at least s (the
    search's bound is inclusive: a tail value of exactly s is in the space)."""
    if not search_results:
        return []
    claim = "§3, critical dimension"
    below = [int(r["critical_dim"]) <= int(r["d_tcd"]) for r in search_results]
    above = [min(r["long_factor"][int(r["critical_dim"]):], default=float("inf")) >= float(r["s"]) * (1 - 1e-12)
             for r in search_results]
    detail = "; ".join(f"c = {r['critical_dim']}, d_tcd = {r['d_tcd']}, min λ from c = "
                       f"{min(r['long_factor'][int(r['critical_dim']):], default=float('nan')):.2f}, s = {r['s']:g}"
                       for r in search_results)
    n = len(search_results)
    return [Comparison(claim, "searched c ≤ d_tcd", f"{n} search(es)", stats.classify_seeds(below), None,
                       f"{sum(below)} of {n} seeds: {detail}"),
            Comparison(claim, "λ_i ≥ s for every i ≥ c", f"{n} search(es)", stats.classify_seeds(above), None,
                       f"{sum(above)} of {n} seeds")]


def decide(comparisons: Sequence[Comparison]) -> list[Comparison]:
    """Holm-adjust the p-values within each claim and classify every comparison that has a result (the others
    keep their verdict)."""
    groups: dict[str, list[int]] = {}
    for i, c in enumerate(comparisons):
        if c.result is not None:
            groups.setdefault(c.claim, []).append(i)
    out = list(comparisons)
    for indices in groups.values():
        adjusted = stats.adjust([comparisons[i].result for i in indices])  # type: ignore[misc]
        for i, r in zip(indices, adjusted):
            out[i] = replace(comparisons[i], result=r, verdict=stats.classify(r, comparisons[i].op))
    return out


def _note(c: Comparison) -> str | None:
    """The comparison's note; an unresolved one whose interval is wider than ±RESOLVABLE says so."""
    r, notes = c.result, [c.note] if c.note else []
    if r is not None and c.verdict == UNRESOLVED and r.discordant == 0 and c.op == ">":
        notes.append("no discordant sample: identical outcomes tell nothing")
    elif r is not None and c.verdict == UNRESOLVED and not r.resolves:
        notes.append(f"interval ±{r.half_width:.3f}: these samples cannot resolve a {stats.RESOLVABLE} difference")
    return "; ".join(notes) or None


INTERVALS = {
    "score": "one seed: Tango's score interval over the samples; McNemar's exact p (the interval covers the "
             "samples only, not training's seed-to-seed variation)",
    "t": "one seed, non-binary outcomes: a paired t interval",
    "crossed": "seeds sharing the samples: a t interval with the samples' and the seeds' variance components "
               "(each sample and each seed counted once)",
    "nested": "seeds with their own samples: a t interval on the seeds' paired differences (S − 1 df)",
}


def detail_table(comparisons: Sequence[Comparison]) -> Table:
    rows = []
    for c in comparisons:
        r = c.result
        interval = None if r is None else f"{r.diff:+.3f} [{r.low:+.3f}, {r.high:+.3f}]"
        rows.append([c.claim, c.statement, c.evidence, None if r is None else r.n, None if r is None else r.seeds,
                     interval, None if r is None else f"{r.a_only}/{r.b_only}",
                     None if r is None else f"{r.p_value:.3g}", None if r is None else f"{r.p:.3g}",
                     None if r is None or c.op != ">" else ("yes" if stats.noninferior(r) else "no"),
                     c.verdict, _note(c)])
    kinds = sorted({c.result.interval for c in comparisons if c.result is not None})
    notes = [
        "Every comparison is paired: both models scored on the same samples, joined by sample id; each sample and "
        "each seed counted once. Difference in exact match a − b with its 95 % interval; a/b only: samples that a "
        "(b) got right more often; n: samples; p: two-sided, against 0 (a retention: against its bound); "
        "p (Holm): adjusted within the claim.",
        *(f"Intervals: {INTERVALS[k]}." for k in kinds),
        "'a > b' (the paper's 'outperforms') is reproduced when the interval lies above 0 and p (Holm) < 0.05, "
        "contradicted when it lies below 0 and p (Holm) < 0.05, otherwise unresolved (always with no discordant "
        "sample). A retention 'a − b ≥ bound' likewise against its bound.",
        f"≥ −{stats.RESOLVABLE} (ours): whether a is no worse than b by {stats.RESOLVABLE} (the interval's low end "
        "above it); shown beside the superiority verdict, never counted as reproducing it.",
    ]
    return Table("claims_detail", "The paper's claims, comparison by comparison",
                 ["claim", "comparison", "evidence", "n", "seeds", "a − b [95 % CI]", "a/b only", "p", "p (Holm)",
                  f"≥ −{stats.RESOLVABLE} (ours)", "result", "note"], rows, notes)


def summary_table(comparisons: Sequence[Comparison]) -> Table:
    """One row per claim: how many of its comparisons each verdict got."""
    groups: dict[str, list[Comparison]] = {}
    for c in comparisons:
        groups.setdefault(c.claim, []).append(c)
    rows = []
    for claim, cs in groups.items():
        counts = {v: sum(c.verdict == v for c in cs) for v in (REPRODUCED, CONTRADICTED, UNRESOLVED)}
        verdict = (CONTRADICTED if counts[CONTRADICTED] else REPRODUCED if counts[REPRODUCED] == len(cs)
                   else UNRESOLVED)
        rows.append([claim, len(cs), counts[REPRODUCED], counts[CONTRADICTED], counts[UNRESOLVED], verdict])
    return Table("claims", "The paper's claims in this run",
                 ["claim", "comparisons", REPRODUCED, CONTRADICTED, UNRESOLVED, "claim as a whole"], rows,
                 ["A claim as a whole: contradicted if any comparison is, reproduced if all are, else unresolved; "
                  "p-values are Holm-adjusted within each claim, so 'contradicted if any' holds its 5 % level "
                  "(claims_detail.md has every comparison with its interval). '(our addition)': not a claim of the "
                  "paper."])

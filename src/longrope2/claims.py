"""The paper's claims a run can test, each classified reproduced / contradicted / unresolved by a paired interval.

Pure functions of per-sample outcomes (stats.py) and search results; no I/O. An evidence is one set of samples
that every compared model was scored on (e.g. "NIAH 1k": the needle grid's samples at 1024 tokens, pooled over
seeds); outcomes[(variant, evidence)] is the 0/1 vector of one variant on it. Variants: "base" (the original
model), a method (fine-tuned), "<method> (training-free)" (its factors on the base, not fine-tuned).

Claims (LongRoPE2, arXiv 2502.20082):
- Table 2: LongRoPE2 >= LongRoPE, NTK, YaRN > PI, none, at the target length and beyond it (fine-tuned; the
  same ordering before fine-tuning is this project's addition, not a claim of the paper);
- Table 4: LongRoPE2 keeps >= 97.6 % of the base's short score (the paper's lower retention, Phi3-mini) and
  more than LongRoPE, NTK and YaRN keep;
- Tables 5, 6, 7, 10: NTK / YaRN at the searched critical dim > at d_tcd; needle-driven > plain-PPL search;
  mixed-window > long-only training (long and short); search from the critical dim > all dims;
- the critical-dim finding (§3): the searched critical dim c <= d_tcd, and every factor from c on > s.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from longrope2 import stats
from longrope2.stats import CONTRADICTED, REPRODUCED, UNRESOLVED, PairedDifference
from longrope2.tables import PAPER_ORDER, Table

BASE = "base"
PAPER_RETENTION = 0.976  # Table 4: 61.7 / 63.2 (Phi3-mini); LLaMA3-8B 98.6 %

Outcomes = Mapping[tuple[str, str], Sequence[int]]


def training_free(method: str) -> str:
    return f"{method} (training-free)"


@dataclass(frozen=True)
class Comparison:
    claim: str  # the group: "Table 2, fine-tuned, at L", ...
    statement: str  # "longrope2 > pi"
    evidence: str  # the samples: "NIAH 1k", ...
    verdict: str
    result: PairedDifference | None = None
    note: str = ""


def compare(outcomes: Outcomes, claim: str, a: str, op: str, b: str, evidence: str, label_a: str | None = None,
            label_b: str | None = None) -> Comparison | None:
    """One paired comparison "a op b" on one evidence; None when either model has no outcomes on it."""
    x, y = outcomes.get((a, evidence)), outcomes.get((b, evidence))
    if x is None or y is None:
        return None
    result = stats.paired_difference(x, y)
    sign = "≥" if op == ">=" else ">"
    return Comparison(claim, f"{label_a or a} {sign} {label_b or b}", evidence, stats.classify(result, op), result)


def table2(outcomes: Outcomes, methods: Sequence[str], evidences: Sequence[str], claim: str,
           before_tuning: bool = False) -> list[Comparison]:
    """The Table 2 ordering (tables.PAPER_ORDER) among the methods that ran, on each evidence. before_tuning:
    the methods' training-free variants (none before tuning is the base)."""
    def variant(m: str) -> str:
        return (BASE if m == "none" else training_free(m)) if before_tuning else m

    out = []
    for a, op, b in PAPER_ORDER:
        if a in methods and b in methods:
            for evidence in evidences:
                c = compare(outcomes, claim, variant(a), op, variant(b), evidence, a, b)
                if c is not None:
                    out.append(c)
    return out


def retention(outcomes: Outcomes, methods: Sequence[str], evidences: Sequence[str]) -> list[Comparison]:
    """Table 4 on short (within L_train) samples: LongRoPE2 loses at most 1 - PAPER_RETENTION of the base's
    score, and keeps more than LongRoPE, NTK and YaRN."""
    claim, out = "Table 4, short-context retention", []
    for evidence in evidences:
        x, y = outcomes.get(("longrope2", evidence)), outcomes.get((BASE, evidence))
        if "longrope2" in methods and x is not None and y is not None:
            result = stats.paired_difference(x, y)
            bound = -(1 - PAPER_RETENTION) * sum(y) / len(y)
            out.append(Comparison(claim, f"longrope2 − base ≥ {bound:+.3f} (retention ≥ {PAPER_RETENTION:.1%})",
                                  evidence, stats.classify_at_least(result, bound), result))
    for other in ("longrope", "ntk", "yarn"):
        for evidence in evidences:
            if "longrope2" in methods and other in methods:
                c = compare(outcomes, claim, "longrope2", ">", other, evidence)
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
            out.append(Comparison(claim, f"{a} > {b}", "—", UNRESOLVED, None,
                                  f"not run by this experiment ({suggestion})"))
            continue
        for evidence in (long_evidence, short_evidence) if table == "7" else (long_evidence,):
            c = compare(outcomes, claim, a, ">", b, evidence)
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


VERDICT_COLOURS = {REPRODUCED: "tab:green", CONTRADICTED: "tab:red", UNRESOLVED: "tab:grey"}


def plot_intervals(comparisons: Sequence[Comparison], title: str) -> Any:
    """A forest plot: every comparison's difference a − b with its interval, coloured by verdict."""
    import matplotlib.pyplot as plt

    shown = [c for c in comparisons if c.result is not None]
    fig, ax = plt.subplots(figsize=(8, 0.28 * len(shown) + 1.2))
    for i, c in enumerate(shown):
        r, y = c.result, len(shown) - 1 - i
        ax.errorbar(r.diff, y, xerr=[[r.diff - r.low], [r.high - r.diff]], fmt="o", ms=3, capsize=2,
                    color=VERDICT_COLOURS[c.verdict])
        if i == 0 or shown[i - 1].claim != c.claim:  # the claim's name above its first comparison
            ax.axhline(y + 0.5, color="lightgrey", lw=0.6)
            ax.text(0.99, y + 0.35, c.claim, transform=ax.get_yaxis_transform(), ha="right", va="top",
                    fontsize=6, style="italic")
    ax.axvline(0, color="black", lw=0.8)
    ax.axvline(-stats.RESOLVABLE, color="grey", lw=0.6, ls=":")
    ax.set_yticks(range(len(shown)))
    ax.set_yticklabels([f"{c.statement} · {c.evidence}" for c in reversed(shown)], fontsize=6)
    ax.set_xlabel("exact match a − b (95 % paired bootstrap interval)")
    ax.set_title(title, fontsize=9)
    for verdict, colour in VERDICT_COLOURS.items():
        ax.plot([], [], "o", color=colour, label=verdict)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def _note(c: Comparison) -> str | None:
    """The comparison's note; an unresolved one whose interval is wider than ±RESOLVABLE says so."""
    r, notes = c.result, [c.note] if c.note else []
    if r is not None and c.verdict == UNRESOLVED and not r.resolves:
        notes.append(f"interval ±{r.half_width:.3f}: these samples cannot resolve a {stats.RESOLVABLE} difference")
    return "; ".join(notes) or None


def detail_table(comparisons: Sequence[Comparison]) -> Table:
    rows = []
    for c in comparisons:
        r = c.result
        interval = None if r is None else f"{r.diff:+.3f} [{r.low:+.3f}, {r.high:+.3f}]"
        rows.append([c.claim, c.statement, c.evidence, None if r is None else r.n, interval,
                     None if r is None else f"{r.a_only}/{r.b_only}", None if r is None else f"{r.p_value:.3g}",
                     c.verdict, _note(c)])
    notes = [
        "Every comparison is paired: both models scored on the same samples (pooled over seeds). Difference in "
        "exact match a − b with its 95 % paired bootstrap interval; a/b only: samples only a (only b) got right; "
        "p: McNemar's exact test.",
        "'a > b' is reproduced when the interval lies above 0 and p < 0.05, contradicted when it lies below 0 and "
        f"p < 0.05; 'a ≥ b' is reproduced when the interval lies above −{stats.RESOLVABLE}, contradicted as 'a > b'; "
        "otherwise unresolved.",
    ]
    return Table("claims_detail", "The paper's claims, comparison by comparison",
                 ["claim", "comparison", "evidence", "n", "a − b [95 % CI]", "a/b only", "p", "result", "note"],
                 rows, notes)


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
                 ["A claim as a whole: contradicted if any comparison is, reproduced if all are, else unresolved "
                  "(claims_detail.md has every comparison with its interval)."])

"""The paper's table shapes built from evaluation results, rendered as Markdown, CSV and LaTeX.

Pure functions of the `evaluate` stage's result dictionaries (``<suite>.json``; with several seeds, their
mean over seeds, see `mean_over_seeds`) and the paper's numbers (``paper_tables.yaml``, docs/method.md §8); no I/O.
"""

from __future__ import annotations

import csv
import io
import math
import re
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

MISSING = "—"


@dataclass(frozen=True)
class Table:
    name: str  # file stem: table2_ruler, ...
    title: str
    header: list[str]
    rows: list[list[Any]]
    notes: list[str] = field(default_factory=list)


class SeedMean(float):
    """A metric's mean over seeds (the float's value) with its standard deviation over them (n - 1)."""

    std: float
    n: int

    def __new__(cls, mean: float, std: float, n: int) -> SeedMean:
        obj = super().__new__(cls, mean)
        obj.std, obj.n = float(std), int(n)
        return obj

    def __mul__(self, k: float) -> SeedMean:  # a unit change (fraction x 100) keeps the spread
        return SeedMean(float(self) * k, self.std * abs(k), self.n)

    __rmul__ = __mul__

    def __repr__(self) -> str:
        return f"SeedMean({float(self)!r}, std={self.std!r}, n={self.n})"


def mean_over_seeds(results: Sequence[Any]) -> Any:
    """One result from the same result of several seeds: every number becomes its SeedMean over the seeds
    that have it (dict keys and equal-length lists matched position by position); anything else (text,
    flags) is the first seed's. One seed: that result, unchanged."""
    if len(results) == 1:
        return results[0]
    first = results[0]
    if isinstance(first, dict):
        keys = list(dict.fromkeys(k for r in results if isinstance(r, dict) for k in r))
        return {k: mean_over_seeds([r[k] for r in results if isinstance(r, dict) and k in r]) for k in keys}
    if isinstance(first, list) and all(isinstance(r, list) and len(r) == len(first) for r in results):
        return [mean_over_seeds([r[i] for r in results]) for i in range(len(first))]
    if all(isinstance(r, int) and not isinstance(r, bool) and r == first for r in results):
        return first  # counts, lengths: the same for every seed
    numbers = [float(r) for r in results
               if isinstance(r, (int, float)) and not isinstance(r, bool) and not math.isnan(r)]
    if len(numbers) < 2:
        return numbers[0] if numbers else first
    return SeedMean(statistics.fmean(numbers), statistics.stdev(numbers), len(numbers))


def fmt(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    if isinstance(value, SeedMean):
        return f"{float(value):.{digits}f} ± {value.std:.{digits}f}"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def to_markdown(table: Table) -> str:
    lines = [f"**{table.title}**", ""]
    if table.rows:
        lines += ["| " + " | ".join(table.header) + " |", "|" + "|".join("---" for _ in table.header) + "|"]
        lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in table.rows]
        lines += [""]
    lines += [f"- {note}" for note in table.notes]
    return "\n".join(lines).rstrip() + "\n"


def to_csv(table: Table) -> str:
    """One column per header; a column with means over seeds is followed by its '<name> std' column."""
    spread = [any(isinstance(row[i], SeedMean) for row in table.rows) for i in range(len(table.header))]
    header = [h for i, h in enumerate(table.header) for h in ([h, f"{h} std"] if spread[i] else [h])]

    def cells(row: Sequence[Any]) -> list[Any]:
        out: list[Any] = []
        for i, v in enumerate(row):
            out.append("" if v is None else float(v) if isinstance(v, SeedMean) else v)
            if spread[i]:
                out.append(v.std if isinstance(v, SeedMean) else "")
        return out

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([cells(row) for row in table.rows])
    return buf.getvalue()


def _tex(text: str) -> str:
    for char, escaped in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#")):
        text = text.replace(char, escaped)
    return text


def to_latex(table: Table) -> str:
    cols = "l" + "r" * (len(table.header) - 1)
    lines = [r"\begin{table}[t]", r"\centering", rf"\caption{{{_tex(table.title)}}}",
             rf"\begin{{tabular}}{{{cols}}}", r"\toprule", " & ".join(_tex(h) for h in table.header) + r" \\",
             r"\midrule"]
    lines += [" & ".join(_tex(fmt(v)).replace("±", r"$\pm$") for v in row) + r" \\" for row in table.rows]
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def _length_label(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def _diff(ours: float | None, paper: float | None) -> float | None:
    return None if ours is None or paper is None else round(ours - paper, 2)


def ruler_by_length(results: Mapping[str, Mapping[str, Any]], paper: Mapping[str, Mapping[str, float]] | None = None,
                    target_len: int | None = None) -> Table:
    """Table 2: the RULER average per length, one row per variant; the paper's rows (same lengths) and
    ours minus the paper's for a variant named like a paper method; with target_len, the paper's
    ordering of the methods checked at that length."""
    lengths = sorted({int(n) for r in results.values() for n in r["lengths"]})
    rows: list[list[Any]] = []
    for variant, result in results.items():
        rows.append([variant, *[result["average"].get(str(n)) for n in lengths]])
    notes = []
    if paper:
        for method, by_length in paper.items():
            rows.append([f"paper: {method}", *[by_length.get(str(n)) for n in lengths]])
            if method in results:
                rows.append([f"{method} − paper",
                             *[_diff(results[method]["average"].get(str(n)), by_length.get(str(n))) for n in lengths]])
        notes.append("Paper rows: LongRoPE2 (arXiv 2502.20082) Table 2.")
    if target_len is not None:
        notes += ordering_notes({v: r["average"].get(str(target_len)) for v, r in results.items()},
                                f"RULER average at L = {target_len}")
    effective = {v: r.get("effective_length") for v, r in results.items()}
    notes.append("Effective length (average above the threshold up to that length): "
                 + ", ".join(f"{v} {fmt(e)}" for v, e in effective.items()) + ".")
    return Table("table2_ruler", "RULER average by length (Table 2)", ["model", *map(_length_label, lengths)],
                 rows, notes)


def ruler_per_task(variant: str, result: Mapping[str, Any],
                   paper: Mapping[str, Mapping[str, float]] | None = None) -> Table:
    """Tables 8-9: RULER per task and length for one variant (— where a task has no data at a length);
    with the paper's per-task numbers for the same lengths beside ours."""
    lengths = [int(n) for n in result["lengths"]]
    header = ["task", *map(_length_label, lengths)]
    if paper:
        header += [f"paper {_length_label(n)}" for n in lengths]
    rows = []
    for task in result["tasks"]:
        row = [task, *[result["table"].get(task, {}).get(str(n)) for n in lengths]]
        if paper:
            row += [paper.get(str(n), {}).get(task) for n in lengths]
        rows.append(row)
    avg = ["average", *[result["average"].get(str(n)) for n in lengths]]
    if paper:
        avg += [paper.get(str(n), {}).get("avg") for n in lengths]
    rows.append(avg)
    notes = [f"{task} at {', '.join(map(_length_label, map(int, per)))}: no sample fits (see ruler.json)"
             for task, per in result.get("unavailable", {}).items()]
    stem = re.sub(r"[^\w.-]+", "_", variant).strip("_")  # a file name: "yarn (training-free)" -> yarn_training-free
    return Table(f"tables8_9_ruler_{stem}", f"RULER per task, {variant} (Tables 8-9)", header, rows, notes)


def short_tasks(results: Mapping[str, Mapping[str, Any]],
                paper: Mapping[str, Mapping[str, float]] | None = None) -> Table:
    """Table 4: the short tasks, their average and retention (average over the base's), per variant.
    Accuracies (lm-eval's fractions) × 100 as in the paper; perplexities as they are."""
    tasks = list(dict.fromkeys(t for r in results.values() for t in r["tasks"]))
    header = ["model", "avg", *tasks, "retention"]

    def percent(value: float | None, metric: str = "acc") -> float | None:
        if value is None or any(x in metric for x in ("perplexity", "bits_per_byte")):
            return value
        return 100.0 * value

    rows = []
    for variant, result in results.items():
        values = [percent(result["tasks"][t]["value"], result["tasks"][t]["metric"]) if t in result["tasks"] else None
                  for t in tasks]
        rows.append([variant, percent(result.get("average")), *values, result.get("retention")])
    notes = []
    if paper:
        keys = {t: t.split("_mc")[0] for t in tasks}  # truthfulqa_mc2 -> truthfulqa
        for method, values in paper.items():
            rows.append([f"paper: {method}", values.get("avg"), *[values.get(keys[t]) for t in tasks], None])
        notes.append("Paper rows: LongRoPE2 (arXiv 2502.20082) Table 4.")
    return Table("table4_short", "Short tasks and retention (Table 4)", header, rows, notes)


def _niah_samples(result: Mapping[str, Any], length: int) -> int:
    """Samples behind a NIAH mean at one length: the runs of every depth (rows) at that length (column)."""
    lengths = [int(n) for n in result["lengths"]]
    if length not in lengths or "runs" not in result:
        return 0
    return sum(row[lengths.index(length)] for row in result["runs"])


def niah_by_length(results: Mapping[str, Mapping[str, Any]], target_len: int | None = None) -> Table:
    """Needle-in-a-haystack exact match per length (mean over depths), one row per variant; with
    target_len, the paper's Table 2 ordering checked at that length."""
    lengths = sorted({int(n) for r in results.values() for n in r["lengths"]})
    rows = [[v, *[r["mean_by_length"].get(str(n)) for n in lengths]] for v, r in results.items()]
    notes = []
    if target_len is not None:
        notes = ordering_notes({v: r["mean_by_length"].get(str(target_len)) for v, r in results.items()},
                               f"needle exact match at L = {target_len}",
                               {v: _niah_samples(r, target_len) for v, r in results.items()})
    title = "Needle in a haystack: exact match by length (mean over depths)"
    if target_len is not None:
        title += ", this experiment's Table 2"
    return Table("niah", title, ["model", *map(_length_label, lengths)], rows, notes)


def perplexity_by_length(results: Mapping[str, Mapping[str, Any]]) -> Table:
    lengths = sorted({int(n) for r in results.values() for n in r["by_length"]})
    rows = [[v, *[r["by_length"].get(str(n), {}).get("ppl") for n in lengths]] for v, r in results.items()]
    return Table("perplexity", "Perplexity of held-out documents by window length",
                 ["model", *map(_length_label, lengths)], rows)


def longbench(results: Mapping[str, Mapping[str, Any]]) -> Table:
    tasks = list(dict.fromkeys(t for r in results.values() for t in r.get("tasks", {})))
    rows, notes = [], []
    for variant, result in results.items():
        if result.get("skipped"):
            notes.append(f"{variant}: {result['skipped']}")
            continue
        rows.append([variant, *[result["tasks"].get(t, {}).get("score") for t in tasks], result.get("average")])
    return Table("table3_longbench", "LongBench / InfiniteBench (Table 3)", ["model", *tasks, "avg"], rows, notes)


# The paper's Table 2 rows besides LongRoPE2; its claim: LongRoPE2 outperforms each (superiority).
TABLE2_BASELINES: tuple[str, ...] = ("longrope", "ntk", "yarn")


def ordering_notes(scores: Mapping[str, float | None], where: str,
                   samples: Mapping[str, int] | None = None) -> list[str]:
    """The paper's Table 2 claims these scores can test, each kept or contradicted (never hidden).

    samples: for scores that are fractions of samples (exact match), their counts per seed. A claim whose
    two scores differ by no more than two standard errors of the difference is marked as within the
    noise: the binomial error of the samples (pooled over seeds) plus, for means over seeds, the seeds'
    spread (std / sqrt(seeds))."""

    def variance(score: float, name: str) -> float:
        seeds = score.n if isinstance(score, SeedMean) else 1
        var = (score.std ** 2 / seeds) if isinstance(score, SeedMean) else 0.0
        if samples and samples.get(name):
            var += float(score) * (1 - float(score)) / (samples[name] * seeds)
        return var

    kept, broken = [], []
    a = "longrope2"
    for b in TABLE2_BASELINES:
        x, y = scores.get(a), scores.get(b)
        if x is None or y is None:
            continue
        holds = x > y
        detail = f"{fmt(x)} vs {fmt(y)}"
        spread = variance(x, a) + variance(y, b)
        if spread > 0 and abs(x - y) <= 2 * math.sqrt(spread):
            detail += f", within the noise: 2 SE = {2 * math.sqrt(spread):.2f}"
        claim = f"{a} > {b} ({detail})"
        (kept if holds else broken).append(claim)
    notes = []
    if kept:
        notes.append(f"As in the paper, {where}: " + "; ".join(kept) + ".")
    if broken:
        notes.append(f"CONTRADICTS the paper, {where}: " + "; ".join(broken) + ".")
    return notes


ABLATIONS: dict[str, str] = {
    "5": "NTK and YaRN re-derived at the searched critical dim (Table 5)",
    "6": "Search fitness: needle-driven vs plain perplexity (Table 6)",
    "7": "Mixed context window training (Table 7)",
    "10": "Searched dims: from the critical dim vs all (Table 10)",
}


def ablation(table_id: str, methods: Sequence[str], columns: Mapping[str, Mapping[str, float | None]],
             paper: Mapping[str, Mapping[str, float]] | None = None, paper_key: str | None = None) -> Table:
    """An ablation table: one row per method, one column per metric (name -> method -> value); the paper's
    number for each method at paper_key (e.g. "131072") beside ours."""
    header = ["method", *columns]
    if paper:
        header.append(f"paper RULER {_length_label(int(paper_key))}" if paper_key else "paper")
    rows = []
    for m in methods:
        row: list[Any] = [m, *[col.get(m) for col in columns.values()]]
        if paper:
            row.append(paper.get(m, {}).get(paper_key) if paper_key else None)
        rows.append(row)
    notes = ["Paper column: LongRoPE2 (arXiv 2502.20082)."] if paper else []
    return Table(f"table{table_id}_ablation", ABLATIONS[table_id], header, rows, notes)


def render_all(tables: Sequence[Table]) -> dict[str, str]:
    """file name -> text, for every table in every format."""
    files = {}
    for table in tables:
        files[f"{table.name}.md"] = to_markdown(table)
        files[f"{table.name}.csv"] = to_csv(table)
        files[f"{table.name}.tex"] = to_latex(table)
    return files


def length_depth_grid(cells: Sequence[Any], field: str) -> tuple[list[int], list[float], list[list[float | None]]]:
    """NIAH cells (anything with .length, .depth and the field) as (lengths ascending, depths ascending,
    values[depth row][length column]); None where no cell."""
    lengths = sorted({c.length for c in cells})
    depths = sorted({c.depth for c in cells})
    by_key = {(c.length, c.depth): c for c in cells}
    if len(by_key) != len(cells):
        raise ValueError("cells must hold each (length, depth) once")
    rows = [[(getattr(by_key[(L, d)], field) if (L, d) in by_key else None) for L in lengths] for d in depths]
    return lengths, depths, rows

"""Every figure of the pipeline, drawn from plain data (numbers, not files or models): matplotlib's Agg backend, set once here."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display: the one place the backend is set
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from longrope2.core.outputs import atomic_file  # noqa: E402
from longrope2.reporting.claims import Comparison  # noqa: E402
from longrope2.reporting.stats import CONTRADICTED, REPRODUCED, UNRESOLVED  # noqa: E402
from longrope2.reporting.tables import length_depth_grid  # noqa: E402


def save_figure(fig: Any, path: str | Path, dpi: int = 120) -> None:
    """Save a matplotlib figure as PNG atomically and close it."""
    fig.tight_layout()
    with atomic_file(path) as scratch:
        fig.savefig(scratch, dpi=dpi, format="png")
    plt.close(fig)


def plot_loss(history: list[dict[str, Any]], variant: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    steps = [h["step"] for h in history]
    for key, label in (("loss", "all rows"), ("short_loss", "short rows (short factors)"),
                       ("long_loss", "long rows (long factors)")):
        points = [(s, h[key]) for s, h in zip(steps, history, strict=True) if h[key] == h[key]]  # NaN: no such rows
        if points:
            ax.plot(*zip(*points, strict=True), label=label, lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("weighted token-mean NLL")
    ax.set_yscale("log")
    ax.set_title(f"Mixed context window fine-tuning: {variant}")
    ax.legend()
    save_figure(fig, path)


def plot_convergence(history: list[dict[str, Any]], fitness_name: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    runs = sorted({row["run"] for row in history})
    for r in runs:
        rows = [row for row in history if row["run"] == r]
        label = "" if len(runs) == 1 else f" (c = {rows[0]['c_lo']})"
        line, = ax.plot([x["iteration"] for x in rows], [x["best_fitness"] for x in rows], "o-", ms=3,
                        label=f"best{label}")
        ax.plot([x["iteration"] for x in rows], [x["median_fitness"] for x in rows], "--", color=line.get_color(),
                alpha=0.6, label=f"median{label}")
    ax.set_xlabel("iteration")
    ax.set_ylabel(fitness_name.replace("_", "-"))
    ax.set_yscale("log")
    ax.set_title("Search convergence")
    ax.legend(fontsize=7)
    save_figure(fig, path)


def plot_factors(curves: dict[str, list[float]], c: int, dims: dict[str, Any], s: float, path: Path) -> None:
    """λ per frequency pair per method with c, d_tcd, s and 2s marked (paper Figure 4 style)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, lam in curves.items():
        ax.plot(range(len(lam)), lam, "o-" if name == "searched" else "-", ms=3, lw=2 if name == "searched" else 1,
                label=name)
    ax.axhline(s, color="grey", ls="--", lw=0.8, label=f"s = {s:g}")
    ax.axhline(2 * s, color="grey", ls=":", lw=0.8, label=f"2s = {2 * s:g}")
    ax.axvline(c, color="tab:red", ls="--", lw=0.8, label=f"searched c = {c}")
    ax.axvline(dims["d_tcd"], color="black", ls=":", lw=0.8, label=f"$d_{{tcd}}$ = {dims['d_tcd']}")
    ax.set_xlabel("frequency pair i")
    ax.set_ylabel("rescaling factor $\\lambda_i$")
    ax.set_title("Rescaling factors")
    ax.legend(fontsize=7)
    save_figure(fig, path)


def plot_periods(summary: dict[str, Any], title: str, path: Path) -> None:
    """Log period per pair with L_train, L and the critical dimensions marked (paper Fig. 2 style)."""
    periods = summary["periods"]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.semilogy(range(len(periods)), periods, "o-", ms=3, color="tab:blue", label="period $T_i$")
    ax.axhline(summary["train_len"], color="tab:green", ls="--", label=f"$L_{{train}}$ = {summary['train_len']}")
    ax.axhline(summary["target_len"], color="tab:red", ls="--", label=f"$L$ = {summary['target_len']}")
    ax.axvline(summary["d_tcd"], color="black", ls=":", label=f"$d_{{tcd}}$ = {summary['d_tcd']}")
    ax.axvline(summary["d10_tcd"], color="grey", ls=":", label=f"$d^{{10}}_{{tcd}}$ = {summary['d10_tcd']}")
    ax.axvspan(summary["d10_tcd"], summary["d_tcd"], color="grey", alpha=0.12, label="search range of $d_{rcd}$")
    ax.set_xlabel("frequency pair i")
    ax.set_ylabel("period (tokens)")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left")
    save_figure(fig, path)


def _length_label(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def _x_position(lengths: Sequence[int], value: int) -> float:
    """Column coordinate of a length on the categorical x axis (log-interpolated between columns)."""
    if value <= lengths[0]:
        return 0.0 if value == lengths[0] else -0.5
    if value >= lengths[-1]:
        return float(len(lengths) - 1) if value == lengths[-1] else len(lengths) - 0.5
    for j in range(len(lengths) - 1):
        lo, hi = lengths[j], lengths[j + 1]
        if lo <= value <= hi:
            return j + (math.log(value) - math.log(lo)) / (math.log(hi) - math.log(lo))
    raise AssertionError("unreachable")


def plot_niah_heatmap(
    cells: Sequence[Any],  # evaluation.niah.NiahCell
    title: str,
    train_len: int | None = None,
    target_len: int | None = None,
) -> Any:
    """Heatmap of exact match: x = context length, y = needle depth (0 at the top), red (0) -> green (1).

    One image (``fig.axes[0].images[0]``) whose array is the exact-match grid of
    :func:`niah_table` (NaN where a cell is missing), each cell annotated with its value;
    dashed vertical markers at ``train_len`` / ``target_len`` (placed between columns by
    log-length when not a column). Agg canvas, no pyplot state; the figure is returned, not saved.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not cells:
        raise ValueError("plot_niah_heatmap needs at least one cell")
    lengths, depths, em = length_depth_grid(cells, "exact_match")
    grid = np.array([[np.nan if v is None else v for v in row] for row in em], dtype=float)  # (depths, lengths)

    fig = Figure(figsize=(max(4.0, 0.9 * len(lengths) + 2.5), max(3.0, 0.45 * len(depths) + 1.8)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(np.ma.masked_invalid(grid), cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto",
                      origin="upper", interpolation="nearest")
    for i in range(len(depths)):
        for j in range(len(lengths)):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7, color="black")
    ax.set_xticks(range(len(lengths)), [_length_label(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(title)
    for value, label, style in ((train_len, "train length", ":"), (target_len, "target length", "--")):
        if value is not None:
            ax.axvline(_x_position(lengths, int(value)), color="black", linestyle=style, linewidth=1.5,
                       label=f"{label} {_length_label(int(value))}")
    if train_len is not None or target_len is not None:
        ax.legend(loc="upper left", bbox_to_anchor=(0.0, -0.15), ncol=2, fontsize=7, frameon=False)
    fig.colorbar(image, ax=ax, label="exact match")
    fig.tight_layout()
    return fig


def plot_average_by_length(curves: Mapping[str, tuple[Sequence[int], Sequence[float | None]]], train_len: int,
                           target_len: int, title: str) -> Any:
    """RULER average against length, one curve per label ("paper: ..." curves dashed); a Figure."""

    matplotlib.use("Agg")
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label, (lengths, values) in curves.items():
        style = dict(ls="--", marker="x", alpha=0.6) if label.startswith("paper") else dict(ls="-", marker="o")
        ax.plot(list(lengths), [float("nan") if v is None else v for v in values], label=label, **style)
    ax.axvline(train_len, color="tab:green", ls=":", label="$L_{train}$")
    ax.axvline(target_len, color="tab:red", ls=":", label="$L$")
    ax.set_xscale("log", base=2)
    ax.set_ylim(0, 100)
    ax.set_xlabel("length (tokens)")
    ax.set_ylabel("RULER average")
    ax.set_title(title)
    ax.legend(fontsize=7)
    return fig


def plot_ruler_by_length(ruler_results: dict[str, dict[str, Any]], paper: dict[str, Any], cfg: DictConfig,
                         path: Path) -> None:
    curves = {}
    for variant, result in ruler_results.items():
        lengths = [int(n) for n in result["lengths"]]
        curves[variant] = (lengths, [result["average"].get(str(n)) for n in lengths])
    for method, by_length in (paper.get("table2") or {}).items():
        lengths = sorted(int(n) for n in by_length)
        curves[f"paper: {method}"] = (lengths, [by_length[str(n)] for n in lengths])
    fig = plot_average_by_length(curves, int(cfg.model.train_len), int(cfg.target_len),
                                       f"RULER average by length, {cfg.experiment_name}")
    save_figure(fig, path)


def plot_factors_by_method(curves: dict[str, list[list[float]]], s: float, title: str, path: Path) -> bool:
    """λ per frequency pair for every fine-tuned method (paper Figure 4 style): one line per method and seed
    (``curves``: method -> its seeds' long factors), a method's seeds in one colour. False when there is none."""
    if not curves:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for colour, (method, lams) in enumerate(curves.items()):
        for j, lam in enumerate(lams):
            ax.plot(range(len(lam)), lam, "o-" if method == "longrope2" else "-", ms=3, color=f"C{colour}",
                    alpha=1.0 if j == 0 else 0.5, label=method if j == 0 else None)
    ax.axhline(s, color="grey", ls="--", lw=0.8, label=f"s = {s:g}")
    ax.set_yscale("log")
    ax.set_xlabel("frequency pair i")
    ax.set_ylabel("rescaling factor $\\lambda_i$ (beyond $L_{train}$)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    save_figure(fig, path)
    return True


VERDICT_COLOURS = {REPRODUCED: "tab:green", CONTRADICTED: "tab:red", UNRESOLVED: "tab:grey"}


def plot_intervals(comparisons: Sequence[Comparison], title: str) -> Any:
    """A forest plot: every comparison's difference a − b with its interval, coloured by verdict."""
    shown = [c for c in comparisons if c.result is not None]
    fig, ax = plt.subplots(figsize=(8, 0.28 * len(shown) + 1.2))
    for i, c in enumerate(shown):
        r, y = c.result, len(shown) - 1 - i
        ax.errorbar(r.diff, y, xerr=[[r.diff - r.low], [r.high - r.diff]], fmt="o", ms=3, capsize=2,
                    color=VERDICT_COLOURS[c.verdict])
        if c.op == ">=":  # a retention is decided against its bound, not against 0
            ax.plot(r.null, y, "|", ms=8, color="black")
        if i == 0 or shown[i - 1].claim != c.claim:  # the claim's name above its first comparison
            ax.axhline(y + 0.5, color="lightgrey", lw=0.6)
            ax.text(0.99, y + 0.35, c.claim, transform=ax.get_yaxis_transform(), ha="right", va="top",
                    fontsize=6, style="italic")
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(range(len(shown)))
    ax.set_yticklabels([f"{c.statement} · {c.evidence}" for c in reversed(shown)], fontsize=6)
    ax.set_xlabel("exact match a − b, 95 % paired interval (|: a retention's bound)")
    ax.set_title(title, fontsize=9)
    for verdict, colour in VERDICT_COLOURS.items():
        ax.plot([], [], "o", color=colour, label=verdict)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig

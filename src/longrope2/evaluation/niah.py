"""Needle in a haystack: the grid (the paper's Figures 6-8): for every (context length, needle depth) cell,
   ``runs`` RULER-style samples (:mod:`longrope2.data.needles`) scored teacher-forced: exact match
   at the answer positions (argmax everywhere = what greedy decoding would output) and
   needle-PPL. :func:`niah_table` makes the JSON table, reporting.figures.plot_niah_heatmap the figure.

No file I/O; only answer positions go through the LM head (never an L x vocab logits tensor).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from longrope2.data.needles import NeedleSample, NeedleTemplate, build_needle_sample
from longrope2.lm.losses import needle_sample_losses, perplexity
from longrope2.reporting.tables import length_depth_grid


@dataclass(frozen=True)
class NiahCell:
    """Scores of one (length, depth) cell of the needle grid over ``runs`` samples."""

    length: int
    depth: float
    runs: int
    exact_match: float  # fraction of runs whose every answer token is the argmax
    needle_ppl: float  # exp(mean over runs of the mean answer-token NLL)
    correct: tuple[int, ...] = ()  # per run: 1 = exact match (paired comparisons across models)


def _haystack_streams(haystack_ids: Sequence[Tensor] | Tensor) -> list[Tensor]:
    """One (T,) tensor -> [it]; a sequence of (T_i,) tensors (or an (n, T) tensor) -> its rows."""
    if isinstance(haystack_ids, Tensor) and haystack_ids.ndim == 1:
        streams = [haystack_ids]
    else:
        streams = [torch.as_tensor(s) for s in haystack_ids]
    if not streams:
        raise ValueError("niah_samples needs at least one haystack token stream")
    for i, s in enumerate(streams):
        if s.ndim != 1:
            raise ValueError(f"haystack stream {i} must be 1-D token ids, got shape {tuple(s.shape)}")
    return streams


def _cell_rng(seed: int, length: int, depth: float, run: int) -> random.Random:
    """The rng of one run: a function of (seed, length, depth, run) only."""
    return random.Random(f"niah/{seed}/{length}/{depth!r}/{run}")


def _haystack_need(tokenizer: Any, length: int, template: NeedleTemplate, key: str, number: str) -> int:
    """Haystack tokens a sample of ``length`` tokens with this key/number holds (exact).

    Built on a dummy haystack of ``length`` tokens, so the count is needle.py's own.
    """
    dummy = torch.zeros(length, dtype=torch.long)
    probe = build_needle_sample(tokenizer, dummy, length, 0.0, random.Random(0), template,
                                key=key, number=number, start=0)
    return probe.haystack_tokens


def _draw_window(rng: random.Random, lengths: Sequence[int], need: int) -> tuple[int, int] | None:
    """(stream index, start), uniform over every window of ``need`` tokens inside one stream."""
    counts = [max(0, n - need + 1) for n in lengths]
    total = sum(counts)
    if total == 0:
        return None
    r = rng.randrange(total)
    for i, c in enumerate(counts):
        if r < c:
            return i, r
        r -= c
    raise AssertionError("unreachable")


def niah_samples(
    tokenizer: Any,
    haystack_ids: Sequence[torch.Tensor] | torch.Tensor,
    lengths: Sequence[int],
    depths: Sequence[float],
    runs: int,
    template: NeedleTemplate,
    seed: int,
) -> dict[tuple[int, float], list[NeedleSample]]:
    """``runs`` needle samples of exactly ``length`` tokens for every (length, depth) cell.

    Run k of a cell draws its key, number and haystack window from its own rng, seeded
    from (seed, length, depth, k): adding lengths or depths changes no other cell, and
    adding runs changes no earlier run. Numbers are distinct across the runs of a cell
    (redrawn from the run's rng on a collision, while the template has numbers to spare).

    ``haystack_ids``: one (T,) token stream or several (held-out books). A window lies
    inside one stream, drawn uniformly over all windows of all streams that are long
    enough; to let windows cross book boundaries (RULER's concatenated essays), pass one
    concatenated stream (e.g. :func:`longrope2.toy.data.encode_stream` of the books).
    Raises ValueError naming the length and the available tokens when no stream is long
    enough for a sample.
    """
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    if not lengths or not depths:
        raise ValueError("niah_samples needs at least one length and one depth")
    streams = _haystack_streams(haystack_ids)
    # Distinct numbers only while the template has enough of them (e.g. 1 digit: 9 numbers).
    n_numbers = 9 * math.perm(9, template.num_digits - 1) if template.distinct_digits \
        else 9 * 10 ** (template.num_digits - 1)
    distinct = runs <= n_numbers // 2

    return {(int(length), float(depth)): _niah_cell(tokenizer, streams, int(length), float(depth), runs, template,
                                                   seed, distinct)
            for length in lengths for depth in depths}


def _niah_cell(tokenizer: Any, streams: list[torch.Tensor], length: int, depth: float, runs: int,
               template: NeedleTemplate, seed: int, distinct: bool) -> list[NeedleSample]:
    """The runs of one (length, depth) cell, each from its own rng (see :func:`niah_samples`)."""
    stream_lens = [int(s.numel()) for s in streams]
    used: set[str] = set()
    cell: list[NeedleSample] = []
    for k in range(runs):
        rng = _cell_rng(seed, length, depth, k)
        key = rng.choice(template.keys)
        number = template.random_number(rng)
        while distinct and number in used:
            number = template.random_number(rng)
        used.add(number)
        try:
            need = _haystack_need(tokenizer, length, template, key, number)
        except ValueError as err:
            raise ValueError(f"niah cell (length={length}, depth={depth}), run {k}: {err}") from err
        where = _draw_window(rng, stream_lens, need)
        if where is None:
            raise ValueError(
                f"haystack too short for length {length}: a sample needs {need} haystack tokens in one "
                f"stream, but the longest of the {len(streams)} haystack stream(s) has {max(stream_lens)} "
                f"tokens ({sum(stream_lens)} in all); pass longer held-out text, one concatenated "
                f"stream, or drop this length")
        i, start = where
        cell.append(build_needle_sample(tokenizer, streams[i], length, depth, rng, template,
                                        key=key, number=number, start=start))
    return cell


def niah_grid(
    model: nn.Module,
    samples: dict[tuple[int, float], list[NeedleSample]],
    batch_size: int = 1,
    progress: bool = True,
) -> list[NiahCell]:
    """Teacher-forced scores of every cell (sorted by length, then depth) with needle.py's scoring.

    exact_match: fraction of runs whose every answer token is the argmax given the true
    prefix, i.e. exactly what greedy decoding of the answer would output. needle_ppl:
    exp of the mean over runs of the mean answer-token NLL (:func:`longrope2.lm.losses.needle_scores`).
    """
    cells: list[NiahCell] = []
    for length, depth in tqdm(sorted(samples), desc="needle grid", disable=not progress):
        cell = samples[(length, depth)]
        if not cell:
            raise ValueError(f"niah cell (length={length}, depth={depth}) has no samples")
        nll, em = needle_sample_losses(model, cell, batch_size)
        cells.append(NiahCell(length=int(length), depth=float(depth), runs=len(cell),
                              exact_match=sum(em) / len(em), needle_ppl=perplexity(nll),
                              correct=tuple(int(x) for x in em)))
    return cells


def _json_float(x: float | None) -> float | None:
    """Strict JSON has no NaN / Infinity: those become None."""
    return None if x is None or not math.isfinite(x) else float(x)


def niah_table(cells: Sequence[NiahCell]) -> dict:
    """JSON-ready table: rows are depths (ascending), columns lengths (ascending).

    {"lengths": [L...], "depths": [d...], "runs": [[...]], "exact_match": [[...] per depth row],
    "needle_ppl": [[...]], "mean_by_length": {"L": mean exact match over the depths},
    "correct": {"L": [0/1 per sample, depths ascending, runs in order]},
    "ids": {"L": ["niah/<L>/<depth>/<run>" per sample, the same order]} (paired comparisons join on ids)}.
    Missing cells and non-finite values are None; mean_by_length keys are strings (JSON).
    """
    if not cells:
        raise ValueError("niah_table needs at least one cell")
    lengths, depths, em = length_depth_grid(cells, "exact_match")
    _, _, ppl = length_depth_grid(cells, "needle_ppl")
    _, _, runs = length_depth_grid(cells, "runs")
    mean_by_length: dict[str, float | None] = {}
    for j, L in enumerate(lengths):
        col = [row[j] for row in em if row[j] is not None]
        mean_by_length[str(L)] = _json_float(sum(col) / len(col)) if col else None
    return {
        "lengths": lengths,
        "depths": depths,
        "runs": runs,
        "exact_match": [[_json_float(v) for v in row] for row in em],
        "needle_ppl": [[_json_float(v) for v in row] for row in ppl],
        "mean_by_length": mean_by_length,
        "correct": {str(L): [x for c in sorted(cells, key=lambda c: c.depth) if c.length == L for x in c.correct]
                    for L in lengths},
        "ids": {str(L): [niah_sample_id(L, c.depth, r) for c in sorted(cells, key=lambda c: c.depth) if c.length == L
                         for r in range(len(c.correct))] for L in lengths},
    }


def niah_sample_id(length: int, depth: float, run: int) -> str:
    """A needle-grid sample's id: its sample is a function of (eval seed, length, depth, run) only."""
    return f"niah/{length}/{depth:g}/{run}"

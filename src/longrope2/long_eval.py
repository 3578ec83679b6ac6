"""Long-context evaluations: a needle-in-a-haystack grid and sliding-window perplexity.

1. Needle grid (the paper's Figures 6-8): for every (context length, needle depth) cell,
   ``runs`` RULER-style samples (:mod:`longrope2.needle`) scored teacher-forced: exact match
   at the answer positions (argmax everywhere = what greedy decoding would output) and
   needle-PPL. :func:`niah_table` makes the JSON table, :func:`plot_niah_heatmap` the figure.
2. Sliding-window perplexity on long documents (PG19 / Proof-Pile, as in the Hugging Face
   guide "Perplexity of fixed-length models" and as YaRN / LongRoPE report it):
   :func:`sliding_window_nll` for one document, :func:`perplexity_by_length` over a set.

Pure functions of tensors and numbers: no file I/O. No function ever holds an
L x vocab logits tensor: the needle scores send only answer positions through the LM head,
the perplexity runs the decoder to hidden states and the head ``chunk`` positions at a time.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from longrope2.mixed import IGNORE_INDEX, causal_lm_labels, chunked_causal_lm_loss
from longrope2.needle import NeedleSample, NeedleTemplate, build_needle_sample, needle_sample_losses

# --------------------------------------------------------------------------- needle grid


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
    concatenated stream (e.g. :func:`longrope2.toy.encode_stream` of the books).
    Raises ValueError naming the length and the available tokens when no stream is long
    enough for a sample.
    """
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    if not lengths or not depths:
        raise ValueError("niah_samples needs at least one length and one depth")
    streams = _haystack_streams(haystack_ids)
    stream_lens = [int(s.numel()) for s in streams]
    # Distinct numbers only while the template has enough of them (e.g. 1 digit: 9 numbers).
    n_numbers = 9 * math.perm(9, template.num_digits - 1) if template.distinct_digits \
        else 9 * 10 ** (template.num_digits - 1)
    distinct = runs <= n_numbers // 2

    out: dict[tuple[int, float], list[NeedleSample]] = {}
    for length in lengths:
        length = int(length)
        for depth in depths:
            depth = float(depth)
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
                        f"stream, or drop this length"
                    )
                i, start = where
                cell.append(build_needle_sample(tokenizer, streams[i], length, depth, rng, template,
                                                key=key, number=number, start=start))
            out[(length, depth)] = cell
    return out


def niah_grid(
    model: nn.Module,
    samples: dict[tuple[int, float], list[NeedleSample]],
    batch_size: int = 1,
    progress: bool = True,
) -> list[NiahCell]:
    """Teacher-forced scores of every cell (sorted by length, then depth) with needle.py's scoring.

    exact_match: fraction of runs whose every answer token is the argmax given the true
    prefix, i.e. exactly what greedy decoding of the answer would output. needle_ppl:
    exp of the mean over runs of the mean answer-token NLL (:func:`needle.needle_scores`).
    """
    cells: list[NiahCell] = []
    for length, depth in tqdm(sorted(samples), desc="needle grid", disable=not progress):
        cell = samples[(length, depth)]
        if not cell:
            raise ValueError(f"niah cell (length={length}, depth={depth}) has no samples")
        nll, em = needle_sample_losses(model, cell, batch_size)
        cells.append(NiahCell(length=int(length), depth=float(depth), runs=len(cell),
                              exact_match=sum(em) / len(em), needle_ppl=math.exp(sum(nll) / len(nll)),
                              correct=tuple(int(x) for x in em)))
    return cells


def _json_float(x: float | None) -> float | None:
    """Strict JSON has no NaN / Infinity: those become None."""
    return None if x is None or not math.isfinite(x) else float(x)


def _grid(cells: Sequence[NiahCell], field: str) -> tuple[list[int], list[float], list[list[float | None]]]:
    """(lengths ascending, depths ascending, values[depth row][length column]); None where no cell."""
    lengths = sorted({c.length for c in cells})
    depths = sorted({c.depth for c in cells})
    by_key = {(c.length, c.depth): c for c in cells}
    if len(by_key) != len(cells):
        raise ValueError("cells must hold each (length, depth) once")
    rows = [[(getattr(by_key[(L, d)], field) if (L, d) in by_key else None) for L in lengths] for d in depths]
    return lengths, depths, rows


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
    lengths, depths, em = _grid(cells, "exact_match")
    _, _, ppl = _grid(cells, "needle_ppl")
    _, _, runs = _grid(cells, "runs")
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
    cells: Sequence[NiahCell],
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
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not cells:
        raise ValueError("plot_niah_heatmap needs at least one cell")
    lengths, depths, em = _grid(cells, "exact_match")
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


# --------------------------------------------------------------------------- sliding-window perplexity


def _decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    if decoder is None or decoder is model:
        decoder = getattr(model, "model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head = head if head is not None else getattr(model, "lm_head", None)
    if decoder is None or head is None:
        raise ValueError(f"{type(model).__name__} exposes no decoder (model.model / get_decoder()) "
                         "and LM head (lm_head / get_output_embeddings())")
    return decoder, head


def _window_spans(total: int, window: int, stride: int) -> Iterable[tuple[int, int, int]]:
    """(begin, end, first scored position) of every window, as the Hugging Face guide's loop.

    Window [begin, end) scores the tokens in [max(prev_end, begin + 1), end): those the
    previous window did not score, never the window's own first token (it has no context).
    """
    prev_end = 0
    for begin in range(0, total, stride):
        end = min(begin + window, total)
        yield begin, end, max(prev_end, begin + 1)
        prev_end = end
        if end == total:
            break


def sliding_window_nll(
    model: nn.Module, input_ids: torch.Tensor, window: int, stride: int, chunk: int = 1024
) -> tuple[float, int]:
    """(sum of token NLLs, number of scored tokens) of one document by a sliding window.

    input_ids (T,): windows of ``window`` tokens start every ``stride`` tokens (positions
    restart at 0 in each window); each window scores only the tokens the previous one did
    not (the overlap's labels are -100), the first window all but its first token. With
    stride == window the windows are disjoint and each window's first token goes unscored
    (T - number of windows tokens); with stride < window every token but the document's
    first is scored once, with at least window - stride tokens of context.
    The decoder runs to hidden states and :func:`mixed.chunked_causal_lm_loss` sends
    ``chunk`` positions at a time through the LM head: no window x vocab logits tensor.
    Final-logit transforms outside the LM head (soft-capping, logit scale) are not applied.
    """
    if window < 2:
        raise ValueError(f"window must be >= 2 (a window scores window - 1 tokens at most), got {window}")
    if not 1 <= stride <= window:
        raise ValueError(f"stride must be in [1, window={window}], got {stride}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if input_ids.ndim != 1 or input_ids.numel() < 2:
        raise ValueError(f"input_ids must be one document of (T >= 2,) token ids, got shape {tuple(input_ids.shape)}")
    decoder, head = _decoder_and_head(model)
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for begin, end, first in _window_spans(input_ids.numel(), window, stride):
                if first >= end:
                    continue  # a 1-token tail window scores nothing
                ids = input_ids[begin:end].long().to(device)[None]  # (1, W)
                labels = causal_lm_labels(ids)  # (1, W): labels[t] = ids[t + 1]
                labels[:, : first - begin - 1] = IGNORE_INDEX  # token p is predicted at index p - begin - 1
                hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state  # (1, W, H)
                nll, n = chunked_causal_lm_loss(hidden, head, labels, chunk)
                total_nll += float(nll)
                total_tokens += int(n)
    finally:
        model.train(was_training)
    return total_nll, total_tokens


def perplexity_by_length(
    model: nn.Module,
    documents: Sequence[torch.Tensor],
    lengths: Sequence[int],
    stride: int | None = None,
    max_tokens: int | None = None,
    progress: bool = True,
) -> dict[int, dict]:
    """Corpus perplexity at every evaluation length L (window = L) over long documents.

    ``stride`` defaults to L: non-overlapping windows (each window's first token unscored,
    every token seen with 0 .. L-1 tokens of context); a smaller stride (YaRN / LongRoPE use
    256) gives every scored token at least L - stride tokens of context at more compute.
    Documents are truncated to their first ``max_tokens`` tokens when given; a document
    shorter than L + 1 tokens (after truncation) is skipped for that L.
    Returns {L: {"ppl": exp(total NLL / total tokens) (None if every document was skipped),
    "tokens": n, "documents": k, "skipped": s, "window": L, "stride": stride used}}.
    """
    if not lengths:
        raise ValueError("perplexity_by_length needs at least one length")
    if max_tokens is not None and max_tokens < 2:
        raise ValueError(f"max_tokens must be >= 2 when given, got {max_tokens}")
    docs = [d if max_tokens is None else d[:max_tokens] for d in documents]
    out: dict[int, dict] = {}
    bar = tqdm(total=len(lengths) * len(docs), desc="sliding-window ppl", disable=not progress)
    try:
        for L in lengths:
            L = int(L)
            s = L if stride is None else int(stride)
            nll, tokens, used, skipped = 0.0, 0, 0, 0
            for doc in docs:
                if doc.numel() < L + 1:
                    skipped += 1
                else:
                    d_nll, d_tokens = sliding_window_nll(model, doc, window=L, stride=s)
                    nll, tokens, used = nll + d_nll, tokens + d_tokens, used + 1
                bar.update(1)
            out[L] = {"ppl": math.exp(nll / tokens) if tokens else None, "tokens": tokens, "documents": used,
                      "skipped": skipped, "window": L, "stride": s}
    finally:
        bar.close()
    return out

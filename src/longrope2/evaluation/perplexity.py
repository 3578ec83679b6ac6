"""Sliding-window perplexity on long documents (PG19 / Proof-Pile, as in the Hugging Face
guide "Perplexity of fixed-length models" and as YaRN / LongRoPE report it):
:func:`sliding_window_nll` for one document, :func:`perplexity_by_length` over a set.

No file I/O; the decoder runs to hidden states and the LM head sees ``chunk`` positions at a time.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from longrope2.lm.losses import (
    IGNORE_INDEX,
    causal_lm_labels,
    chunked_causal_lm_loss,
    decoder_and_head,
)


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
    decoder, head = decoder_and_head(model)
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

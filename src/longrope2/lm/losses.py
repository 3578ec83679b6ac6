"""The one loss / perplexity module: token NLLs through the LM head, chunked or at answer positions; every scorer and trainer uses it."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from longrope2.data.needles import NeedleSample

IGNORE_INDEX = -100


def causal_lm_labels(input_ids: Tensor, doc_ids: Tensor | None = None) -> Tensor:
    """Next-token labels aligned with the inputs (label[t] = input[t+1]), -100 where no target.

    The last position has no next token; with ``doc_ids`` a position whose next token starts
    another document has none either, so no loss ever crosses a document boundary.
    """
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[..., :-1] = input_ids[..., 1:]
    if doc_ids is not None:
        crosses = doc_ids[..., 1:] != doc_ids[..., :-1]
        labels[..., :-1][crosses] = IGNORE_INDEX
    return labels


def label_weights(loss_weight: Tensor, labels: Tensor) -> Tensor:
    """Weight of each label: the weight of the token it predicts (label[t] = token t+1), 0 where no target.

    loss_weight (B, L) is per token (the toy's answer tokens weigh more); the result (B, L) float32.
    """
    w = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
    w[..., :-1] = loss_weight[..., 1:].float()
    return w.masked_fill(labels == IGNORE_INDEX, 0.0)


def token_nll(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-token NLL of logits (N, V) or (B, T, V) at targets (N,) or (B, T): computed in at least float32
    (bf16 / fp16 -> fp32, fp64 stays); 0 where the target is IGNORE_INDEX. Every loss and score here uses it."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if logits.ndim == 3:
        logits = logits.transpose(1, 2)  # cross_entropy takes the classes in dim 1
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="none")


def perplexity(nlls: Sequence[float]) -> float:
    """exp of the mean of per-sample (or per-row) mean NLLs."""
    return math.exp(sum(nlls) / len(nlls))


def decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """A causal LM's decoder (to hidden states) and its LM head, so that logits are made chunk by chunk."""
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


def _chunk_nll(head: nn.Module, hidden: Tensor, labels: Tensor, weights: Tensor | None) -> Tensor:
    nll = token_nll(head(hidden), labels)  # the (B, chunk, V) logits live only inside this chunk
    return (nll * weights).sum() if weights is not None else nll.sum()


def chunked_causal_lm_loss(hidden: Tensor, head: nn.Module, labels: Tensor, chunk: int = 1024,
                           weights: Tensor | None = None) -> tuple[Tensor, float]:
    """(sum of token NLLs, number of scored tokens) for hidden (B, L, H) and labels (B, L).

    With ``weights`` (B, L) (see :func:`label_weights`): (sum of weight x NLL, sum of weights).
    Each chunk of positions goes through the LM head under activation checkpointing, so its
    logits are freed after the forward and recomputed in the backward: at most
    B x chunk x vocab logits exist at once. Divide the sum by the second number for the
    token-mean (weighted-mean) loss.
    """
    if hidden.shape[:2] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} disagree")
    if weights is not None and weights.shape != labels.shape:
        raise ValueError(f"weights {tuple(weights.shape)} and labels {tuple(labels.shape)} disagree")
    total = hidden.new_zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32))
    for t in range(0, hidden.shape[1], chunk):
        h, y = hidden[:, t : t + chunk], labels[:, t : t + chunk]
        w = weights[:, t : t + chunk] if weights is not None else None
        if bool((y != IGNORE_INDEX).any()):
            total = total + (checkpoint(_chunk_nll, head, h, y, w, use_reentrant=False)
                             if torch.is_grad_enabled() else _chunk_nll(head, h, y, w))
    denom = float(weights.sum()) if weights is not None else float((labels != IGNORE_INDEX).sum())
    return total, denom


def needle_sample_losses(
    model: Any, samples: Sequence[NeedleSample], batch_size: int = 4
) -> tuple[list[float], list[bool]]:
    """Per-sample (mean answer NLL, exact match), one teacher-forced pass per sample.

    Only the positions that predict answer tokens go through the LM head (never an
    L x vocab logits tensor), which is what makes 128k-token samples fit.
    """
    backbone, head = decoder_and_head(model)
    device = next(model.parameters()).device
    nll: list[float] = [math.nan] * len(samples)
    em: list[bool] = [False] * len(samples)
    by_length: dict[int, list[int]] = {}
    for i, s in enumerate(samples):
        by_length.setdefault(s.length, []).append(i)

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for idxs in by_length.values():
                for b in range(0, len(idxs), batch_size):
                    chunk = idxs[b : b + batch_size]
                    ids = torch.stack([samples[i].input_ids for i in chunk]).to(device)
                    hidden = backbone(input_ids=ids, use_cache=False).last_hidden_state
                    rows, cols, owners = [], [], []
                    for r, i in enumerate(chunk):
                        ans = samples[i].answer_positions.tolist()
                        rows += [r] * len(ans)
                        cols += ans
                        owners += [i] * len(ans)
                    rows_t = torch.tensor(rows, device=device)
                    cols_t = torch.tensor(cols, device=device)
                    # Position t-1 predicts token t.
                    logits = head(hidden[rows_t, cols_t - 1])  # (N answer tokens, V)
                    targets = ids[rows_t, cols_t]
                    tok_nll = token_nll(logits, targets)
                    tok_ok = logits.argmax(-1) == targets
                    owners_t = torch.tensor(owners, device=device)
                    for i in chunk:
                        sel = owners_t == i
                        nll[i] = float(tok_nll[sel].mean())
                        em[i] = bool(tok_ok[sel].all())
    finally:
        model.train(was_training)
    return nll, em


def needle_scores(model: nn.Module, samples: Sequence[NeedleSample], batch_size: int = 4,
                  per_sample: bool = False) -> dict[str, Any]:
    """needle_ppl = exp(mean over samples of the mean NLL over answer tokens), exact match (fraction), n;
    per_sample: also "correct", 0/1 per sample in order (for paired comparisons across models)."""
    if not samples:
        raise ValueError("needle_scores needs at least one sample")
    nll, em = needle_sample_losses(model, samples, batch_size)
    out: dict[str, Any] = {"needle_ppl": perplexity(nll), "exact_match": sum(em) / len(em), "n": len(samples)}
    if per_sample:
        out["correct"] = [int(x) for x in em]
    return out


def plain_ppl(model: nn.Module, input_ids: Tensor, batch_size: int = 1, chunk: int = 1024) -> float:
    """exp(mean over rows of the mean NLL over every predicted token) of (n, L) ids.

    The LM head sees ``chunk`` positions at a time, so no L x vocab logits tensor exists.
    """
    if input_ids.ndim != 2 or input_ids.shape[1] < 2:
        raise ValueError(f"plain_ppl needs (n, L >= 2) token ids, got shape {tuple(input_ids.shape)}")
    backbone, head = decoder_and_head(model)
    device = next(model.parameters()).device
    row_nll: list[float] = []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for b in range(0, input_ids.shape[0], batch_size):
                ids = input_ids[b : b + batch_size].long().to(device)  # (B, L)
                hidden = backbone(input_ids=ids, use_cache=False).last_hidden_state  # (B, L, H)
                total = torch.zeros(ids.shape[0], dtype=torch.float64, device=device)
                for t in range(0, ids.shape[1] - 1, chunk):
                    h = hidden[:, t : min(t + chunk, ids.shape[1] - 1)]  # predicts tokens t+1 ...
                    targets = ids[:, t + 1 : t + 1 + h.shape[1]]
                    total += token_nll(head(h), targets).double().sum(dim=1)  # (B,): logits (B, chunk, V)
                row_nll += (total / (ids.shape[1] - 1)).tolist()
    finally:
        model.train(was_training)
    return perplexity(row_nll)


def weighted_lm_loss(model: torch.nn.Module, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The toy pretraining's weighted token mean from full logits (a 128-token window; torch.compile-able)."""
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
    nll = token_nll(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1))
    w = weights[:, 1:].reshape(-1)
    return (nll * w).sum() / w.sum()

"""Mixed-context-window rows (docs/method.md §6): packed short rows, long rows, the switch, a chunked loss.

- Short row: documents of at most L_train tokens packed to the row length L; positions restart
  at 0 in every document, so max(position_ids) + 1 <= L_train and the LongRoPE switch picks
  the short factors. Attention must not cross documents: :func:`document_causal_mask` gives
  the exact 4D mask for SDPA/eager (measured: transformers 5.24's own packed-sequence detection
  from restarting position_ids alone left a 3.1 max difference in hidden states against the
  documents run separately; the explicit mask gives 0). Cheaper and as exact: run the row's
  documents as rows of their own (:func:`unpack_documents`, what the train stage does under
  SDPA): D x n^2 attention instead of L^2, and no L x L mask, which at 128k tokens would not fit.
  flash-attention's varlen path reads the documents from the restarting position_ids.
- Long row: one stretch of text (or several documents) of L tokens with positions 0 … L-1, so
  the switch picks the RESCALED RoPE. Full causal attention (paper) or, as an option, a
  per-document causal mask (reference code): :func:`document_causal_mask`.
- The switch is transformers' own longrope rule, per forward pass: long factors iff
  max(position_ids) + 1 > original_max_position_embeddings. Short and long rows therefore go in
  separate forward passes.
- :func:`chunked_causal_lm_loss` never holds an L x vocab logits tensor, forward or backward.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def document_position_ids(doc_lengths: Sequence[int]) -> Tensor:
    """Positions restarting at 0 for every document, int64 (sum(doc_lengths),)."""
    if not doc_lengths or min(doc_lengths) < 1:
        raise ValueError(f"document lengths must be positive, got {list(doc_lengths)}")
    return torch.cat([torch.arange(n, dtype=torch.long) for n in doc_lengths])


def document_ids(position_ids: Tensor) -> Tensor:
    """Index of the document each token belongs to, from restarting positions (..., L) -> (..., L)."""
    starts = position_ids == 0
    starts[..., 0] = True
    return starts.long().cumsum(-1) - 1


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


def document_causal_mask(doc_ids: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Additive 4D mask (B, 1, L, L): token i sees token j iff j <= i and both are in one document."""
    if doc_ids.ndim != 2:
        raise ValueError(f"doc_ids must be (batch, length), got shape {tuple(doc_ids.shape)}")
    length = doc_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=doc_ids.device).tril()
    same = doc_ids[:, :, None] == doc_ids[:, None, :]  # (B, L, L)
    allowed = (same & causal)[:, None]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=doc_ids.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)


def unpack_documents(doc_ids: Tensor, input_ids: Tensor, position_ids: Tensor, labels: Tensor,
                     weights: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Packed rows (B, L) -> one row per document (D, n_max), right-padded; no mask needed.

    Under plain causal attention a document's tokens never see the padding that follows them, so
    a forward pass over these rows gives exactly what the packed rows give under
    :func:`document_causal_mask`, at D x n^2 attention instead of B x L^2 (flash-attention's
    varlen trick, for SDPA). Padding: token 0, label -100, weight 0, and positions n … n_max - 1
    after a document of n tokens (positions 0 … n - 1), so no position reaches n_max <= L_train
    and a short row's documents keep the short factors.
    """
    if doc_ids.ndim != 2:
        raise ValueError(f"doc_ids must be (batch, length), got shape {tuple(doc_ids.shape)}")
    flat = doc_ids.reshape(-1)  # (B*L,)
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1]
    starts[:: doc_ids.shape[1]] = True  # a row always starts a document
    doc = starts.long().cumsum(0) - 1  # (B*L,) document of each token
    first = starts.nonzero().flatten()  # (D,) flat index of each document's first token
    within = torch.arange(flat.numel(), device=flat.device) - first[doc]  # (B*L,) offset in the document
    shape = (first.numel(), int(within.max()) + 1)  # (D, n_max)

    def scatter(values: Tensor, pad: float | int) -> Tensor:
        out = torch.full(shape, pad, dtype=values.dtype, device=values.device)
        out[doc, within] = values.reshape(-1)
        return out

    positions = torch.arange(shape[1], dtype=position_ids.dtype, device=position_ids.device).expand(shape).clone()
    positions[doc, within] = position_ids.reshape(-1)
    return scatter(input_ids, 0), positions, scatter(labels, IGNORE_INDEX), scatter(weights, 0.0)


def uses_long_rope(position_ids: Tensor, train_len: int) -> bool:
    """The switch (docs/method.md §6, transformers' longrope): long factors iff max(position_ids) + 1 > L_train."""
    return int(position_ids.max()) + 1 > train_len


def label_weights(loss_weight: Tensor, labels: Tensor) -> Tensor:
    """Weight of each label: the weight of the token it predicts (label[t] = token t+1), 0 where no target.

    loss_weight (B, L) is per token (the toy's answer tokens weigh more); the result (B, L) float32.
    """
    w = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
    w[..., :-1] = loss_weight[..., 1:].float()
    return w.masked_fill(labels == IGNORE_INDEX, 0.0)


def _chunk_nll(head: nn.Module, hidden: Tensor, labels: Tensor, weights: Tensor | None) -> Tensor:
    logits = head(hidden)  # (B, chunk, V): lives only inside this chunk
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16/fp16 -> fp32; fp64 stays
    nll = nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
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

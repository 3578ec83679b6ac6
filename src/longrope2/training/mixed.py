"""Mixed-context-window rows (docs/method.md §6): packed short rows, long rows, the switch.

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
- The loss (:func:`longrope2.lm.losses.chunked_causal_lm_loss`) never holds an L x vocab logits tensor, forward or backward.
"""

from __future__ import annotations

import functools

import torch
from omegaconf import DictConfig
from torch import Tensor

from longrope2.lm import losses
from longrope2.lm.losses import IGNORE_INDEX


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


@functools.lru_cache(maxsize=2)
def _epoch_order(n_rows: int, seed: int, epoch: int) -> tuple[int, ...]:
    return tuple(torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist())


def step_rows(n_rows: int, global_batch: int, step: int, seed: int) -> list[int]:
    """The global batch of a step: a seeded permutation of the rows per epoch, consumed in order."""
    return [_epoch_order(n_rows, seed, j // n_rows)[j % n_rows]
            for j in range(step * global_batch, (step + 1) * global_batch)]


def per_document(cfg: DictConfig, is_long: bool) -> bool:
    """Documents of a row attend (and predict) only within themselves: always in short rows."""
    return not is_long or str(cfg.train.long_row_attention) == "per_document"


def row_targets(rows: dict[str, Tensor], separate: bool) -> tuple[Tensor, Tensor]:
    """labels and label weights (n, L): never across documents where they are ``separate``."""
    labels = losses.causal_lm_labels(rows["input_ids"], rows["doc_ids"] if separate else None)
    return labels, losses.label_weights(rows["loss_weight"], labels)


def row_weight_total(rows: dict[str, Tensor], cfg: DictConfig) -> Tensor:
    """Sum of label weights over the global batch: the loss's denominator, the same on every process."""
    total = torch.zeros((), dtype=torch.float64)
    for is_long in (False, True):
        sel = rows["is_long"] == is_long
        if bool(sel.any()):
            _, weights = row_targets({k: v[sel] for k, v in rows.items()}, per_document(cfg, is_long))
            total += weights.double().sum()
    return total

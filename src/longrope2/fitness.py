"""The factor search's fitness: needle-driven perplexity (docs/method.md §4), or plain PPL (Table 6 ablation).

A candidate scaling is applied by overwriting the model's rotary inverse frequencies and
attention factor in place: no reload, no copy of the model. The model's rotary modules must
be of rope_type "default" (no dynamic update that would swap the frequencies back, and no
cached longrope ``long_inv_freq``); :func:`prepare_for_search` makes them so.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from longrope2.needle import NeedleSample, needle_sample_losses
from longrope2.scaling import RopeFacts, RopeScaling, rotary_modules


def prepare_for_search(model: nn.Module, facts: RopeFacts) -> nn.Module:
    """Original RoPE with static rotary modules, ready for in-place candidate swaps."""
    RopeScaling.none(facts).apply_to_model(model)
    for _, rotary in rotary_modules(model):
        if rotary.rope_type != "default":
            raise RuntimeError(f"rotary module kept rope_type {rotary.rope_type!r} after preparation")
    return model


def set_long_rope(model: nn.Module, scaling: RopeScaling) -> None:
    """Make every forward use ``scaling``'s long frequencies and attention factor (in place).

    The search scores samples longer than L_train only, where the LongRoPE switch always
    picks the long factors, so the long path is the whole candidate.
    """
    inv_freq = scaling.long_inv_freq()  # (D,) float32
    for _, rotary in rotary_modules(model):
        if rotary.rope_type != "default":
            raise RuntimeError("call prepare_for_search(model, facts) first: the rotary module has "
                               f"rope_type {rotary.rope_type!r}, which would override the swapped frequencies")
        if rotary.inv_freq.shape != inv_freq.shape:
            raise ValueError(f"candidate has {inv_freq.numel()} frequencies, the model {rotary.inv_freq.numel()}")
        rotary.inv_freq.copy_(inv_freq.to(rotary.inv_freq.device, rotary.inv_freq.dtype))
        rotary.attention_scaling = float(scaling.attention_factor)


def needle_fitness(model: nn.Module, samples: Sequence[NeedleSample], batch_size: int = 1,
                   per_sample: bool = False) -> dict[str, Any]:
    """needle_ppl = exp(mean over samples of the mean NLL over answer tokens), and exact match;
    per_sample: also "correct", 0/1 per sample in order (for paired comparisons across models)."""
    if not samples:
        raise ValueError("needle_fitness needs at least one sample")
    nll, em = needle_sample_losses(model, samples, batch_size)
    out: dict[str, Any] = {"needle_ppl": math.exp(sum(nll) / len(nll)), "exact_match": sum(em) / len(em)}
    if per_sample:
        out["correct"] = [int(x) for x in em]
    return out


def plain_ppl(model: nn.Module, input_ids: Tensor, batch_size: int = 1, chunk: int = 1024) -> float:
    """exp(mean over rows of the mean NLL over every predicted token) of (n, L) ids.

    The LM head sees ``chunk`` positions at a time, so no L x vocab logits tensor exists.
    """
    if input_ids.ndim != 2 or input_ids.shape[1] < 2:
        raise ValueError(f"plain_ppl needs (n, L >= 2) token ids, got shape {tuple(input_ids.shape)}")
    backbone, head = model.model, model.get_output_embeddings()
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
                    logits = head(h).float()  # (B, chunk, V)
                    targets = ids[:, t + 1 : t + 1 + h.shape[1]]
                    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
                    total += nll.double().sum(dim=1)
                row_nll += (total / (ids.shape[1] - 1)).tolist()
    finally:
        model.train(was_training)
    return math.exp(sum(row_nll) / len(row_nll))


def evaluate(
    model: nn.Module,
    scaling: RopeScaling,
    fitness: str,
    samples: Sequence[NeedleSample] = (),
    plain_ids: Tensor | None = None,
    batch_size: int = 1,
) -> dict[str, Any]:
    """Apply ``scaling`` in place and score it: {"fitness": ..., plus the fitness' own figures}."""
    set_long_rope(model, scaling)
    if fitness == "needle_ppl":
        scores = needle_fitness(model, samples, batch_size)
        return {"fitness": scores["needle_ppl"], **scores}
    if fitness == "plain_ppl":
        if plain_ids is None:
            raise ValueError("fitness 'plain_ppl' needs plain_ids")
        ppl = plain_ppl(model, plain_ids, batch_size)
        return {"fitness": ppl, "plain_ppl": ppl}
    raise ValueError(f"unknown fitness {fitness!r}; accepted: needle_ppl, plain_ppl")

"""The factor search's fitness: needle-driven perplexity (docs/method.md §4), or plain PPL (Table 6 ablation); both computed by lm.losses.

A candidate scaling is applied by overwriting the model's rotary inverse frequencies and
attention factor in place: no reload, no copy of the model. The model's rotary modules must
be of rope_type "default" (no dynamic update that would swap the frequencies back, and no
cached longrope ``long_inv_freq``); :func:`prepare_for_search` makes them so.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from longrope2.data.needles import NeedleSample
from longrope2.lm.losses import needle_scores, plain_ppl
from longrope2.rope.hf_config import RopeFacts
from longrope2.rope.scaling import RopeScaling, rotary_slots


def prepare_for_search(model: nn.Module, facts: RopeFacts) -> nn.Module:
    """Original RoPE with static rotary modules, ready for in-place candidate swaps."""
    RopeScaling.none(facts).apply_to_model(model)
    for rotary in rotary_slots(model):
        if rotary.rope_type != "default":
            raise RuntimeError(f"rotary module kept rope_type {rotary.rope_type!r} after preparation")
    return model


def set_long_rope(model: nn.Module, scaling: RopeScaling) -> None:
    """Make every forward use ``scaling``'s long frequencies and attention factor (in place).

    The search scores samples longer than L_train only, where the LongRoPE switch always
    picks the long factors, so the long path is the whole candidate.
    """
    inv_freq = scaling.long_inv_freq()  # (D,) float32
    for rotary in rotary_slots(model):
        if rotary.rope_type != "default":
            raise RuntimeError("call prepare_for_search(model, facts) first: the rotary module has "
                               f"rope_type {rotary.rope_type!r}, which would override the swapped frequencies")
        if rotary.inv_freq.shape != inv_freq.shape:
            raise ValueError(f"candidate has {inv_freq.numel()} frequencies, the model {rotary.inv_freq.numel()}")
        rotary.inv_freq.copy_(inv_freq.to(rotary.inv_freq.device, rotary.inv_freq.dtype))
        rotary.set_attention_scaling(scaling.attention_factor)


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
        scores = needle_scores(model, samples, batch_size)
        return {"fitness": scores["needle_ppl"], **scores}
    if fitness == "plain_ppl":
        if plain_ids is None:
            raise ValueError("fitness 'plain_ppl' needs plain_ids")
        ppl = plain_ppl(model, plain_ids, batch_size)
        return {"fitness": ppl, "plain_ppl": ppl}
    raise ValueError(f"unknown fitness {fitness!r}; accepted: needle_ppl, plain_ppl")

"""Held-out needle exact match and needle-PPL of the base and the fine-tuned model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from longrope2.core.config import run_dir, run_seed
from longrope2.data.needles import load_needle_sets
from longrope2.lm.loading import load_causal_lm
from longrope2.lm.losses import needle_scores


def validate(cfg: DictConfig, model_dir: Path, device: torch.device) -> dict[str, Any]:
    """Held-out needle exact match / needle-PPL at L_train and at L: base (original RoPE) vs this model."""
    sets = load_needle_sets(run_dir(cfg) / "needle_data")
    chosen = {split: samples for split, (samples, _) in sets.items() if split in ("validation_short", "validation")}
    if not chosen:
        return {}
    batch = int(cfg.train.validation_batch_size)
    out: dict[str, Any] = {}
    for name, path in (("base", str(cfg.model.path)), ("tuned", str(model_dir))):
        lm = load_causal_lm(path, int(cfg.target_len), original_rope=name == "base",
                            dtype=torch.float32 if device.type == "cpu" else None)
        lm.to(device).eval()
        for split, samples in chosen.items():
            # ids: the seed's own held-out set (stage needle_data draws one per seed), sample i of it
            ids = [f"{split}/seed{run_seed(cfg)}/{i}" for i in range(len(samples))]
            out.setdefault(name, {})[split] = {"length": samples[0].length, "samples": len(samples),
                                               **needle_scores(lm, samples, batch, per_sample=True), "ids": ids}
        del lm
    if "validation_short" in chosen:
        base_em = out["base"]["validation_short"]["exact_match"]
        out["retention"] = (out["tuned"]["validation_short"]["exact_match"] / base_em) if base_em else None
    return out

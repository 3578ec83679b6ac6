"""The toy base model's quality gate and the seed retry."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from longrope2.core.processes import torch_threads
from longrope2.lm.losses import needle_scores
from longrope2.toy.data import encode_stream, heldout_samples
from longrope2.toy.pretraining import pretrain_base_model
from longrope2.toy.settings import LogFn, ToyPretrainSettings
from longrope2.toy.tokenizer import load_or_train_tokenizer


def gate(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    heldout_docs: Sequence[str],
    settings: ToyPretrainSettings,
    seed: int = 0,
) -> dict[str, float | bool]:
    """No-scaling needle scores on held-out text at each scale, plus the fragility check.

    Passes when EM at 1x >= gate_min_em (it retrieves), EM at 2x with the needle at
    depth 0.95 >= gate_min_fragility_em (it did not learn absolute positions), and EM
    at 8x <= gate_max_collapse_em (the collapse the pipeline is meant to fix).
    ``seed`` draws the held-out samples (keys, numbers, haystack offsets).
    """
    with torch_threads(settings.num_threads):
        return _gate(model, tokenizer, heldout_docs, settings, seed)


def _gate(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    heldout_docs: Sequence[str],
    s: ToyPretrainSettings,
    seed: int,
) -> dict[str, float | bool]:
    stream = encode_stream(tokenizer, heldout_docs)
    template = s.template()
    out: dict[str, float | bool] = {"seq_len": s.seq_len, "n_per_cell": s.gate_samples}

    def cell(scale: int, depth: float | None = None) -> dict[str, float]:
        samples = heldout_samples(tokenizer, stream, template, scale * s.seq_len, s.gate_samples,
                                  seed, depth=depth, purpose="gate")
        return needle_scores(model, samples, batch_size=s.gate_batch_size)

    for scale in sorted(set(s.gate_scales) | {1, s.gate_collapse_scale}):
        sc = cell(scale)  # depths evenly spread over [0, 1]
        out[f"em_{scale}x"], out[f"needle_ppl_{scale}x"] = sc["exact_match"], sc["needle_ppl"]
    sc = cell(s.gate_fragility_scale, s.gate_fragility_depth)
    out["fragility_em"], out["fragility_needle_ppl"] = sc["exact_match"], sc["needle_ppl"]
    out["pass_1x"] = out["em_1x"] >= s.gate_min_em
    out["pass_fragility"] = out["fragility_em"] >= s.gate_min_fragility_em
    out["collapse_8x"] = out[f"em_{s.gate_collapse_scale}x"] <= s.gate_max_collapse_em
    out["passed"] = bool(out["pass_1x"] and out["pass_fragility"] and out["collapse_8x"])
    return out


def pretrain_with_gate(
    settings: ToyPretrainSettings,
    train_docs: Sequence[str],
    heldout_docs: Sequence[str],
    seeds: Sequence[int],
    work_dir: str | Path,
    log_fn: LogFn | None = None,
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast, dict[str, float | bool], int, list[dict[str, Any]]]:
    """Train seeds in order (at most ``max_seed_tries``) until one passes the gate.

    Returns (model, tokenizer, gate_metrics, seed_used, attempts); each attempt is
    {seed, steps, train_wall_s, gate_wall_s, **gate figures}. Raises RuntimeError listing every tried
    seed's gate figures when none passes. Each seed resumes from
    ``work_dir/seed_<n>/checkpoint.pt``; the tokenizer lives in ``work_dir/tokenizer``.
    """
    work_dir = Path(work_dir)
    tried = list(seeds)[: settings.max_seed_tries]
    if not tried:
        raise ValueError("pretrain_with_gate needs at least one seed")
    tokenizer = load_or_train_tokenizer(settings, train_docs, work_dir)
    attempts: list[dict[str, Any]] = []
    for seed in tried:
        res = pretrain_base_model(settings, train_docs, heldout_docs, seed, work_dir / f"seed_{seed}",
                                  log_fn=log_fn, tokenizer=tokenizer)
        t0 = time.time()
        g = gate(res.model, tokenizer, heldout_docs, settings, settings.gate_sample_seed)
        attempts.append({"seed": seed, "steps": res.steps, "train_wall_s": res.wall_s,
                         "gate_wall_s": time.time() - t0, **g})
        if log_fn is not None:
            log_fn({f"gate_{k}": float(v) for k, v in g.items()}, res.steps)
        if g["passed"]:
            return res.model, tokenizer, g, seed, attempts
    lines = "\n".join(
        f"  seed {a['seed']}: steps {a['steps']}, EM "
        + " / ".join(f"{a[f'em_{x}x']:.2f}" for x in settings.gate_scales)
        + f" at {'/'.join(f'{x}x' for x in settings.gate_scales)}, fragility {a['fragility_em']:.2f}"
        f" (need 1x >= {settings.gate_min_em}, fragility >= {settings.gate_min_fragility_em},"
        f" {settings.gate_collapse_scale}x <= {settings.gate_max_collapse_em})"
        for a in attempts
    )
    raise RuntimeError(f"no seed passed the toy base-model gate:\n{lines}")

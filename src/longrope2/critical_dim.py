"""Stage `critical_dim`: the theoretical critical dimensions of the experiment's model.

In:  the model's config (model.path: the toy's base model, a local folder or a hub id) and
     L_train / L from the experiment config.
Out: <out_dir>/critical_dim/critical_dim.json (d_tcd, d10_tcd, the search range of the real
     critical dim, s, the attention factor, every pair's period) and periods.png (the paper's
     period plot). Both also go to MLflow.

    python -m longrope2.critical_dim experiment=llama3_8b_128k model.path=/models/llama3-8b
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from longrope2.core.checkpoint import check_declared_facts
from longrope2.core.config import hydra_stage
from longrope2.core.errors import ConfigError
from longrope2.core.outputs import write_json
from longrope2.core.tracking import stage_run
from longrope2.reporting.figures import plot_periods
from longrope2.rope import factors as rope
from longrope2.rope.hf_config import RopeFacts, rope_facts_from_hf_config


def load_model_facts(cfg: DictConfig) -> RopeFacts:
    """RoPE facts of model.path, checked against what the experiment declares."""
    from transformers import AutoConfig

    try:
        hf_config = AutoConfig.from_pretrained(str(cfg.model.path))
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"model.path = {cfg.model.path!r}: cannot read a model config there ({err}); accepted: "
            "a local model folder with config.json or a reachable hub id"
        ) from None
    facts = rope_facts_from_hf_config(hf_config)
    check_declared_facts(cfg.model, dataclasses.asdict(facts), str(cfg.model.path))  # as at composition
    return facts


def run(cfg: DictConfig) -> dict[str, Any]:
    out = Path(cfg.out_dir) / "critical_dim"
    with stage_run(cfg, "critical_dim") as tracker:
        facts = load_model_facts(cfg)
        summary = rope.critical_dim_report(facts.head_dim, facts.rope_theta, int(cfg.model.train_len),
                                           int(cfg.target_len), facts.partial_rotary_factor)
        summary["model"] = {"name": str(cfg.model.name), "path": str(cfg.model.path),
                            "shipped_rope": None if facts.rope_type == "default" else facts.rope_type}
        plot_periods(summary, f"{cfg.model.name}: RoPE periods", out / "periods.png")
        write_json(out / "critical_dim.json", summary)
        tracker.log_metrics({k: summary[k] for k in ("d_tcd", "d10_tcd", "extension_ratio", "attention_factor")})
        tracker.log_artifact(out / "critical_dim.json")
        tracker.log_artifact(out / "periods.png")
    print(
        f"d_tcd = {summary['d_tcd']}, d10_tcd = {summary['d10_tcd']}, s = {summary['extension_ratio']:g}, "
        f"attention factor = {summary['attention_factor']:.4f} -> {out}"
    )
    return summary


main = hydra_stage(run)

if __name__ == "__main__":
    main()

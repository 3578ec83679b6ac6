"""A checkpoint's RoPE facts at composition: model.path's config.json read before any job.

With `model: checkpoint` (experiment=extend) the model section's RoPE facts are null and come from the
checkpoint; a preset that declares them has them checked against the checkpoint when it is at hand. Either
way a checkpoint without RoPE, with a scaling we cannot undo, or contradicting a declared fact stops the
composition (the Snakefile's and every stage's), naming the field, the value and what is accepted.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from longrope2.core.errors import ConfigError
from longrope2.rope.hf_config import (
    MakerScaling,
    RopeConfigError,
    maker_scaling,
    no_rope_reason,
    pretrained_window,
    rope_facts_from_hf_config,
    scaling_error,
)

# model.<key>: the checkpoint's fact a declared value must equal
CHECKED_FACTS = ("rope_theta", "head_dim", "partial_rotary_factor")
ACCEPTED_PATHS = "a local checkpoint folder with config.json (as save_pretrained writes it), or a hub id whose " \
                 "config.json is in the local Hugging Face cache"


def read_checkpoint_config(path: str) -> dict[str, Any] | None:
    """model.path's config.json as a dict; None when the path is no local folder and the hub cache lacks it."""
    folder = Path(path).expanduser()
    if folder.is_dir():
        file = folder / "config.json"
        if not file.is_file():
            raise ConfigError(f"model.path = {path!r}: the folder has no config.json; accepted: {ACCEPTED_PATHS}")
        try:
            return json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"model.path = {path!r}: config.json is not valid JSON ({err}); accepted: "
                              f"{ACCEPTED_PATHS}") from None
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(path, "config.json", local_files_only=True)).read_text())
    except Exception:  # noqa: BLE001 (no such repo id, not cached, offline: the facts stay as declared)
        return None


def _with_layer_types(hf: dict[str, Any]) -> Any:
    """A config with a sliding window as transformers builds it (layer_types derived: Gemma-2's alternation is not
    in its config.json); the dict itself otherwise, or when transformers does not know the model type."""
    inner = hf.get("text_config") or hf
    if inner.get("sliding_window") is None or inner.get("layer_types") is not None:
        return hf
    try:
        from transformers import AutoConfig

        return AutoConfig.for_model(**inner)
    except (ValueError, KeyError, TypeError):
        return hf


def checkpoint_facts(path: str, hf: dict[str, Any]) -> dict[str, Any]:
    """The model section's facts of a checkpoint config, or a ConfigError on a config the pipeline refuses."""
    reason = no_rope_reason(hf)
    if reason:
        raise ConfigError(f"model.path = {path!r}: config.json has no RoPE to extend ({reason}); accepted: a "
                          "checkpoint with rotary position embeddings (e.g. Llama, Qwen, Mistral, Phi-3, Gemma-3, "
                          "DeepSeek-V2)")
    error = scaling_error(_with_layer_types(hf))
    if error:
        raise ConfigError(f"model.path = {path!r}: {error}")
    try:
        facts = rope_facts_from_hf_config(hf)
        window, source = pretrained_window(hf)
    except RopeConfigError as err:
        raise ConfigError(f"model.path = {path!r}: config.json: {err}") from None
    return {"rope_theta": facts.rope_theta, "head_dim": facts.head_dim,
            "partial_rotary_factor": facts.partial_rotary_factor, "train_len": window, "window_source": source,
            "shipped_rope": None if facts.rope_type == "default" else facts.rope_type}


def check_declared_facts(model: DictConfig, facts: Mapping[str, Any], path: str) -> None:
    """A ConfigError naming the first model.<fact> (CHECKED_FACTS) that differs from the checkpoint's."""
    for key in CHECKED_FACTS:
        declared, found = model.get(key), facts[key]
        if not math.isclose(float(declared), float(found), rel_tol=1e-9):
            raise ConfigError(f"model.{key} = {type(found)(declared)} but the model at {path!r} has {found}; accepted: "
                              "the model's own value, or null to read it from the checkpoint (fix the experiment "
                              "config or model.path)")


def fill_model_facts(cfg: DictConfig) -> None:
    """Fill model.<fact> = null from the checkpoint and check the declared ones (in place). A declared
    model.train_len other than the checkpoint's window is kept, with a warning naming both."""
    model = cfg.model
    if model.pretrain.enabled or not model.get("path"):
        return
    path = str(model.path)
    missing = [k for k in (*CHECKED_FACTS, "train_len") if model.get(k) is None]
    hf = read_checkpoint_config(path)
    if hf is None:
        if missing:
            raise ConfigError(f"model.path = {path!r}: no config.json to read model.{', model.'.join(missing)} "
                              f"from; accepted: {ACCEPTED_PATHS}, or those keys set")
        return
    facts = checkpoint_facts(path, hf)
    for key in CHECKED_FACTS:
        if model.get(key) is None:
            model[key] = facts[key]
    check_declared_facts(model, facts, path)
    if model.get("train_len") is None:
        model.train_len = facts["train_len"]
    elif int(model.train_len) != facts["train_len"]:
        print(f"warning: model.train_len = {model.train_len} overrides the checkpoint's pretrained window "
              f"{facts['train_len']} ({facts['window_source']} of {path}/config.json)", file=sys.stderr)
    if model.get("name") is None:
        model.name = Path(path).name or path


def maker_rope(cfg: DictConfig) -> MakerScaling | None:
    """The `shipped` variant's RoPE, or None when the experiment has no such variant: with eval.shipped = auto,
    the scaling model.path's config.json ships (loaded as it is), else the one its maker recommends at
    target_len (rope.hf_config.MAKER_RECOMMENDED); None under eval.shipped = false, for a model the pipeline
    pretrains (the toy), a checkpoint whose config.json is not at hand, or one with neither."""
    if cfg.eval.get("shipped", False) != "auto" or cfg.model.pretrain.enabled or not cfg.model.get("path"):
        return None
    hf = read_checkpoint_config(str(cfg.model.path))
    return None if hf is None else maker_scaling(hf, int(cfg.target_len))

"""A checkpoint as every stage runs it: the config prepared (attention window, original RoPE or
a maker's recommended scaling), the model and tokenizer loaded."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from omegaconf import DictConfig

from longrope2.core.artifacts import DamagedInputError, check_model_folder
from longrope2.core.errors import ConfigError
from longrope2.rope.hf_config import (
    RopeFacts,
    global_rope,
    local_and_global,
    rope_facts_from_hf_config,
    with_global_rope,
)


def lift_attention_window(config: Any, target_len: int) -> str | None:
    """Lift an attention window shorter than target_len (in place): None = full causal attention.

    Phi-3-mini-4k's config sets sliding_window = 2047 (Mistral-7B v0.1: 4096), and transformers then masks (and
    tells flash attention) everything more than that many tokens back: a needle at the start of a 128k sample
    would be invisible to the search, the fine-tuning and the evaluations. The reference search code sets the
    window to the target length; None also covers the evaluations beyond it. A window >= target_len
    (Phi-3-mini-128k / Phi-4-mini: 262 144) is kept, and so is the window of a model whose local (sliding)
    layers sit beside global ones (Gemma-3): those layers are local by design, the global ones see everything.
    Returns what changed, or None.
    """
    window = getattr(config, "sliding_window", None)
    if window is None or int(window) >= int(target_len):
        return None
    if local_and_global(getattr(config, "layer_types", None)):
        return None
    config.sliding_window = None
    return f"sliding_window {window} -> null (full attention; target_len = {target_len})"


def reset_to_original_rope(config: Any) -> str | None:
    """Drop a RoPE scaling the checkpoint ships with (in place), keeping theta and the rotary share; in a
    layer-typed config (Gemma-3) the global layers' (the local layers keep theirs).

    Phi-4-mini-instruct's config.json carries LongRoPE factors to 128k (Llama-3.1: llama3, DeepSeek-V2: yarn):
    loaded as it is, the "base" rows (original RoPE, the paper's no-scaling reference) would already be
    extended. Returns what changed, or None.
    """
    current = dict(getattr(config, "rope_parameters", None) or {})
    params = global_rope(current)
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        return None
    original = {"rope_type": "default", "rope_theta": params["rope_theta"]}
    if "partial_rotary_factor" in params:
        original["partial_rotary_factor"] = params["partial_rotary_factor"]
    config.rope_parameters = with_global_rope(current, original)
    return f"rope_type {rope_type} -> default (the checkpoint's own scaling dropped: the original RoPE)"


def set_rope_parameters(config: Any, rope_parameters: dict[str, Any]) -> str:
    """Write a RoPE scaling into the config (in place), before the model is built: rope_parameters (rope_type and
    its keys) on the checkpoint's theta and rotary share, in a layer-typed config (Gemma-3) the global layers';
    max_position_embeddings raised to the scaling's reach (original_max_position_embeddings x factor) when below
    it, as the maker's setting implies (Qwen3's 40 960 with YaRN x4 from 32 768: 131 072). Returns what changed."""
    current = dict(getattr(config, "rope_parameters", None) or {})
    params = global_rope(current)
    kept = {key: params[key] for key in ("rope_theta", "partial_rotary_factor") if key in params}
    new = {**kept, **rope_parameters}
    config.rope_parameters = with_global_rope(current, new)
    shown = ", ".join(f"{k} {v}" for k, v in rope_parameters.items() if k != "rope_type")
    change = f"rope_type {params.get('rope_type', 'default')} -> {rope_parameters['rope_type']} ({shown})"
    original, factor = rope_parameters.get("original_max_position_embeddings"), rope_parameters.get("factor")
    reach = int(round(float(original) * float(factor))) if original and factor else None
    if reach is not None and int(getattr(config, "max_position_embeddings", None) or 0) < reach:
        change += f"; max_position_embeddings {config.max_position_embeddings} -> {reach}"
        config.max_position_embeddings = reach
    return change


def prepared_config(path: str, target_len: int, original_rope: bool = False,
                    rope_parameters: dict[str, Any] | None = None) -> tuple[Any, list[str]]:
    """The checkpoint's config as every stage runs it, and what changed: the attention window lifted to cover
    target_len (lift_attention_window); with original_rope (the base model's rows), any RoPE scaling the
    checkpoint ships with dropped (reset_to_original_rope); with rope_parameters (the `shipped` variant of a
    checkpoint whose maker recommends a scaling it does not ship), that scaling written in (set_rope_parameters)."""
    from transformers import AutoConfig

    check_model_folder(path)  # every model load (hf or vLLM) starts here: a damaged weights file named first
    config = AutoConfig.from_pretrained(path)
    changes = [lift_attention_window(config, target_len), reset_to_original_rope(config) if original_rope else None,
               set_rope_parameters(config, rope_parameters) if rope_parameters else None]
    return config, [c for c in changes if c]


def load_causal_lm(path: str, target_len: int, original_rope: bool = False,
                   rope_parameters: dict[str, Any] | None = None, **kwargs: Any) -> Any:
    """AutoModelForCausalLM.from_pretrained(path, **kwargs) on prepared_config(path, ...); the loaded config
    says what was loaded."""
    from transformers import AutoModelForCausalLM

    config, changes = prepared_config(path, target_len, original_rope, rope_parameters)
    for change in changes:
        print(f"{path}: {change}")
    return AutoModelForCausalLM.from_pretrained(path, config=config, **kwargs)


def load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.path = {path!r}: cannot load a tokenizer there ({err}); accepted: "
                          "a local model folder with its tokenizer or a reachable hub id") from None


def stage_dtype(cfg: DictConfig, device: torch.device) -> torch.dtype:
    """model.dtype on GPUs; float32 on CPUs (bf16 matmuls are slow there and the toy is small)."""
    return getattr(torch, str(cfg.model.dtype)) if device.type == "cuda" else torch.float32


def load_base_model(cfg: DictConfig, dtype: torch.dtype, device: torch.device | None = None,
                    attn_implementation: str | None = None, original_rope: bool = True,
                    path: str | None = None, rope_parameters: dict[str, Any] | None = None) -> tuple[Any, RopeFacts]:
    """The one model loader of the stages: model.path (or ``path``) with the attention window lifted to cover
    target_len (the exported config keeps it lifted), the original RoPE for the base rows (or rope_parameters
    written in: prepared_config), moved to ``device`` in eval mode when one is given; and its RoPE facts with the
    experiment's L_train, which wins over the config's window (Phi3-mini is extended from 2k, not 4k). A model that cannot be loaded is a ConfigError naming
    model.path; a damaged weights file keeps its own error, which names the file and its rule."""
    path = str(cfg.model.path) if path is None else path
    kwargs: dict[str, Any] = {"dtype": dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = load_causal_lm(path, int(cfg.target_len), original_rope=original_rope,
                               rope_parameters=rope_parameters, **kwargs)
    except DamagedInputError:
        raise
    except (OSError, ValueError, ImportError) as err:
        how = f" (attn_implementation = {attn_implementation!r})" if attn_implementation else ""
        raise ConfigError(f"model.path = {path!r}{how}: cannot load a causal LM there ({err})") from None
    if device is not None:
        model.to(device).eval()
    facts = dataclasses.replace(rope_facts_from_hf_config(model.config), train_len=int(cfg.model.train_len))
    return model, facts

"""The RoPE facts of a checkpoint's config (a config.json mapping or a transformers config), and what it ships.

Pure reading, no I/O: which RoPE the model has (theta, the rotated head dim, the partial rotary share), its
pretrained window L_train, the scaling it ships (and whether we can undo it), and the configs we refuse
(no RoPE at all; local/global layers under one RoPE). Facts of transformers 5 this relies on:
- a legacy config.json `rope_scaling` wins over `rope_parameters` when both are present;
- Gemma-3 keeps one `rope_parameters` entry per layer type; only `full_attention` (the global layers) is
  extended, the local (sliding) layers keep their own RoPE and window;
- DeepSeek-V2 (MLA) rotates `qk_rope_head_dim` of each head only (its config's head_dim is set to it);
- Phi-3 keeps `original_max_position_embeddings` at the top of the config.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from longrope2.rope import factors as rope

DEFAULT_ROPE_THETA = 10_000.0  # transformers' default when a config names no rope_theta


GLOBAL_LAYER = "full_attention"  # the layer type whose RoPE is extended in a layer-typed config (Gemma-3)


# Shipped scalings the base rows can undo (drop to the original RoPE): each only rescales the frequencies
# (and cos/sin, and for MLA the softmax scale), all derived from the rope parameters.
SHIPPED_SCALINGS: tuple[str, ...] = ("linear", "dynamic", "yarn", "llama3", "longrope")


# The RoPE scaling a model's maker recommends beyond its pretrained window for a checkpoint that ships none, by
# model_type: the rope parameters, factor = target_len / original_max_position_embeddings. The Qwen2.5 model
# cards (model_type qwen2; e.g. https://huggingface.co/Qwen/Qwen2.5-7B-Instruct) and the Qwen3 ones (qwen3;
# https://huggingface.co/Qwen/Qwen3-8B), "Processing Long Texts": add rope_scaling {"rope_type": "yarn",
# "factor": 4.0, "original_max_position_embeddings": 32768} to config.json for 131 072 tokens, the factor set to
# the length needed (Qwen3: 2.0 for 65 536).
MAKER_RECOMMENDED: dict[str, dict[str, Any]] = {
    "qwen2": {"rope_type": "yarn", "original_max_position_embeddings": 32768},
    "qwen3": {"rope_type": "yarn", "original_max_position_embeddings": 32768},
}


class RopeConfigError(ValueError):
    """A model config lacks, or has a bad, RoPE key; the message names the key."""


@dataclass(frozen=True)
class RopeFacts:
    """The RoPE facts of a pretrained model."""

    rope_theta: float
    head_dim: int  # the head dim RoPE acts on (MLA: qk_rope_head_dim)
    train_len: int  # L_train (pretrained_window)
    partial_rotary_factor: float = 1.0
    max_position_embeddings: int | None = None  # the config's current window
    rope_type: str = "default"  # scaling already in the config

    @property
    def rotary_dim(self) -> int:
        return rope.rotary_dim(self.head_dim, self.partial_rotary_factor)


def _get(cfg: Any, key: str) -> Any:
    return cfg.get(key) if isinstance(cfg, Mapping) else getattr(cfg, key, None)


def text_config(cfg: Any) -> Any:
    """The language model's config: a multimodal wrapper's text_config, else cfg."""
    if _get(cfg, "num_attention_heads") is None and _get(cfg, "text_config") is not None:
        return _get(cfg, "text_config")
    return cfg


def layer_typed(params: Any) -> bool:
    """True for rope parameters keyed by layer type (Gemma-3: full_attention / sliding_attention)."""
    return isinstance(params, Mapping) and isinstance(params.get(GLOBAL_LAYER), Mapping)


def local_and_global(layer_types: Any) -> bool:
    """True when local (sliding_attention) layers sit beside global (full_attention) ones (Gemma-2, Gemma-3)."""
    return {"sliding_attention", GLOBAL_LAYER} <= set(layer_types or ())


def global_rope(params: Mapping[str, Any]) -> dict[str, Any]:
    """The global layers' entry of layer-typed rope parameters, else (a copy of) the parameters themselves."""
    return dict(params[GLOBAL_LAYER]) if layer_typed(params) else dict(params)


def with_global_rope(current: Mapping[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``new`` as the config's rope parameters: in place of the global layers' entry when ``current`` is layer-typed
    (the local layers keep theirs), else whole."""
    return {**current, GLOBAL_LAYER: new} if layer_typed(current) else new


def rope_parameters(cfg: Any) -> dict[str, Any]:
    """The parameters of the RoPE LongRoPE2 extends (the global layers' in a layer-typed config), legacy keys
    folded in: rope_type ('type' in old files), rope_theta, partial_rotary_factor."""
    cfg = text_config(cfg)
    params = _get(cfg, "rope_scaling") or _get(cfg, "rope_parameters") or {}
    if not isinstance(params, Mapping):
        raise RopeConfigError(f"rope_parameters must be a mapping, got {params!r}")
    out = global_rope(params)
    legacy = out.pop("type", None)
    out["rope_type"] = str(out.get("rope_type") or legacy or "default")
    out["rope_theta"] = float(out.get("rope_theta") or _get(cfg, "rope_theta") or DEFAULT_ROPE_THETA)
    prf = out.get("partial_rotary_factor") or _get(cfg, "partial_rotary_factor")
    if prf is not None:
        out["partial_rotary_factor"] = float(prf)
    return out


def rotary_head_dim(cfg: Any) -> int:
    """The head dim RoPE rotates (before the partial share): MLA's qk_rope_head_dim, else head_dim, else
    hidden_size // num_attention_heads."""
    cfg = text_config(cfg)
    for key in ("qk_rope_head_dim", "head_dim"):
        if _get(cfg, key) is not None:
            return int(_get(cfg, key))
    hidden, heads = _get(cfg, "hidden_size"), _get(cfg, "num_attention_heads")
    if hidden is None or heads is None:
        raise RopeConfigError("config needs head_dim, or hidden_size and num_attention_heads")
    return int(hidden) // int(heads)


def pretrained_window(cfg: Any) -> tuple[int, str]:
    """L_train and where it was read: the shipped scaling's original_max_position_embeddings, else the top-level
    one (Phi-3), else max_position_embeddings (divided by a linear scaling's factor, the window it stretched)."""
    cfg, params = text_config(cfg), rope_parameters(cfg)
    top, max_pos = _get(cfg, "original_max_position_embeddings"), _get(cfg, "max_position_embeddings")
    if top:  # Phi3: transformers gives this copy priority
        return int(top), "original_max_position_embeddings"
    if params.get("original_max_position_embeddings"):
        return int(params["original_max_position_embeddings"]), f"{params['rope_type']} scaling's " \
            "original_max_position_embeddings"
    if max_pos is None:
        raise RopeConfigError("config needs original_max_position_embeddings or max_position_embeddings")
    if params["rope_type"] == "linear" and float(params.get("factor") or 1.0) > 1.0:
        return int(round(int(max_pos) / float(params["factor"]))), "max_position_embeddings / linear factor"
    return int(max_pos), "max_position_embeddings"


def shipped_scaling(cfg: Any) -> dict[str, Any] | None:
    """The RoPE scaling the checkpoint ships (its rope parameters when rope_type is not default), or None."""
    params = rope_parameters(cfg)
    return params if params["rope_type"] != "default" else None


def recommended_scaling(cfg: Any, target_len: int) -> dict[str, Any] | None:
    """The rope parameters the model's maker recommends at target_len (MAKER_RECOMMENDED, by model_type), or
    None: no recommendation, or target_len within the window it extends."""
    recommended = MAKER_RECOMMENDED.get(str(_get(text_config(cfg), "model_type")))
    if recommended is None or int(target_len) <= int(recommended["original_max_position_embeddings"]):
        return None
    return {**recommended, "factor": int(target_len) / int(recommended["original_max_position_embeddings"])}


@dataclass(frozen=True)
class MakerScaling:
    """The maker's own RoPE scaling of a checkpoint: the one its config ships (shipped: loaded as it is) or the
    one its maker recommends (written into the config before the model is built)."""

    rope_parameters: dict[str, Any]
    shipped: bool

    @property
    def rope_type(self) -> str:
        return str(self.rope_parameters["rope_type"])

    @property
    def config_edit(self) -> dict[str, Any] | None:
        """The rope parameters to write into the checkpoint's config: None for a shipped scaling."""
        return None if self.shipped else dict(self.rope_parameters)


def maker_scaling(cfg: Any, target_len: int) -> MakerScaling | None:
    """The checkpoint's shipped scaling, else its maker's recommended one at target_len, else None."""
    shipped = shipped_scaling(cfg)
    if shipped is not None:
        return MakerScaling(shipped, shipped=True)
    recommended = recommended_scaling(cfg, target_len)
    return None if recommended is None else MakerScaling(recommended, shipped=False)


def scaling_error(cfg: Any) -> str | None:
    """Why the pipeline cannot take this checkpoint's RoPE: a shipped scaling it cannot undo, or local and
    global layers under one RoPE (only the global layers' RoPE is extended); None when it can."""
    cfg = text_config(cfg)
    params = rope_parameters(cfg)
    if params["rope_type"] not in ("default", *SHIPPED_SCALINGS):
        return (f"rope_scaling.rope_type = {params['rope_type']!r}: this shipped scaling cannot be undone to the "
                f"original RoPE; accepted: none, or one of {', '.join(SHIPPED_SCALINGS)}")
    raw = _get(cfg, "rope_parameters")
    if local_and_global(_get(cfg, "layer_types")) and not layer_typed(raw):
        return (f"{_get(cfg, 'model_type')}: local (sliding_attention) and global (full_attention) layers share "
                "one RoPE in transformers' implementation (rope_parameters is not keyed by layer type), so its "
                "global layers cannot be extended alone; accepted: a model whose rope_parameters has a "
                "full_attention entry (e.g. Gemma-3) or whose layers are all global")
    return None


_NO_ROPE_KEYS = ("rope_theta", "rope_parameters", "rope_scaling", "rotary_dim", "rotary_pct", "rotary_emb_base",
                 "rope_local_base_freq", "qk_rope_head_dim", "partial_rotary_factor")


def no_rope_reason(cfg: Any) -> str | None:
    """Why the config has no RoPE to extend (ALiBi, absolute or learned positions), or None."""
    cfg = text_config(cfg)
    attn = _get(cfg, "attn_config")  # MPT keeps alibi there
    if _get(cfg, "alibi") or (isinstance(attn, Mapping) and attn.get("alibi")):
        return "alibi = true: ALiBi attention biases, no rotary position embedding"
    kind = _get(cfg, "position_embedding_type")
    if kind not in (None, "rope", "rotary"):
        return f"position_embedding_type = {kind!r}: no rotary position embedding"
    if not any(_get(cfg, key) is not None for key in _NO_ROPE_KEYS):
        return (f"model_type = {_get(cfg, 'model_type')!r}: none of {', '.join(_NO_ROPE_KEYS)} is set (absolute "
                "or learned positions, or ALiBi): no rotary position embedding")
    return None


def rope_facts_from_hf_config(cfg: Any) -> RopeFacts:
    """Read RopeFacts from a transformers PretrainedConfig or a config.json dict (v5 rope_parameters, layer-typed
    ones and legacy rope_scaling / rope_theta; MLA's qk_rope_head_dim; a missing head_dim)."""
    params = rope_parameters(cfg)
    train_len, _ = pretrained_window(cfg)
    max_pos = _get(text_config(cfg), "max_position_embeddings")
    facts = RopeFacts(rope_theta=params["rope_theta"], head_dim=rotary_head_dim(cfg), train_len=train_len,
                      partial_rotary_factor=float(params.get("partial_rotary_factor", 1.0)),
                      max_position_embeddings=None if max_pos is None else int(max_pos),
                      rope_type=params["rope_type"])
    for key, value in (("rope_theta", facts.rope_theta), ("head_dim", facts.head_dim),
                       ("original window (original_max_position_embeddings / max_position_embeddings)",
                        facts.train_len), ("partial_rotary_factor", facts.partial_rotary_factor)):
        if not value > 0:
            raise RopeConfigError(f"{key} must be positive, got {value}")
    return facts


__all__ = ["GLOBAL_LAYER", "global_rope", "local_and_global", "with_global_rope", "MAKER_RECOMMENDED", "SHIPPED_SCALINGS", "MakerScaling", "RopeConfigError", "RopeFacts",
           "layer_typed", "maker_scaling", "no_rope_reason", "pretrained_window", "recommended_scaling",
           "rope_facts_from_hf_config", "rope_parameters", "rotary_head_dim", "scaling_error", "shipped_scaling",
           "text_config"]

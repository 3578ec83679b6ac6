"""What several stages read from the config and from earlier stages' outputs (no stage imports
another stage's module): the tokenizer, the needle template, the toy's pretraining settings, the
saved needle sets."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from longrope2 import corpus, hf_corpus, methods, toy
from longrope2.artifacts import check_model_folder, damaged, first_line, load_tensors, read_json
from longrope2.config import ConfigError, run_dir
from longrope2.needle import NeedleSample, NeedleTemplate, template_for, unstack_samples

BASE = "base"  # the evaluated variant that is the original model (original RoPE, not fine-tuned)
NEEDLE_SET_KEYS = ("input_ids", "answer_mask", "needle_position", "plain_ids")  # a needle_data .pt file


def eval_variants(cfg: DictConfig) -> list[str]:
    """The evaluated models: the original (base) and every method of the experiment, fine-tuned."""
    return [BASE, *(str(m) for m in cfg.methods)]


def eval_dir(cfg: DictConfig, variant: str, suite: str, seed: int | None = None, training_free: bool = False) -> Path:
    """Where stage evaluate writes one (variant, suite): <out_dir>/eval/base/<suite> for the base model
    (shared by every seed), <out_dir>/seed<k>/eval/<method>/<suite> for a fine-tuned one (k: seed, or run_seed),
    <out_dir>/seed<k>/eval_training_free/<method>/<suite> for the method's factors on the base, not fine-tuned."""
    if variant == BASE:
        return Path(cfg.out_dir) / "eval" / variant / suite
    return run_dir(cfg, seed) / ("eval_training_free" if training_free else "eval") / variant / suite


def search_result(cfg: DictConfig, method: str, seed: int | None = None) -> dict[str, Any] | None:
    """result.json of the search a method takes its factors (or critical dim) from; None for a closed-form
    method. A missing file is a ConfigError naming it."""
    search = methods.spec(method).search
    if search is None:
        return None
    path = run_dir(cfg, seed) / "search" / search / "result.json"
    if not path.is_file():
        raise ConfigError(f"method {method!r} takes its factors from search {search!r}: {path} is missing "
                          "(run stage search first; snakemake does)")
    return read_json(path)


def lift_attention_window(config: Any, target_len: int) -> str | None:
    """Lift an attention window shorter than target_len (in place): None = full causal attention.

    Phi-3-mini-4k's config sets sliding_window = 2047, and transformers then masks (and tells flash
    attention) everything more than 2047 tokens back: a needle at the start of a 128k sample would be
    invisible to the search, the fine-tuning and the evaluations. The reference search code sets the
    window to the target length; None also covers the evaluations beyond it. A window >= target_len
    (Phi-3-mini-128k / Phi-4-mini: 262 144) is kept. Returns what changed, or None.
    """
    window = getattr(config, "sliding_window", None)
    if window is None or int(window) >= int(target_len):
        return None
    config.sliding_window = None
    return f"sliding_window {window} -> null (full attention; target_len = {target_len})"


def reset_to_original_rope(config: Any) -> str | None:
    """Drop a RoPE scaling the checkpoint ships with (in place), keeping theta and the rotary share.

    Phi-4-mini-instruct's config.json carries LongRoPE factors to 128k: loaded as it is, the "base" rows
    (original RoPE, the paper's no-scaling reference) would already be extended. Returns what changed, or None.
    """
    params = dict(getattr(config, "rope_parameters", None) or {})
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        return None
    original = {"rope_type": "default", "rope_theta": params["rope_theta"]}
    if "partial_rotary_factor" in params:
        original["partial_rotary_factor"] = params["partial_rotary_factor"]
    config.rope_parameters = original
    return f"rope_type {rope_type} -> default (the checkpoint's own scaling dropped: the original RoPE)"


def prepared_config(path: str, target_len: int, original_rope: bool = False) -> tuple[Any, list[str]]:
    """The checkpoint's config as every stage runs it, and what changed: the attention window lifted to cover
    target_len (lift_attention_window) and, with original_rope (the base model's rows), any RoPE scaling the
    checkpoint ships with dropped (reset_to_original_rope)."""
    from transformers import AutoConfig

    check_model_folder(path)  # every model load (hf or vLLM) starts here: a damaged weights file named first
    config = AutoConfig.from_pretrained(path)
    changes = [lift_attention_window(config, target_len), reset_to_original_rope(config) if original_rope else None]
    return config, [c for c in changes if c]


def load_causal_lm(path: str, target_len: int, original_rope: bool = False, **kwargs: Any) -> Any:
    """AutoModelForCausalLM.from_pretrained(path, **kwargs) on prepared_config(path, ...); the loaded config
    says what was loaded."""
    from transformers import AutoModelForCausalLM

    config, changes = prepared_config(path, target_len, original_rope)
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


def needle_template(cfg: DictConfig) -> NeedleTemplate:
    """data.needle's template; the toy's digits and BOS follow its pretraining."""
    pretrain = cfg.model.pretrain
    toy_base = bool(pretrain.enabled)
    return template_for(
        str(cfg.data.needle.template), int(cfg.data.needle.number_digits),
        distinct_digits=bool(pretrain.get("distinct_digits", False)) if toy_base else False,
        add_bos=bool(pretrain.get("add_bos", True)) if toy_base else True,
    )


def toy_pretrain_settings(cfg: DictConfig) -> toy.ToyPretrainSettings:
    """ToyPretrainSettings from the config: the model shape from model.*, the rest from model.pretrain."""
    arch = cfg.model.arch
    shape = {
        "seq_len": int(cfg.model.train_len),
        "vocab_size": int(arch.vocab_size),
        "hidden_size": int(arch.hidden_size),
        "num_layers": int(arch.num_layers),
        "num_heads": int(arch.num_heads),
        "intermediate_size": int(arch.intermediate_size),
        "head_dim": int(cfg.model.head_dim),
        "rope_theta": float(cfg.model.rope_theta),
        "num_digits": int(cfg.data.needle.number_digits),
    }
    knobs: dict[str, Any] = OmegaConf.to_container(cfg.model.pretrain, resolve=True)
    knobs.pop("enabled")
    accepted = {f.name for f in dataclasses.fields(toy.ToyPretrainSettings)} - set(shape)
    unknown = sorted(set(knobs) - accepted)
    if unknown:
        raise ConfigError(
            f"model.pretrain.{unknown[0]}: unknown setting; accepted: enabled, " + ", ".join(sorted(accepted))
        )
    for key, value in knobs.items():
        if isinstance(value, list):
            knobs[key] = tuple(value)
    return toy.ToyPretrainSettings(**shape, **knobs)


def load_needle_sets(folder: Path) -> dict[str, tuple[list[NeedleSample], torch.Tensor]]:
    """Every needle set stage needle_data wrote: split -> (samples, plain_ids); a size-0 split is absent."""
    meta = read_json(folder / "needle_data.json")
    sets = {}
    for split in ("search", "validation", "validation_short"):
        if split in meta:
            path = folder / f"{split}.pt"
            tensors = load_tensors(path, NEEDLE_SET_KEYS)
            try:
                sets[split] = unstack_samples(tensors, meta[split]["meta"]), tensors["plain_ids"]
            except (ValueError, KeyError, TypeError) as err:  # the two files are not of one run
                raise damaged(path, f"does not match needle_data.json: {first_line(err)}") from None
    return sets


def _txt_folder(path: Any) -> bool:
    """A folder of *.txt books and no dataset shards (docs/data.md, kind 1), as corpora entries detect it."""
    folder = Path(str(path)) if path is not None else None
    return bool(folder and folder.is_dir() and hf_corpus.document_files(folder, ("*.txt",))
                and not hf_corpus.has_shards(folder))


def corpus_parts(cfg: DictConfig) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """data.corpus as (training, held-out) named documents, split by cfg.seed; no held-out part when
    data.corpus.heldout_fraction is 0. Missing or empty corpora are a ConfigError."""
    c = cfg.data.corpus
    if c.source == "datasets" and not _txt_folder(c.path):  # a hub id or a dataset folder (errors name their keys)
        docs = hf_corpus.named_documents(hf_corpus.spec_from(c, "data.corpus"))
    elif c.source == "datasets":  # a folder of *.txt books overriding a preset's hub id: read as source folder
        docs = corpus.load_named_documents("folder", c.path)
    else:
        try:
            docs = corpus.load_named_documents(str(c.source), c.path)
        except ValueError as err:
            raise ConfigError(f"data.corpus: {err}") from None
    if float(c.heldout_fraction) == 0:
        return docs, []
    return corpus.split_documents(docs, float(c.heldout_fraction), int(cfg.seed))

"""Reading what an earlier stage wrote: a damaged file stops the reading stage with one clear message.

A crash, a full disk or a hand edit can leave a stage output truncated, empty or half written, and its
reader would fail deep inside json / torch / numpy / safetensors, or carry on with what it got. Readers of
stage outputs go through these functions instead: a damaged file is a DamagedInputError naming the file,
what is wrong and the Snakemake rule that writes it. It is a ConfigError, so a stage's `main`
(config.hydra_stage) prints it and exits with status 2, without a traceback.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from longrope2.core.checkpoint import maker_rope
from longrope2.core.config import run_dir
from longrope2.core.errors import ConfigError
from longrope2.rope import methods

# Output folder -> the rule that writes it (workflow/rules/*.smk), for folders a name alone identifies.
FOLDER_RULES = {"base_model": "pretrain", "pretrain": "pretrain", "critical_dim": "critical_dim",
                "eval_data": "eval_data"}


# Folders of one replicate, directly under seed<k>/: the per-seed stages' outputs.
SEED_FOLDER_RULES = {"needle_data": "needle_data", "train_data": "train_data", "search": "search", "train": "train",
                     "eval": "evaluate", "eval_training_free": "evaluate_training_free"}


SEED_FOLDER = re.compile(r"seed\d+")


MAX_DETAIL = 200  # characters of the underlying error kept in the message


class DamagedInputError(ConfigError):
    """An earlier stage's output that cannot be used as it is (missing, truncated, empty, unreadable)."""


def writer_rule(path: str | Path) -> str | None:
    """The rule that writes `path`, from its folders (nearest first); None for a file no rule writes
    (model.path of a paper experiment, a file outside the results)."""
    parts = Path(path).parts
    for i in range(len(parts) - 2, -1, -1):  # the folders holding the file, innermost first
        name = parts[i]
        if name == "eval" and i + 1 < len(parts) - 1 and parts[i + 1] in ("base", "shipped"):
            # <out_dir>/eval/{base,shipped}/: the base checkpoint's evaluations, shared by the seeds
            return f"evaluate_{parts[i + 1]}"
        if name in SEED_FOLDER_RULES and i > 0 and SEED_FOLDER.fullmatch(parts[i - 1]):
            return SEED_FOLDER_RULES[name]
        if name in FOLDER_RULES:
            return FOLDER_RULES[name]
    return None


def damaged(path: str | Path, problem: str) -> DamagedInputError:
    """The error for a damaged `path`: what is wrong and how to make the file again."""
    rule = writer_rule(path)
    if rule is None:
        return DamagedInputError(f"damaged input {path} ({problem}); no rule of the workflow writes it: "
                                 "restore or replace it")
    return DamagedInputError(f"damaged input {path} ({problem}); it is written by rule {rule}: delete it and "
                             f"rerun, e.g. snakemake --cores 2 --forcerun {rule}")


def first_line(err: BaseException) -> str:
    """The first line of an error's message (its type when it has none), cut to MAX_DETAIL characters."""
    lines = str(err).strip().splitlines()
    line = lines[0] if lines else type(err).__name__
    return line if len(line) <= MAX_DETAIL else line[: MAX_DETAIL - 3] + "..."


def _check_keys(path: Path, data: dict[str, Any], keys: Sequence[str]) -> None:
    absent = [k for k in keys if k not in data]
    if absent:
        raise damaged(path, f"lacks {', '.join(repr(k) for k in absent)}")


def read_json(path: str | Path, keys: Sequence[str] = ()) -> dict[str, Any]:
    """A JSON object a stage wrote (write_json), with `keys` present; DamagedInputError if it is missing,
    empty, not JSON or not an object."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise damaged(path, "missing") from None
    except (OSError, ValueError) as err:  # ValueError: not UTF-8
        raise damaged(path, f"cannot be read: {first_line(err)}") from None
    if not text.strip():
        raise damaged(path, "empty")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise damaged(path, f"invalid JSON: {first_line(err)}") from None
    if not isinstance(data, dict):
        raise damaged(path, f"not a JSON object but a {type(data).__name__}")
    _check_keys(path, data, keys)
    return data


def load_tensors(path: str | Path, keys: Sequence[str] = ()) -> dict[str, Any]:
    """A dict a stage saved with torch.save, loaded with weights_only=True, with `keys` present;
    DamagedInputError if it is missing, truncated or not such a dict."""
    path = Path(path)
    if not path.is_file():
        raise damaged(path, "missing")
    try:
        data = torch.load(path, weights_only=True)
    except Exception as err:  # noqa: BLE001 - whatever torch.load raises (zip, pickle, EOF), the file is unusable
        raise damaged(path, f"cannot be read: {first_line(err)}") from None
    if not isinstance(data, dict):
        raise damaged(path, f"not a dict of tensors but a {type(data).__name__}")
    _check_keys(path, data, keys)
    return data


def check_model_folder(path: str | Path) -> None:
    """A local model folder's config.json and safetensors weights read far enough to know they are whole:
    valid JSON, every weights file's header and size (safetensors keeps no checksum: flipped bytes inside a
    tensor go unnoticed). A hub id (no local folder) is left to transformers."""
    from safetensors import SafetensorError, safe_open

    folder = Path(path)
    if not folder.is_dir():
        return
    if (folder / "config.json").is_file():
        read_json(folder / "config.json")
    index = folder / "model.safetensors.index.json"
    shards = set(read_json(index, ("weight_map",))["weight_map"].values()) if index.is_file() else set()
    for name in sorted(shards):
        if not (folder / name).is_file():
            raise damaged(folder / name, f"missing ({index.name} lists it)")
    for weights in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(weights), framework="pt"):
                pass
        except SafetensorError as err:
            raise damaged(weights, f"cannot be read: {first_line(err)}") from None


BASE = "base"  # the evaluated variant that is the original model (original RoPE, not fine-tuned)
# the evaluated variant that is the base checkpoint, not fine-tuned, with its maker's own RoPE scaling (the one
# it ships, or the one its maker recommends: core.checkpoint.maker_rope); only where one exists
SHIPPED = "shipped"
SHARED_VARIANTS = (BASE, SHIPPED)  # evaluated once, shared by every seed: <out_dir>/eval/<variant>/


def eval_variants(cfg: DictConfig) -> list[str]:
    """The evaluated models: the original (base), the maker's setting (shipped) where the experiment has one,
    and every method of the experiment, fine-tuned."""
    return [BASE, *([SHIPPED] if maker_rope(cfg) is not None else []), *(str(m) for m in cfg.methods)]


def eval_dir(cfg: DictConfig, variant: str, suite: str, seed: int | None = None, training_free: bool = False) -> Path:
    """Where stage evaluate writes one (variant, suite): <out_dir>/eval/{base,shipped}/<suite> for the base
    checkpoint (shared by every seed), <out_dir>/seed<k>/eval/<method>/<suite> for a fine-tuned one (k: seed, or
    run_seed), <out_dir>/seed<k>/eval_training_free/<method>/<suite> for the method's factors on the base, not
    fine-tuned."""
    if variant in SHARED_VARIANTS:
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

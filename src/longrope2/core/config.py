"""Compose and validate the pipeline configuration.

The Snakefile and every stage compose the same Hydra config (``conf/``) with the same overrides
and validate it against ``workflow/schemas/config.schema.json`` before any compute, so a bad
value fails once, early, with the key, the value and what is accepted.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jsonschema
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    OmegaConfBaseException,
)

from longrope2.core.checks import semantic_errors
from longrope2.core.checkpoint import fill_model_facts
from longrope2.core.errors import ConfigError

REPO_ROOT = Path(os.environ.get("LONGROPE2_ROOT", Path(__file__).resolve().parents[3]))


CONF_DIR = REPO_ROOT / "conf"


SCHEMA_PATH = REPO_ROOT / "workflow" / "schemas" / "config.schema.json"


CONFIG_GROUPS = ("model", "data", "search", "train", "eval", "experiment")


PAPER_TARGET = 131072  # the paper's L: its evaluation lengths and length buckets scale by L / this (docs/models.md)


def paper_lengths(target_len: int) -> list[int]:
    """The paper's evaluation lengths (4k ... 128k at L = 128k) at L: L/32, L/16, ..., L."""
    return [int(target_len) >> k for k in range(5, -1, -1)]


def paper_length_mix(train_len: int, target_len: int) -> list[dict[str, int]]:
    """The paper's fine-tuning mix (Table 1: 3B tokens <= L_train, 3B up to 100k, 4B up to 200k at L = 128k), its
    bucket bounds scaled by L / 128k; a middle bound at or below L_train is dropped (its tokens join the last)."""
    middle = round(100_000 * int(target_len) / PAPER_TARGET)
    last = round(200_000 * int(target_len) / PAPER_TARGET)
    if middle <= int(train_len):
        return [{"max_len": int(train_len), "tokens": 3_000_000_000}, {"max_len": last, "tokens": 7_000_000_000}]
    return [{"max_len": int(train_len), "tokens": 3_000_000_000}, {"max_len": middle, "tokens": 3_000_000_000},
            {"max_len": last, "tokens": 4_000_000_000}]


OmegaConf.register_new_resolver("paper_lengths", paper_lengths, replace=True)
OmegaConf.register_new_resolver("paper_length_mix", paper_length_mix, replace=True)


def available(group: str) -> list[str]:
    """Names of the options of a config group (the YAML files in conf/<group>/)."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _check_group_choices(overrides: Sequence[str]) -> None:
    # Hydra's own message for a missing option is long; ours names key, value and choices.
    for override in overrides:
        key, sep, value = override.lstrip("+~").partition("=")
        if sep and key == "search.preset":  # the label of the chosen group option, not a switch
            raise ConfigError(f"search.preset={value!r}: the preset is the config group `search`; select it with "
                              f"search={value} (accepted: {', '.join(available('search'))})")
        if sep and key in CONFIG_GROUPS and value not in available(key):
            raise ConfigError(
                f"{key}={value!r} is not a known {key}; accepted: {', '.join(available(key))}"
            )


def compose_config(overrides: Sequence[str] = ()) -> DictConfig:
    """Compose conf/config.yaml with Hydra overrides, resolve and validate it."""
    overrides = list(overrides)
    _check_group_choices(overrides)
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            cfg = compose(config_name="config", overrides=overrides)
    except MissingConfigException as err:
        raise ConfigError(str(err)) from None
    except (ConfigCompositionException, OmegaConfBaseException) as err:
        cause = err.__cause__ or err
        if isinstance(cause, (ConfigKeyError, ConfigAttributeError)):
            raise ConfigError(
                f"unknown config key '{cause.full_key}' in overrides {overrides}; accepted: the "
                "keys of conf/ (see README: configuration), or '+key=value' to add a new one"
            ) from None
        raise ConfigError(f"bad override in {overrides}: {cause}") from None
    fill_model_facts(cfg)
    validate(cfg)
    return cfg


def to_dict(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """The resolved config as plain Python data, without Hydra's own section."""
    data = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    data.pop("hydra", None)
    return data


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text())


def _accepted(err: jsonschema.ValidationError) -> str:
    rule, bound = err.validator, err.validator_value
    words = {
        "minimum": f"a value >= {bound}",
        "exclusiveMinimum": f"a value > {bound}",
        "maximum": f"a value <= {bound}",
        "exclusiveMaximum": f"a value < {bound}",
        "minItems": f"a list of at least {bound} item(s)",
        "maxItems": f"a list of at most {bound} item(s)",
        "uniqueItems": "a list without repeated items",
        "pattern": f"a string matching {bound}",
    }
    if rule == "enum":
        return ", ".join(json.dumps(v) if not isinstance(v, str) else v for v in bound)
    if rule == "type":
        return f"a value of type {bound if isinstance(bound, str) else ' or '.join(bound)}"
    if rule in words:
        return words[rule]
    if rule in ("anyOf", "oneOf"):
        return " or ".join(_describe_schema(s) for s in bound)
    return err.message


def _describe_schema(schema: Mapping[str, Any]) -> str:
    if "enum" in schema:
        return "one of " + ", ".join(json.dumps(v) if not isinstance(v, str) else v for v in schema["enum"])
    if schema.get("type") == "array" and "enum" in schema.get("items", {}):
        return "a list of " + ", ".join(map(str, schema["items"]["enum"]))
    if "const" in schema:
        return json.dumps(schema["const"])
    parts = [str(schema.get("type", "value"))]
    for key, word in (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<=")):
        if key in schema:
            parts.append(f"{word} {schema[key]}")
    return " ".join(parts)


def schema_errors(data: Mapping[str, Any]) -> list[str]:
    """One line per schema violation: the key, the value, what is accepted."""
    validator = jsonschema.Draft202012Validator(_schema())
    lines = []
    for err in sorted(validator.iter_errors(data), key=lambda e: list(map(str, e.absolute_path))):
        key = ".".join(map(str, err.absolute_path)) or "<config>"
        if err.validator == "required":
            missing = err.message.split("'")[1]
            lines.append(f"{key}.{missing}: required key is missing".lstrip("<config>."))
        elif err.validator == "additionalProperties":
            lines.append(f"{key}: {err.message}")
        else:
            lines.append(f"{key} = {json.dumps(err.instance)}: accepted: {_accepted(err)}")
    return lines


def run_seed(cfg: DictConfig) -> int:
    """The replicate seed of a per-seed stage (needle_data, search, train_data, train, evaluate)."""
    return int(cfg.seeds[0] if cfg.run_seed is None else cfg.run_seed)


def run_dir(cfg: DictConfig, seed: int | None = None) -> Path:
    """<out_dir>/seed<k>: the outputs of one replicate (default: the stage's own, run_seed)."""
    return Path(cfg.out_dir) / f"seed{run_seed(cfg) if seed is None else int(seed)}"


def validate(cfg: DictConfig | Mapping[str, Any]) -> None:
    """Raise ConfigError listing every invalid key of a composed config."""
    try:
        data = to_dict(cfg)
    except OmegaConfBaseException as err:
        raise ConfigError(f"config cannot be resolved: {err}") from None
    lines = schema_errors(data)
    if not lines:
        lines = semantic_errors(data)
    if lines:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines))


def _hydra_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_hydra_value(v) for v in value) + "]"
    return str(value)


def overrides_from_snakemake(config: Mapping[str, Any]) -> list[str]:
    """Turn `snakemake --config key=value ...` into Hydra overrides, in a stable order.

    Every key is a Hydra key (`experiment=llama3_8b_128k`, `search.population=32`); the extra
    key `overrides` takes a list of raw Hydra overrides (e.g. `+model.arch.new_key=1`).
    """
    flat = flatten({k: v for k, v in config.items() if k != "overrides"})
    out = [f"{key}={_hydra_value(value)}" for key, value in flat.items()]
    raw = config.get("overrides") or []
    out.extend([raw] if isinstance(raw, str) else list(raw))
    return out


def hydra_stage(run: Callable[[DictConfig], Any]) -> Callable[[], None]:
    """The `main` of a stage module: Hydra composes conf/ with the command-line overrides,
    the config is validated, then `run(cfg)` does the work. A ConfigError (here or raised by
    the stage before its compute) exits with status 2 and the message, without a traceback."""
    import hydra

    @hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="config")
    def _main(cfg: DictConfig) -> None:
        try:
            fill_model_facts(cfg)
            validate(cfg)
            run(cfg)
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)

    def main() -> None:
        try:
            _check_group_choices([arg for arg in sys.argv[1:] if not arg.startswith("-")])
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        _main()

    return main

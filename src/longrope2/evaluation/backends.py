"""eval.backend: how stage evaluate runs the suites that go through lm-eval (ruler, longbench, short).

hf:   lm-eval's HFLM around the model loaded in-process (transformers; the RoPE switch per forward).
vllm: lm-eval's `vllm` model on a checkpoint folder: a fine-tuned variant's exported folder as it is; the
      base, the training-free rows and the `shipped` variant's recommended scaling a scratch folder whose
      config.json carries the RoPE the hf backend applies in-process (original RoPE / the method's / the maker's
      rope_parameters), the other files symlinked.
      vLLM (>= VLLM_MIN) gives a LongRoPE engine one factor set, the short factors iff its max_model_len <=
      original_max_position_embeddings: a `longrope` checkpoint runs on one engine per factor regime (regimes:
      the samples up to that length on an engine whose max_model_len stays within it, the longer ones on
      another), as the hf path switches per forward; any other RoPE on one engine.
      niah and ppl score logits of an HF model and need the hf path in any case.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from packaging.version import InvalidVersion, Version

from longrope2.core.checks import LM_EVAL_SUITES
from longrope2.core.errors import ConfigError

# The first vLLM release after PR 27431's merge (week of 2025-10-25 to 31; v0.11.0 came out 2025-10-02).
VLLM_MIN = "0.11.1"


VLLM_WHY = ("vLLM issue 27414, fixed by PR 27431: before it, LongRoPE's short/long factor switch went per request "
            "and produced random tokens past original_max_position_embeddings; since it, the factors are chosen "
            "once from max_model_len")


def vllm_version_error() -> str | None:
    """Why the installed vLLM cannot run the evaluations (missing or older than VLLM_MIN), or None."""
    try:
        installed = metadata.version("vllm")
    except metadata.PackageNotFoundError:
        return (f"eval.backend = vllm: vllm is not installed; accepted: vllm >= {VLLM_MIN} ({VLLM_WHY}); "
                "install it on a GPU node with pip install -e \".[vllm]\"")
    try:
        too_old = Version(installed) < Version(VLLM_MIN)
    except InvalidVersion:
        too_old = True
    if too_old:
        return f"eval.backend = vllm: vllm {installed} is installed; accepted: vllm >= {VLLM_MIN} ({VLLM_WHY})"
    return None


def check_vllm() -> None:
    """ConfigError unless vllm >= VLLM_MIN is installed (called before any model loads)."""
    error = vllm_version_error()
    if error:
        raise ConfigError(error)


def max_model_len(cfg: DictConfig, suite: str) -> int:
    """The suite's longest sample, prompt and generation together (RULER and LongBench reserve the answer's
    tokens within the length; the short tasks are truncated to eval.short.window)."""
    e = cfg.eval
    lengths = {"ruler": lambda: max(int(x) for x in e.ruler.lengths), "longbench": lambda: int(e.longbench.max_length),
               "short": lambda: int(e.short.window)}
    if suite not in lengths:
        raise ConfigError(f"eval.suite = {suite!r} with eval.backend = vllm: accepted: {', '.join(LM_EVAL_SUITES)}")
    return lengths[suite]()


def vllm_model_args(cfg: DictConfig, pretrained: str, suite: str, add_bos_token: bool,
                    length: int | None = None) -> dict[str, Any]:
    """lm-eval's VLLM arguments for one engine of a suite: tensor parallel over the evaluate rule's GPUs,
    max_model_len `length` (the longest sample the engine runs; None: the suite's longest), greedy runs seeded
    by the experiment's seed; vLLM schedules the batch. A prompt that overshoots its length (RULER's
    generators are not exact) loses tokens in its middle, not its BOS."""
    gpus = int(cfg.resources.evaluate.gpu)
    if gpus < 1:
        raise ConfigError(f"resources.evaluate.gpu = {gpus} with eval.backend = vllm: accepted: >= 1 "
                          "(vLLM runs on GPUs; eval.backend = hf runs on the CPU)")
    window = max_model_len(cfg, suite) if length is None else int(length)
    return {"pretrained": pretrained, "tokenizer": pretrained, "dtype": str(cfg.model.dtype),
            "tensor_parallel_size": gpus, "max_model_len": window, "batch_size": "auto",
            "seed": int(cfg.seed), "add_bos_token": add_bos_token, "truncation_side": "middle"}


@dataclasses.dataclass(frozen=True)
class VllmModel:
    """What the vllm backend loads: a checkpoint folder, the facts the results record, and where a `longrope`
    config's factors switch."""

    path: str
    rope_type: str
    changes: tuple[str, ...] = ()
    # a `longrope` config's original_max_position_embeddings: an engine whose max_model_len is within it gets
    # the short factors, else the long ones (None: the factors do not depend on the length)
    switch_len: int | None = None


def regimes(model: VllmModel, lengths: Iterable[int]) -> list[list[int]]:
    """The sample lengths (prompt + generation, as max_model_len counts them) grouped per vLLM engine, each
    engine's max_model_len its group's largest: for a `longrope` checkpoint the lengths <= switch_len (vLLM:
    the short factors, as the hf path's switch gives them: max(position_ids) + 1 <= that length) and the
    longer ones (the long factors), short first; for any other RoPE, one group."""
    ordered = sorted({int(x) for x in lengths})
    if model.switch_len is None:
        return [ordered] if ordered else []
    groups = [[x for x in ordered if x <= model.switch_len], [x for x in ordered if x > model.switch_len]]
    return [group for group in groups if group]


def local_folder(path: str) -> Path:
    """model.path as a folder: a local one, or a hub id's snapshot in the local cache (nothing downloaded)."""
    if Path(path).is_dir():
        return Path(path).resolve()
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(path, local_files_only=True))
    except Exception as err:  # noqa: BLE001 - any miss: not cached, bad id
        raise ConfigError(f"model.path = {path!r}: no local folder or cached hub snapshot ({err}); accepted: a "
                          "local model folder or a hub id already downloaded") from None


def engine_config(path: str, target_len: int, length: int, original_rope: bool,
                  scaling: Callable[[Any], Any] | None = None,
                  rope_parameters: dict[str, Any] | None = None) -> tuple[Any, list[str]]:
    """The checkpoint's config as the hf backend would run it, and what changed: the attention window lifted,
    with original_rope its own RoPE scaling dropped, rope_parameters written in (the `shipped` variant's
    recommended scaling: lm.loading.prepared_config, as the hf path), scaling(config)'s rope_parameters
    (training-free: the method's RopeScaling on that config), and a max_position_embeddings below `length`
    raised to it (vLLM refuses a max_model_len beyond it)."""
    from longrope2.lm.loading import prepared_config

    config, changes = prepared_config(path, target_len, original_rope, rope_parameters)
    if scaling is not None:
        rope = scaling(config)
        rope.update_hf_config(config)
        changes.append(f"rope_parameters -> {rope.method} ({config.rope_parameters.get('rope_type', 'default')})")
    rope_type = (config.rope_parameters or {}).get("rope_type", "default")
    if rope_type == "longrope":
        changes.append(pin_longrope_mscale(config))
    if int(config.max_position_embeddings) < length:
        if rope_type in ("longrope", "yarn"):  # vLLM sizes their cos/sin tables from the scaling itself
            raise ConfigError(f"max_model_len {length} > max_position_embeddings {config.max_position_embeddings} "
                              f"of {path} ({rope_type}); accepted: eval lengths <= {config.max_position_embeddings}")
        changes.append(f"max_position_embeddings {config.max_position_embeddings} -> {length}")
        config.max_position_embeddings = length
    return config, [c for c in changes if c]


def vllm_longrope_mscale(max_position: int, original: int) -> float:
    """The attention factor vLLM's LongRoPE derives when the config names none (it ignores attention_factor)."""
    scale = max_position / original
    return 1.0 if scale <= 1.0 else math.sqrt(1 + math.log(scale) / math.log(original))


def longrope_original(config: Any) -> int:
    """A `longrope` config's original_max_position_embeddings (its rope_parameters' copy first, as vLLM reads it)."""
    params = config.rope_parameters
    return int(params.get("original_max_position_embeddings") or config.original_max_position_embeddings)


def pin_longrope_mscale(config: Any) -> str | None:
    """vLLM reads short_mscale / long_mscale, not attention_factor: a declared attention factor other than
    vLLM's derivation is written into both (in place). Returns what changed, or None."""
    params = config.rope_parameters
    original = longrope_original(config)
    derived = vllm_longrope_mscale(int(config.max_position_embeddings), original)
    declared = float(params.get("attention_factor") or derived)
    if math.isclose(declared, derived, rel_tol=1e-6) or "long_mscale" in params:
        return None
    params["short_mscale"] = params["long_mscale"] = declared
    return f"short_mscale = long_mscale = {declared:.6g} (attention_factor; vLLM would derive {derived:.6g})"


def prepare_checkpoint(path: str, target_len: int, length: int, scratch: Path, original_rope: bool,
                       scaling: Callable[[Any], Any] | None = None,
                       rope_parameters: dict[str, Any] | None = None) -> VllmModel:
    """The folder vLLM loads: `path` itself when its config needs no change (a fine-tuned variant, as
    exported; the `shipped` variant of a checkpoint that ships its scaling), else scratch/model: engine_config's
    config.json and symlinks to every other file of `path`."""
    config, changes = engine_config(path, target_len, length, original_rope, scaling, rope_parameters)
    rope_type = (config.rope_parameters or {}).get("rope_type", "default")
    switch_len = longrope_original(config) if rope_type == "longrope" else None
    if not changes:
        return VllmModel(str(path), rope_type, switch_len=switch_len)
    source, folder = local_folder(path), scratch / "model"
    folder.mkdir(parents=True)
    for entry in source.iterdir():
        if entry.name != "config.json":
            (folder / entry.name).symlink_to(entry.resolve())
    config.save_pretrained(folder)
    return VllmModel(str(folder), rope_type, tuple(changes), switch_len)


def vllm_harness(model: VllmModel, cfg: DictConfig, suite: str, add_bos_token: bool,
                 length: int | None = None) -> Any:
    """lm-eval's VLLM on the prepared checkpoint, max_model_len `length` (vllm >= VLLM_MIN checked first)."""
    check_vllm()
    from lm_eval.models.vllm_causallms import VLLM

    return VLLM(**vllm_model_args(cfg, model.path, suite, add_bos_token, length))


def shutdown_engine(lm: Any) -> None:
    """Free an lm-eval VLLM's engine before another starts (each takes its share of the GPUs' memory): its
    engine core (V1: a process, which takes its tensor-parallel workers along) shut down, the LLM dropped."""
    import gc

    import torch

    engine = getattr(lm, "model", None)
    core = getattr(getattr(engine, "llm_engine", None), "engine_core", None)
    if core is not None:
        core.shutdown()
    if engine is not None:
        lm.model = None
    del engine, core  # the last references here: the collection below frees the engine's CUDA tensors
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def vllm_engine(model: VllmModel, cfg: DictConfig, suite: str, add_bos_token: bool, length: int) -> Iterator[Any]:
    """vllm_harness(...) for the with block, its engine shut down when the block ends (shutdown_engine)."""
    lm = vllm_harness(model, cfg, suite, add_bos_token, length)
    try:
        yield lm
    finally:
        shutdown_engine(lm)


def lm_generate(make_lm: Callable[[], Any]) -> Callable[[str, int], str]:
    """generate(prompt, max_new_tokens) -> continuation through an lm-eval model's generate_until (greedy);
    the model is made by make_lm() at the first prompt."""
    from lm_eval.api.instance import Instance

    made: list[Any] = []

    def generate(prompt: str, max_new_tokens: int) -> str:
        if not made:
            made.append(make_lm())
        request = Instance(request_type="generate_until", doc={}, idx=0,
                           arguments=(prompt, {"until": [], "max_gen_toks": max_new_tokens, "do_sample": False,
                                               "temperature": 0.0}))
        return made[0].generate_until([request], disable_tqdm=True)[0]

    return generate

"""Fine-tuning checkpoints: accelerate's state, saved whole or not at all; the export."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from longrope2.core import resume
from longrope2.core.outputs import write_json
from longrope2.rope.scaling import RopeScaling


def latest_checkpoint(folder: Path) -> Path | None:
    """The last complete checkpoint of this state version (core.resume: another version starts fresh)."""
    done = sorted(p for p in folder.glob("step-*") if (p / "trainer.json").is_file()
                  and json.loads((p / "trainer.json").read_text()).get("version") == resume.STATE_VERSION)
    return done[-1] if done else None


def save_checkpoint(accelerator: Any, folder: Path, step: int, history: list[dict[str, Any]], wall: float) -> None:
    """accelerate's save_state into a scratch folder, renamed when complete; older checkpoints removed."""
    final = folder / f"step-{step:08d}"
    scratch = folder / f".step-{step:08d}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(scratch))
    accelerator.wait_for_everyone()  # every process has written its part (its random states)
    if accelerator.is_main_process:
        write_json(scratch / "trainer.json", {"version": resume.STATE_VERSION, "step": step, "history": history,
                                              "wall_s": wall})
        scratch.rename(final)
        for old in folder.glob("step-*"):
            if old != final:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()


def export_model(accelerator: Any, model: nn.Module, tokenizer: Any, scaling: RopeScaling, cfg: DictConfig,
                 folder: Path) -> None:
    """The fine-tuned weights under the longrope config, as a plain transformers model directory."""
    state = accelerator.get_state_dict(model)  # full weights on the main process (FSDP too)
    if not accelerator.is_main_process:
        return
    lm = accelerator.unwrap_model(model).lm
    scaling.update_hf_config(lm.config)
    dtype = getattr(torch, str(cfg.model.dtype))
    lm.config.dtype = dtype
    lm.config.use_cache = True  # off during training only; generation with the checkpoint caches
    weights = {k.removeprefix("lm."): v.to(dtype) for k, v in state.items()}
    lm.save_pretrained(folder, state_dict=weights)
    tokenizer.save_pretrained(folder)

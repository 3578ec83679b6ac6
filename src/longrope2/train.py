"""Stage `train`: mixed context window fine-tuning (docs/method.md §6), then the model as a Hugging Face checkpoint.

In:  the base model (model.path), train.method and its factors (longrope2.methods: closed form for none /
     pi / ntk / yarn; <out_dir>/seed<k>/search/<search>/result.json for the searched methods and for the
     critical dim of ntk_rcd / yarn_rcd), the replicate's rows (stage train_data) and held-out needle sets
     (stage needle_data), k = run_seed, train.* (optimiser, schedule, batch, execution).
Out: <out_dir>/seed<k>/train/<method>/
       model/            a standard model directory: weights, tokenizer, config with the method's
                         rope_parameters: LongRoPE family {rope_type: longrope, short_factor ones
                         (longrope2_no_mixed: = long_factor), long_factor, original_max_position_embeddings
                         L_train, attention_factor}; pi: linear; ntk: default with its base; yarn: yarn;
                         max_position_embeddings L
       loss.csv          per step: loss (all rows), short_loss, long_loss, lr, grad_norm, tokens/s
       loss.png          the loss curves
       validation.json   held-out needle exact match and needle-PPL at L_train and at L: the base model
                         (original RoPE) against this model loaded back with from_pretrained
       train.json        steps, rows, tokens, wall time, throughput, the factors, the variant
     Checkpoints every train.checkpoint_every steps in <out_dir>/seed<k>/checkpoints/train-<method>-<hash>/
     (accelerate's save_state: weights, AdamW, schedule): a killed run resumes at the last one and
     continues the same loss curve; they are deleted once the outputs are written.

Every method gets this same fine-tuning (the paper's fairness rule). For the LongRoPE family the model is
the base model with its config's rope_parameters set to the longrope factors, so every forward pass uses
transformers' own switch: long factors iff max(position_ids) + 1 > L_train.
Short rows (documents packed, positions restarting per document) therefore use the short factors (ones)
and long rows (positions 0 ... L-1) the long ones; short and long rows go in separate forward passes.
transformers' longrope multiplies cos/sin by the attention factor on BOTH paths (as Phi-3 does), so the
fine-tuning trains the short path exactly as the exported model will run it. longrope2_no_mixed (Table 7)
sets short_factor = long_factor, and the static methods have one scaling: every row then uses it.

Loss: the weighted token mean over every scored token of the global batch (answer tokens of the toy's
exercises weigh data.train_set.answer_loss_weight, others 1; labels never cross documents of a short
row). Each process scales its sum by world / global weight, so that DDP's gradient average equals the
one-process gradient: N processes give the loss curve of 1 (gloo on CPUs, NCCL on GPUs).

    python -m longrope2.train experiment=toy
    torchrun --standalone --nproc_per_node 8 -m longrope2.train experiment=llama3_8b_128k ...

Several nodes: srun starts one torchrun per node (c10d rendezvous; longrope2.launch, docs/cluster.md);
ranks are global (outputs, checkpoints' metadata and tracking from rank 0), devices local (LOCAL_RANK).
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor, nn
from tqdm.auto import tqdm

from longrope2.core import resume
from longrope2.core.artifacts import read_json
from longrope2.core.config import hydra_stage, run_dir, run_seed, to_dict
from longrope2.core.errors import ConfigError
from longrope2.core.outputs import atomic_dir, write_json
from longrope2.core.processes import torch_threads
from longrope2.core.tracking import StageRun, stage_run
from longrope2.data.rows import Rows
from longrope2.lm.loading import load_base_model, load_tokenizer
from longrope2.reporting.figures import plot_loss
from longrope2.rope import methods
from longrope2.rope.hf_config import RopeFacts
from longrope2.rope.scaling import RopeScaling
from longrope2.training.checkpoint import (
    export_model,
    latest_checkpoint,
    save_checkpoint,
)
from longrope2.training.mixed import row_weight_total, step_rows
from longrope2.training.parallel import Layout
from longrope2.training.step import (
    SCHEDULES,
    ChunkedLossLM,
    TrainingDiverged,
    make_accelerator,
    train_step,
    write_loss_csv,
)
from longrope2.training.validation import validate


def search_result_path(cfg: DictConfig) -> Path | None:
    """result.json of the search train.method takes its factors or critical dim from (None: closed form)."""
    search = methods.spec(str(cfg.train.method)).search
    return None if search is None else run_dir(cfg) / "search" / search / "result.json"


def method_scaling(cfg: DictConfig, facts: RopeFacts) -> RopeScaling:
    path = search_result_path(cfg)  # checked before any compute in _run
    result = None if path is None else read_json(path)
    return methods.method_scaling(str(cfg.train.method), facts, int(cfg.target_len), result)


def check_config(cfg: DictConfig, layout: Layout, rows: Rows) -> None:
    t = cfg.train
    if layout.world % layout.cp:
        raise ConfigError(f"train.context_parallel = {layout.cp}: accepted: a divisor of the number of processes "
                          f"({layout.world})")
    if int(t.global_batch) % layout.dp_world:
        raise ConfigError(f"train.global_batch = {t.global_batch}: accepted: a multiple of the data-parallel "
                          f"groups (processes / context_parallel = {layout.dp_world})")
    if rows.length != int(cfg.target_len):
        raise ConfigError(f"target_len = {cfg.target_len} but the train_data rows have {rows.length} tokens: "
                          "rerun stage train_data")
    if len(rows) * int(t.epochs) < int(t.global_batch):
        raise ConfigError(f"train.global_batch = {t.global_batch}: accepted: at most rows x epochs = "
                          f"{len(rows)} x {t.epochs} (stage train_data made {len(rows)} rows)")


def fingerprint(cfg: DictConfig, scaling: RopeScaling) -> str:
    """Everything that shapes the loss curve: a changed setting, scaling or input starts a fresh run (core.resume)."""
    data = to_dict(cfg)
    knobs = {k: v for k, v in data["train"].items()
             if k not in ("processes", "num_threads", "checkpoint_every", "log_every", "validation_batch_size")}
    return resume.fingerprint({"train": knobs, "seed": run_seed(cfg), "target_len": data["target_len"],
                               "model": str(cfg.model.path), "rope_parameters": scaling.to_rope_parameters()},
                              [run_dir(cfg) / "train_data" / "train_data.json"])


def run(cfg: DictConfig) -> dict[str, Any]:
    with torch_threads(cfg.train.num_threads):
        return _run(cfg)


@dataclass
class Fit:
    """One fine-tuning as prepared: the rows, the processes, the wrapped model and its optimiser."""

    rows: Rows
    accelerator: Any
    layout: Layout
    cp_mesh: Any
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaling: RopeScaling
    mask_dtype: torch.dtype
    steps: int


def prepare(cfg: DictConfig) -> Fit:
    """Every input checked, then the base model under the method's rope_parameters, wrapped for the processes."""
    from transformers import get_scheduler

    method = str(cfg.train.method)
    rows = Rows(run_dir(cfg) / "train_data")
    path = search_result_path(cfg)
    if path is not None and not path.is_file():
        raise ConfigError(f"train.method = {method}: {path} is missing; run stage search "
                          f"(search.method={path.parent.name}) first")
    accelerator = make_accelerator(cfg)
    layout = Layout(accelerator.num_processes, accelerator.process_index, int(cfg.train.context_parallel))
    check_config(cfg, layout, rows)
    cp_mesh = None
    if layout.cp > 1:  # groups of cp consecutive ranks share rows and shard long rows among them
        from torch.distributed.device_mesh import init_device_mesh

        cp_mesh = init_device_mesh(accelerator.device.type, (layout.dp_world, layout.cp),
                                   mesh_dim_names=("dp", "cp"))["cp"]
    # fp32 master weights; on GPUs bf16 autocast (accelerate's mixed precision), whose attention
    # takes the document masks in its own dtype
    lm, facts = load_base_model(cfg, torch.float32, attn_implementation=str(cfg.train.attn_implementation))
    mask_dtype = torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float32
    scaling = method_scaling(cfg, facts)
    scaling.apply_to_model(lm)  # the method's rope_parameters (longrope: transformers' own switch) from here on
    if bool(cfg.train.gradient_checkpointing):
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lm.config.use_cache = False
    model = ChunkedLossLM(lm, int(cfg.train.loss_chunk))
    model.train()
    t = cfg.train
    steps = len(rows) * int(t.epochs) // int(t.global_batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=float(t.lr), betas=tuple(float(b) for b in t.betas),
                                  weight_decay=float(t.weight_decay))
    model, optimizer = accelerator.prepare(model, optimizer)
    scheduler = get_scheduler(SCHEDULES[str(t.schedule)], optimizer, num_warmup_steps=int(t.warmup_steps),
                              num_training_steps=steps)
    accelerator.register_for_checkpointing(scheduler)  # not prepared: it steps once per optimiser step
    return Fit(rows, accelerator, layout, cp_mesh, model, optimizer, scheduler, scaling, mask_dtype, steps)


def _run(cfg: DictConfig) -> dict[str, Any]:
    method = str(cfg.train.method)
    out = run_dir(cfg) / "train" / method
    fit = prepare(cfg)
    tokenizer = load_tokenizer(str(cfg.model.path))
    accelerator, main = fit.accelerator, fit.accelerator.is_main_process
    ckpt_dir = resume.state_path(run_dir(cfg), f"train-{method}", fingerprint(cfg, fit.scaling))
    if main:
        resume.open_state_dir(ckpt_dir)
    accelerator.wait_for_everyone()
    start, history, wall = 0, [], 0.0
    last = latest_checkpoint(ckpt_dir)
    if last is not None:
        accelerator.load_state(str(last))
        meta = json.loads((last / "trainer.json").read_text())
        start, history, wall = int(meta["step"]), meta["history"], float(meta["wall_s"])
        accelerator.print(f"resuming the fine-tuning from {last} (step {start} of {fit.steps})")
    tracker_cm = stage_run(cfg, f"train-{method}", per_seed=True) if main else contextlib.nullcontext(StageRun())
    with tracker_cm as tracker:
        if last is not None:
            tracker.mark_resumed(f"step {start} of {fit.steps} from {last}")
        for h in history:
            _log(tracker, h)
        wall = _fit(cfg, fit, ckpt_dir, start, history, wall, tracker)
        with atomic_dir(out) if main else contextlib.nullcontext() as scratch:
            export_model(accelerator, fit.model, tokenizer, fit.scaling, cfg, (scratch / "model") if main else Path())
            if not main:
                return {}
            summary, validation = _write_outputs(cfg, fit, history, wall, scratch)
        shutil.rmtree(ckpt_dir, ignore_errors=True)  # the outputs are written: nothing left to resume
        tracker.log_metrics({"wall_s": wall, "tokens_per_s_mean": summary["tokens_per_s"] or 0.0}
                            | _flat_validation(validation))
        for name in ("train.json", "loss.csv", "loss.png", "validation.json"):
            tracker.log_artifact(out / name)
    _print_summary(summary, validation, out)
    return summary


def _fit(cfg: DictConfig, fit: Fit, ckpt_dir: Path, start: int, history: list[dict[str, Any]], wall: float,
         tracker: StageRun) -> float:
    """Steps start .. steps, appending to history, checkpointing every train.checkpoint_every; the wall time."""
    t, accelerator, rows, layout = cfg.train, fit.accelerator, fit.rows, fit.layout
    main, seed, length = accelerator.is_main_process, run_seed(cfg), rows.length
    params = [p for p in fit.model.parameters() if p.requires_grad]
    bar = tqdm(total=fit.steps, initial=start, desc=f"train {cfg.train.method}", disable=not main, dynamic_ncols=True)
    for step in range(start, fit.steps):
        t0 = time.monotonic()
        all_rows = rows.get(step_rows(len(rows), int(t.global_batch), step, seed))
        global_weight = float(row_weight_total(all_rows, cfg))
        local = {k: v[layout.dp_rank :: layout.dp_world] for k, v in all_rows.items()}
        sums = train_step(accelerator, fit.model, local, cfg, fit.mask_dtype, global_weight, layout, fit.cp_mesh)
        sums = accelerator.reduce(sums.to(accelerator.device), reduction="sum").cpu()
        loss = float((sums[0] + sums[2]) / global_weight)
        grad_norm = float(accelerator.clip_grad_norm_(params, float(t.grad_clip)))
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            saved = latest_checkpoint(ckpt_dir)
            raise TrainingDiverged(
                f"train: non-finite loss {loss} / gradient norm {grad_norm} at step {step + 1} of {fit.steps} "
                f"(train.lr = {t.lr}); the last good checkpoint is "
                f"{saved if saved is not None else 'none (no checkpoint written yet)'}")
        lr = fit.scheduler.get_last_lr()[0]
        fit.optimizer.step()
        fit.scheduler.step()
        fit.optimizer.zero_grad(set_to_none=True)
        dt = time.monotonic() - t0
        wall += dt
        row = {"step": step + 1, "loss": loss, "short_loss": _ratio(sums[0], sums[1]),
               "long_loss": _ratio(sums[2], sums[3]), "lr": lr, "grad_norm": grad_norm,
               "tokens": int(t.global_batch) * length, "tokens_per_s": int(t.global_batch) * length / dt, "wall_s": wall}
        history.append(row)
        if main and ((step + 1) % int(t.log_every) == 0 or step + 1 == fit.steps):
            _log(tracker, row)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        if (step + 1) % int(t.checkpoint_every) == 0 and step + 1 < fit.steps:
            save_checkpoint(accelerator, ckpt_dir, step + 1, history, wall)
    bar.close()
    return wall


def _write_outputs(cfg: DictConfig, fit: Fit, history: list[dict[str, Any]], wall: float,
                   scratch: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """loss.csv, loss.png, validation.json and train.json beside the exported model (main process)."""
    method, t, scaling = str(cfg.train.method), cfg.train, fit.scaling
    write_loss_csv(scratch / "loss.csv", history)
    plot_loss(history, method, scratch / "loss.png")
    with torch_threads(int(cfg.resources.train.cpus)):  # the other processes have exited
        validation = validate(cfg, scratch / "model", fit.accelerator.device)
    write_json(scratch / "validation.json", {"method": method, **validation})
    tokens = sum(h["tokens"] for h in history)
    summary = {"method": method, "mixed_window": scaling.switches and scaling.short_factor != scaling.long_factor,
               "steps": fit.steps, "rows": len(fit.rows), "epochs": int(t.epochs), "global_batch": int(t.global_batch),
               "tokens": tokens, "processes": fit.accelerator.num_processes, "wall_s": wall,
               "tokens_per_s": tokens / wall if wall else None,
               "final_loss": history[-1]["loss"] if history else None, "seed": run_seed(cfg),
               "rope_parameters": scaling.to_rope_parameters(), "long_factor": list(scaling.long_factor),
               "critical_dim": scaling.critical_dim, "device": str(fit.accelerator.device),
               "mixed_precision": str(fit.accelerator.mixed_precision)}
    write_json(scratch / "train.json", summary)
    return summary, validation


def _print_summary(summary: dict[str, Any], validation: dict[str, Any], out: Path) -> None:
    print(f"fine-tuned {summary['method']}: {summary['steps']} steps, {summary['tokens']} tokens in "
          f"{summary['wall_s']:.0f} s ({summary['tokens_per_s'] or 0:.0f} tokens/s, {summary['device']}) -> {out}")
    for name in ("base", "tuned"):
        for split, m in validation.get(name, {}).items():
            print(f"  {name:5s} {split:16s} ({m['length']:6d} tokens) needle-PPL {m['needle_ppl']:9.4f}   "
                  f"exact match {m['exact_match']:.3f}")
    if validation.get("retention") is not None:
        print(f"  retention (exact match within L_train, tuned / base): {validation['retention']:.3f}")


def _ratio(num: Tensor, den: Tensor) -> float:
    return float(num / den) if float(den) else float("nan")


def _log(tracker: StageRun, row: dict[str, Any]) -> None:
    tracker.log_metrics({k: row[k] for k in ("loss", "short_loss", "long_loss", "lr", "grad_norm", "tokens_per_s")
                         if row[k] == row[k]}, step=row["step"])


def _flat_validation(validation: dict[str, Any]) -> dict[str, float]:
    flat = {f"{name}_{split}_{k}": v for name in ("base", "tuned") for split, m in validation.get(name, {}).items()
            for k, v in m.items() if k in ("needle_ppl", "exact_match")}
    if validation.get("retention") is not None:
        flat["retention"] = validation["retention"]
    return flat


main = hydra_stage(run)

if __name__ == "__main__":
    main()

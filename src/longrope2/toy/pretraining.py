"""Pretraining the toy base model at its short window, resumable."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from longrope2.core import resume
from longrope2.core.outputs import atomic_file
from longrope2.core.processes import torch_threads
from longrope2.lm.losses import needle_scores, weighted_lm_loss
from longrope2.toy.data import ToyData, encode_stream, heldout_samples
from longrope2.toy.settings import LogFn, ToyPretrainResult, ToyPretrainSettings
from longrope2.toy.tokenizer import load_or_train_tokenizer


def _lr_at(step: int, s: ToyPretrainSettings) -> float:
    """Linear warmup, then cosine from lr to lr * min_lr_ratio at max_steps."""
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    progress = min(1.0, (step - s.warmup_steps) / max(1, s.max_steps - s.warmup_steps))
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _settings_fingerprint(s: ToyPretrainSettings) -> dict[str, Any]:
    # Monitoring-only fields may change across a resume without changing the result.
    d = dataclasses.asdict(s)
    for k in ("progress", "log_every", "checkpoint_every", "num_threads", "compile") + tuple(
        k for k in d if k.startswith("gate_") or k == "max_seed_tries"
    ):
        d.pop(k, None)
    return d


def pretrain_base_model(
    settings: ToyPretrainSettings,
    train_docs: Sequence[str],
    heldout_docs: Sequence[str],
    seed: int,
    work_dir: str | Path,
    log_fn: LogFn | None = None,
    tokenizer: PreTrainedTokenizerFast | None = None,
    stop_after: int | None = None,
) -> ToyPretrainResult:
    """Train one seed; resumable from ``work_dir/checkpoint.pt`` after a kill.

    Stops early once held-out exact match at 1x reaches ``early_stop_em`` (checked
    every ``eval_every`` steps), else at ``max_steps``. Batches depend only on
    (seed, step) and the checkpoint holds model + optimizer + history, so a resumed
    run ends with the same weights as an uninterrupted one (same thread count).
    The tokenizer is trained (or reloaded from ``work_dir/tokenizer``) unless given.
    ``stop_after`` ends the call after that many total steps without finishing
    (tests; simulates a kill).
    """
    with torch_threads(settings.num_threads):
        return _pretrain_base_model(
            settings, train_docs, heldout_docs, seed, Path(work_dir), log_fn, tokenizer, stop_after
        )


def _restore(path: Path, key: str, model: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[int, list, bool]:
    """(step, history, done) from the checkpoint of this fingerprint; (0, [], False) to start fresh."""
    if not path.is_file():
        return 0, [], False
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not resume.matches(ckpt, key):  # the one resume rule (core.resume): another configuration starts fresh
        print(f"{path}: checkpoint of other settings or seed: ignored, starting fresh")
        return 0, [], False
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    return ckpt["step"], ckpt["history"], ckpt["done"]


def _save(path: Path, key: str, step: int, history: list, done: bool, model: torch.nn.Module,
          opt: torch.optim.Optimizer) -> None:
    with atomic_file(path) as scratch:  # a kill mid-save never leaves a torn checkpoint
        torch.save({"version": resume.STATE_VERSION, "fingerprint": key, "step": step, "history": history,
                    "done": done, "model": model.state_dict(), "optimizer": opt.state_dict()}, scratch)


def _optimiser_step(model: torch.nn.Module, opt: torch.optim.Optimizer, loss: torch.Tensor, lr: float,
                    grad_clip: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()


def _heldout_check(model: torch.nn.Module, eval_set: list, step: int, history: list) -> dict[str, float]:
    """Held-out needle exact match and needle-PPL at 1x, appended to history."""
    sc = needle_scores(model, eval_set, batch_size=16)
    history.append({"step": step, "eval_em": sc["exact_match"], "eval_needle_ppl": sc["needle_ppl"]})
    return {"eval_em": sc["exact_match"], "eval_needle_ppl": sc["needle_ppl"]}


def _pretrain_base_model(
    s: ToyPretrainSettings,
    train_docs: Sequence[str],
    heldout_docs: Sequence[str],
    seed: int,
    work_dir: Path,
    log_fn: LogFn | None,
    tokenizer: PreTrainedTokenizerFast | None,
    stop_after: int | None,
) -> ToyPretrainResult:
    work_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if tokenizer is None:
        tokenizer = load_or_train_tokenizer(s, train_docs, work_dir)
    data = ToyData(tokenizer, encode_stream(tokenizer, train_docs), s)
    eval_set = heldout_samples(
        tokenizer, encode_stream(tokenizer, heldout_docs), s.template(), s.seq_len, s.eval_samples, seed
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(s.model_config(tokenizer))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, betas=(0.9, 0.95), weight_decay=s.weight_decay)
    ckpt_path = work_dir / "checkpoint.pt"
    key = resume.fingerprint({"settings": _settings_fingerprint(s), "seed": seed})
    step, history, done = _restore(ckpt_path, key, model, opt)

    loss_fn = torch.compile(weighted_lm_loss) if s.compile else weighted_lm_loss
    bar = tqdm(total=s.max_steps, initial=step, desc=f"toy seed {seed}", disable=not s.progress,
               mininterval=2.0, dynamic_ncols=True)
    loss_sum, n_loss, t_log = 0.0, 0, time.time()
    while not done and step < s.max_steps and (stop_after is None or step < stop_after):
        ids, weights = data.batch(seed, step)
        lr = _lr_at(step, s)
        loss = loss_fn(model, ids, weights)
        _optimiser_step(model, opt, loss, lr, s.grad_clip)
        step += 1
        bar.update(1)
        loss_sum, n_loss = loss_sum + loss.item(), n_loss + 1
        metrics: dict[str, float] = {}
        if step % s.log_every == 0:
            dt = time.time() - t_log
            metrics |= {"loss": loss_sum / n_loss, "lr": lr, "tokens_per_s": n_loss * ids.numel() / max(dt, 1e-9)}
            loss_sum, n_loss, t_log = 0.0, 0, time.time()
        if step % s.eval_every == 0 and step >= s.warmup_copy_steps:
            metrics |= _heldout_check(model, eval_set, step, history)
            done = metrics["eval_em"] >= s.early_stop_em
            bar.set_postfix(em=f"{metrics['eval_em']:.2f}")
        if metrics and log_fn is not None:
            log_fn(metrics, step)
        if step % s.checkpoint_every == 0 or done or step == s.max_steps:
            done = done or step >= s.max_steps
            _save(ckpt_path, key, step, history, done, model, opt)
    bar.close()
    model.eval()
    stopped_early = bool(history) and history[-1]["eval_em"] >= s.early_stop_em
    return ToyPretrainResult(model=model, tokenizer=tokenizer, seed=seed, steps=step, stopped_early=stopped_early,
                             final_eval_em=history[-1]["eval_em"] if history else float("nan"),
                             wall_s=time.time() - t0, history=history)

"""The fine-tuning step: the chunked-loss model, its inputs, forward and backward, accelerate."""

from __future__ import annotations

import contextlib
import csv
import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from longrope2.lm import losses
from longrope2.training import mixed
from longrope2.training.mixed import per_document, row_targets
from longrope2.training.parallel import Layout, micro_batches, sequence_sharded

SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


LOSS_FIELDS = ["step", "loss", "short_loss", "long_loss", "lr", "grad_norm", "tokens", "tokens_per_s", "wall_s"]


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient: the run stops and keeps its last good checkpoint."""


class ChunkedLossLM(nn.Module):
    """A causal LM whose forward returns (sum of weight x NLL, sum of weights) through the chunked head.

    One module, so DDP/FSDP see the whole forward (their gradient hooks are set up in it).
    """

    def __init__(self, lm: nn.Module, chunk: int) -> None:
        super().__init__()
        self.lm, self.chunk = lm, chunk

    def forward(self, input_ids: Tensor, position_ids: Tensor, attention_mask: Tensor | None, labels: Tensor,
                weights: Tensor) -> tuple[Tensor, float]:
        decoder, head = losses.decoder_and_head(self.lm)
        hidden = decoder(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                         use_cache=False).last_hidden_state  # (B, L, H)
        total, weight = losses.chunked_causal_lm_loss(hidden, head, labels, self.chunk, weights)
        if weight == 0:  # nothing to score (an empty context-parallel piece): a zero loss through every weight
            total = head(hidden[:, :1]).float().sum() * 0.0
        return total, weight


def forward_inputs(batch: dict[str, Tensor], is_long: bool, cfg: DictConfig, mask_dtype: torch.dtype,
                   device: torch.device) -> dict[str, Tensor | None]:
    separate = per_document(cfg, is_long)
    labels, weights = row_targets(batch, separate)
    ids, positions, mask = batch["input_ids"], batch["position_ids"], None
    if separate and str(cfg.train.attn_implementation) == "sdpa":
        if is_long:  # positions run on across documents: the exact L x L mask
            mask = mixed.document_causal_mask(batch["doc_ids"], mask_dtype).to(device)
        else:  # documents as rows of their own: the same numbers at a fraction of the attention
            ids, positions, labels, weights = mixed.unpack_documents(batch["doc_ids"], ids, positions, labels, weights)
    # flash attention: no mask; transformers reads the documents from the restarting position_ids.
    return {"input_ids": ids.to(device), "position_ids": positions.to(device),
            "attention_mask": mask, "labels": labels.to(device), "weights": weights.to(device)}


def train_step(accelerator: Any, model: nn.Module, rows: dict[str, Tensor], cfg: DictConfig, mask_dtype: torch.dtype,
               global_weight: float, layout: Layout = Layout(), cp_mesh: Any = None) -> Tensor:
    """Forward and backward of this process's rows; returns its (short, long) weighted NLL sums and weights."""
    sums = torch.zeros(4, dtype=torch.float64)  # short sum, short weight, long sum, long weight
    parts = list(micro_batches(rows, int(cfg.train.micro_batch), layout))
    scale = accelerator.num_processes / global_weight  # DDP / FSDP average the gradients over processes
    for i, (is_long, batch) in enumerate(parts):
        inputs = forward_inputs(batch, is_long, cfg, mask_dtype, accelerator.device)
        sync = accelerator.no_sync(model) if i < len(parts) - 1 else contextlib.nullcontext()
        sharded = sequence_sharded(cp_mesh, model, inputs) if is_long and cp_mesh is not None \
            else contextlib.nullcontext()
        with sync, sharded:
            total, weight = model(**inputs)
            accelerator.backward(total * scale)
        k = 2 if is_long else 0
        sums[k] += float(total.detach())
        sums[k + 1] += weight
    return sums


def write_loss_csv(path: Path, history: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=LOSS_FIELDS)
        writer.writeheader()
        writer.writerows(history)


def make_accelerator(cfg: DictConfig) -> Any:
    from accelerate import Accelerator

    # accelerate logs every file of every checkpoint at INFO, and warns that the tied LM head is
    # stored once (it is re-tied on loading): noise in the stage log.
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    from accelerate.utils import FullyShardedDataParallelPlugin

    cuda = torch.cuda.is_available()
    kw: dict[str, Any] = {"cpu": not cuda, "mixed_precision": "bf16" if cuda and cfg.train.bf16 else "no"}
    if str(cfg.train.distributed) == "fsdp":
        kw["fsdp_plugin"] = FullyShardedDataParallelPlugin(
            fsdp_version=2, auto_wrap_policy="transformer_based_wrap", state_dict_type="FULL_STATE_DICT",
            reshard_after_forward=True)
    return Accelerator(**kw)

"""Context parallelism: a process's place, short rows by document, long rows by sequence."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from longrope2.rope.scaling import rotary_modules


@dataclass(frozen=True)
class Layout:
    """Where a process sits: its data-parallel group (which rows) and its context-parallel rank
    (which part of a row). Ranks r = dp_rank x cp + cp_rank; cp = 1 without context parallelism."""

    world: int = 1
    rank: int = 0
    cp: int = 1

    @property
    def dp_world(self) -> int:
        return self.world // self.cp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.cp

    @property
    def cp_rank(self) -> int:
        return self.rank % self.cp


def document_piece(row: dict[str, Tensor], k: int, parts: int) -> dict[str, Tensor]:
    """The documents of one packed short row (1, L) that start in the k-th of ``parts`` equal spans.

    Context parallelism shards a row's sequence, which per-document masks do not survive; a
    short row is spread over the group by whole documents instead (each process one piece). An
    empty piece is one token with no target: the process still runs its forward pass, which
    keeps FSDP's collectives in step.
    """
    doc = row["doc_ids"][0]
    length = doc.shape[0]
    starts = torch.ones(length, dtype=torch.bool)
    starts[1:] = doc[1:] != doc[:-1]
    owner = torch.clamp(torch.arange(length)[starts] * parts // length, max=parts - 1)  # per document
    keep = owner[starts.long().cumsum(0) - 1] == k  # per token: does its document belong to piece k
    if not bool(keep.any()):
        piece = {key: v[:, :1] for key, v in row.items() if key != "is_long"}
        piece["loss_weight"] = torch.zeros_like(piece["loss_weight"])
        return piece | {"is_long": row["is_long"]}
    return {key: (v[:, keep] if key != "is_long" else v) for key, v in row.items()}


def micro_batches(rows: dict[str, Tensor], micro: int, layout: Layout = Layout()
                  ) -> Iterator[tuple[bool, dict[str, Tensor]]]:
    """The local rows by kind (short rows, then long rows), ``micro`` rows per forward pass;
    with context parallelism, this process's piece of each short row (micro is 1 then)."""
    for is_long in (False, True):
        idx = (rows["is_long"] == is_long).nonzero().flatten()
        for b in range(0, len(idx), micro):
            batch = {k: v[idx[b : b + micro]] for k, v in rows.items()}
            if layout.cp > 1 and not is_long:
                batch = document_piece(batch, layout.cp_rank, layout.cp)
            yield is_long, batch


def _causal_only(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    # Ring attention takes no mask: plain causal attention over the whole (sharded) row.
    if "attention_mask" in kwargs:
        kwargs["attention_mask"] = None
        kwargs["is_causal"] = True
    return args, kwargs


def _longrope_layer_types(rotary: nn.Module) -> list[str | None]:
    """The frequency sets of a rotary module that switch like longrope: None for its own, else the layer
    types (a layer-typed module, Gemma-3, keeps ``<layer_type>_inv_freq`` per type)."""
    kinds = getattr(rotary, "rope_type", None)
    if isinstance(kinds, dict):
        return [layer_type for layer_type, kind in kinds.items() if kind == "longrope"]
    return [None] if kinds == "longrope" else []


@contextlib.contextmanager
def whole_row_regime(model: nn.Module, position_ids: Tensor) -> Iterator[None]:
    """Every longrope rotary module of ``model`` keeps the factors of the whole row ``position_ids``.

    transformers' longrope switch takes the long factors iff max(position_ids) + 1 > L_train, on
    the positions its rotary module gets: under context parallelism a shard's, so a shard of a
    row just above L_train whose positions all lie below it would take the short factors while
    the others take the long ones. The switch cannot be fed other positions (the same
    position_ids give the angles), so, for the duration: run the module once on the row's last
    position (its own switch picks the whole row's frequencies), then make those its short set
    ``original_inv_freq``, which the switch returns whenever a shard looks short. A shard never
    looks longer than its row, so every shard gets the row's frequencies. Restored on exit.
    """
    last = position_ids.max().view(1, 1)  # the unsharded row's: decided before the sharding
    pinned = []
    for _, rotary in rotary_modules(model):
        for layer_type in _longrope_layer_types(rotary):
            prefix, kwargs = (f"{layer_type}_", {"layer_type": layer_type}) if layer_type else ("", {})
            freq = getattr(rotary, f"{prefix}inv_freq")
            with torch.no_grad():
                rotary(freq.new_zeros(1), last.to(freq.device), **kwargs)  # sets inv_freq to the row's set
            name = f"{prefix}original_inv_freq"
            pinned.append((rotary, name, getattr(rotary, name)))
            setattr(rotary, name, getattr(rotary, f"{prefix}inv_freq").clone())
    try:
        yield
    finally:
        for rotary, name, short in pinned:
            setattr(rotary, name, short)


@contextlib.contextmanager
def sequence_sharded(cp_mesh: Any, model: nn.Module, inputs: dict[str, Tensor | None]) -> Iterator[None]:
    """PyTorch's context parallelism around one long row's forward and backward.

    The row's tensors are sharded in place over the cp group (head-tail load balancing); every
    rotary module keeps the factors of the whole row (whole_row_regime, decided before the
    sharding), and SDPA becomes ring attention. transformers would read a packed sequence from
    the shard's position jumps, so the attention modules get no mask (as accelerate's CP hooks
    do), here only for long rows.
    """
    from torch.distributed.tensor.experimental import context_parallel

    buffers = [inputs[k] for k in ("input_ids", "position_ids", "labels", "weights")]
    hooks = [m.register_forward_pre_hook(_causal_only, with_kwargs=True, prepend=True)
             for name, m in model.named_modules() if name.endswith("self_attn")]
    try:
        with whole_row_regime(model, inputs["position_ids"]), \
                context_parallel(cp_mesh, buffers=buffers, buffer_seq_dims=[1] * len(buffers),
                                 no_restore_buffers=set(buffers)):
            yield
    finally:
        for hook in hooks:
            hook.remove()

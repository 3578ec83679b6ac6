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

import bisect
import contextlib
import csv
import dataclasses
import functools
import hashlib
import json
import logging
import math
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from longrope2 import methods, mixed  # noqa: E402
from longrope2 import rows as rows_format  # noqa: E402
from longrope2.artifacts import DamagedInputError, damaged, read_json  # noqa: E402
from longrope2.config import ConfigError, hydra_stage, run_dir, run_seed, to_dict  # noqa: E402
from longrope2.fitness import needle_fitness  # noqa: E402
from longrope2.inputs import load_causal_lm, load_needle_sets, load_tokenizer  # noqa: E402
from longrope2.outputs import atomic_dir, save_figure, write_json  # noqa: E402
from longrope2.scaling import RopeFacts, RopeScaling, rope_facts_from_hf_config  # noqa: E402
from longrope2.toy import torch_threads  # noqa: E402
from longrope2.tracking import StageRun, stage_run  # noqa: E402

STATE_VERSION = 1
SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}
LOSS_FIELDS = ["step", "loss", "short_loss", "long_loss", "lr", "grad_norm", "tokens", "tokens_per_s", "wall_s"]


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient: the run stops and keeps its last good checkpoint."""


def search_result_path(cfg: DictConfig) -> Path | None:
    """result.json of the search train.method takes its factors or critical dim from (None: closed form)."""
    search = methods.spec(str(cfg.train.method)).search
    return None if search is None else run_dir(cfg) / "search" / search / "result.json"


def method_scaling(cfg: DictConfig, facts: RopeFacts) -> RopeScaling:
    path = search_result_path(cfg)  # checked before any compute in _run
    result = None if path is None else read_json(path)
    return methods.method_scaling(str(cfg.train.method), facts, int(cfg.target_len), result)


# --------------------------------------------------------------------------- rows


class Rows:
    """The train_data rows, shard by shard (tokens memory-mapped): row j of the whole set by index.

    Only the rows a step asks for are read from disk; their position_ids, doc_ids and loss_weight are
    derived from the stored documents and weight spans (longrope2.rows).
    """

    def __init__(self, folder: Path) -> None:
        meta_path = folder / "train_data.json"
        if not meta_path.is_file():
            raise ConfigError(f"{folder}: no train_data.json; run stage train_data first")
        self.meta = read_json(meta_path, ("shards", "rows", "target_len"))
        if any(str(name).endswith(".pt") for name in self.meta["shards"]):
            raise ConfigError(f"{folder}: rows in the old dense .pt format; accepted: the compact format "
                              "(longrope2.rows): rerun stage train_data")
        # Every shard opened (and checked against its own header and index) before any compute.
        self.shards = [rows_format.Shard(folder, name) for name in self.meta["shards"]]
        self.offsets = [0]
        for shard in self.shards:
            self.offsets.append(self.offsets[-1] + len(shard))
        self.length = int(self.meta["target_len"])
        for name, shard in zip(self.meta["shards"], self.shards, strict=True):
            if shard.tokens.shape[1] != self.length:
                raise damaged(folder / f"{name}.tokens.npy", f"rows of {shard.tokens.shape[1]} tokens, "
                                                             f"train_data.json says {self.length}")
        if len(self) != int(self.meta["rows"]):
            raise damaged(meta_path, f"says {self.meta['rows']} rows, its shards hold {len(self)}")

    def __len__(self) -> int:
        return self.offsets[-1]

    def get(self, indices: list[int]) -> dict[str, Tensor]:
        """Rows (n, L) of input_ids, position_ids, doc_ids (int64), loss_weight (float32), is_long (n,)."""
        out: dict[str, list[Tensor]] = {k: [] for k in ("input_ids", "position_ids", "doc_ids", "loss_weight",
                                                         "is_long")}
        for j in indices:
            s = bisect.bisect_right(self.offsets, j) - 1  # the shard holding row j
            row = self.shards[s].row(j - self.offsets[s])
            for key in out:
                out[key].append(row[key])
        rows = {k: torch.stack(v) for k, v in out.items()}
        for key in ("input_ids", "position_ids", "doc_ids"):
            rows[key] = rows[key].long()
        rows["loss_weight"] = rows["loss_weight"].float()
        return rows


@functools.lru_cache(maxsize=2)
def _epoch_order(n_rows: int, seed: int, epoch: int) -> tuple[int, ...]:
    return tuple(torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist())


def step_rows(n_rows: int, global_batch: int, step: int, seed: int) -> list[int]:
    """The global batch of a step: a seeded permutation of the rows per epoch, consumed in order."""
    return [_epoch_order(n_rows, seed, j // n_rows)[j % n_rows]
            for j in range(step * global_batch, (step + 1) * global_batch)]


def per_document(cfg: DictConfig, is_long: bool) -> bool:
    """Documents of a row attend (and predict) only within themselves: always in short rows."""
    return not is_long or str(cfg.train.long_row_attention) == "per_document"


def row_targets(rows: dict[str, Tensor], separate: bool) -> tuple[Tensor, Tensor]:
    """labels and label weights (n, L): never across documents where they are ``separate``."""
    labels = mixed.causal_lm_labels(rows["input_ids"], rows["doc_ids"] if separate else None)
    return labels, mixed.label_weights(rows["loss_weight"], labels)


# --------------------------------------------------------------------------- model


class ChunkedLossLM(nn.Module):
    """A causal LM whose forward returns (sum of weight x NLL, sum of weights) through the chunked head.

    One module, so DDP/FSDP see the whole forward (their gradient hooks are set up in it).
    """

    def __init__(self, lm: nn.Module, chunk: int) -> None:
        super().__init__()
        self.lm, self.chunk = lm, chunk

    def forward(self, input_ids: Tensor, position_ids: Tensor, attention_mask: Tensor | None, labels: Tensor,
                weights: Tensor) -> tuple[Tensor, float]:
        hidden = self.lm.model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                               use_cache=False).last_hidden_state  # (B, L, H)
        head = self.lm.get_output_embeddings()
        total, weight = mixed.chunked_causal_lm_loss(hidden, head, labels, self.chunk, weights)
        if weight == 0:  # nothing to score (an empty context-parallel piece): a zero loss through every weight
            total = head(hidden[:, :1]).float().sum() * 0.0
        return total, weight


def load_base(cfg: DictConfig, attn: str, dtype: torch.dtype) -> tuple[nn.Module, RopeFacts]:
    try:  # the attention window lifted to cover target_len: the exported config keeps it lifted
        model = load_causal_lm(str(cfg.model.path), int(cfg.target_len), original_rope=True, dtype=dtype,
                               attn_implementation=attn)
    except DamagedInputError:  # names the damaged file and its rule already
        raise
    except (OSError, ValueError, ImportError) as err:
        raise ConfigError(f"model.path = {cfg.model.path!r} (train.attn_implementation = {attn!r}): cannot load "
                          f"a causal LM ({err})") from None
    # The experiment's L_train wins over the config's window (Phi3-mini is extended from 2k, not 4k).
    facts = dataclasses.replace(rope_facts_from_hf_config(model.config), train_len=int(cfg.model.train_len))
    return model, facts


# --------------------------------------------------------------------------- checks


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
    """Everything that shapes the loss curve: a changed setting, scaling or input starts a fresh run."""
    data = to_dict(cfg)
    knobs = {k: v for k, v in data["train"].items()
             if k not in ("processes", "num_threads", "checkpoint_every", "log_every", "validation_batch_size")}
    digest = hashlib.sha256(json.dumps({"train": knobs, "seed": run_seed(cfg), "target_len": data["target_len"],
                                        "model": str(cfg.model.path)}, sort_keys=True).encode())
    digest.update(json.dumps(scaling.to_rope_parameters(), sort_keys=True).encode())
    digest.update((run_dir(cfg) / "train_data" / "train_data.json").read_bytes())
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------- one step


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


def _causal_only(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    # Ring attention takes no mask: plain causal attention over the whole (sharded) row.
    if "attention_mask" in kwargs:
        kwargs["attention_mask"] = None
        kwargs["is_causal"] = True
    return args, kwargs


@contextlib.contextmanager
def sequence_sharded(cp_mesh: Any, model: nn.Module, inputs: dict[str, Tensor | None]) -> Iterator[None]:
    """PyTorch's context parallelism around one long row's forward and backward.

    The row's tensors are sharded in place over the cp group (head-tail load balancing, so every
    shard holds positions beyond L/2 > L_train and keeps the long factors); SDPA becomes ring
    attention. transformers would read a packed sequence from the shard's position jumps, so the
    attention modules get no mask (as accelerate's CP hooks do), here only for long rows.
    """
    from torch.distributed.tensor.experimental import context_parallel

    buffers = [inputs[k] for k in ("input_ids", "position_ids", "labels", "weights")]
    hooks = [m.register_forward_pre_hook(_causal_only, with_kwargs=True, prepend=True)
             for name, m in model.named_modules() if name.endswith("self_attn")]
    try:
        with context_parallel(cp_mesh, buffers=buffers, buffer_seq_dims=[1] * len(buffers),
                              no_restore_buffers=set(buffers)):
            yield
    finally:
        for hook in hooks:
            hook.remove()


# --------------------------------------------------------------------------- checkpoints


def latest_checkpoint(folder: Path) -> Path | None:
    done = sorted(p for p in folder.glob("step-*") if (p / "trainer.json").is_file())
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
        write_json(scratch / "trainer.json", {"version": STATE_VERSION, "step": step, "history": history,
                                              "wall_s": wall})
        scratch.rename(final)
        for old in folder.glob("step-*"):
            if old != final:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()


# --------------------------------------------------------------------------- outputs


def write_loss_csv(path: Path, history: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=LOSS_FIELDS)
        writer.writeheader()
        writer.writerows(history)


def plot_loss(history: list[dict[str, Any]], variant: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    steps = [h["step"] for h in history]
    for key, label in (("loss", "all rows"), ("short_loss", "short rows (short factors)"),
                       ("long_loss", "long rows (long factors)")):
        points = [(s, h[key]) for s, h in zip(steps, history, strict=True) if h[key] == h[key]]  # NaN: no such rows
        if points:
            ax.plot(*zip(*points, strict=True), label=label, lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("weighted token-mean NLL")
    ax.set_yscale("log")
    ax.set_title(f"Mixed context window fine-tuning: {variant}")
    ax.legend()
    save_figure(fig, path)


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


def validate(cfg: DictConfig, model_dir: Path, device: torch.device) -> dict[str, Any]:
    """Held-out needle exact match / needle-PPL at L_train and at L: base (original RoPE) vs this model."""
    sets = load_needle_sets(run_dir(cfg) / "needle_data")
    chosen = {split: samples for split, (samples, _) in sets.items() if split in ("validation_short", "validation")}
    if not chosen:
        return {}
    batch = int(cfg.train.validation_batch_size)
    out: dict[str, Any] = {}
    for name, path in (("base", str(cfg.model.path)), ("tuned", str(model_dir))):
        lm = load_causal_lm(path, int(cfg.target_len), original_rope=name == "base",
                            dtype=torch.float32 if device.type == "cpu" else None)
        lm.to(device).eval()
        for split, samples in chosen.items():
            # ids: the seed's own held-out set (stage needle_data draws one per seed), sample i of it
            ids = [f"{split}/seed{run_seed(cfg)}/{i}" for i in range(len(samples))]
            out.setdefault(name, {})[split] = {"length": samples[0].length, "samples": len(samples),
                                               **needle_fitness(lm, samples, batch, per_sample=True), "ids": ids}
        del lm
    if "validation_short" in chosen:
        base_em = out["base"]["validation_short"]["exact_match"]
        out["retention"] = (out["tuned"]["validation_short"]["exact_match"] / base_em) if base_em else None
    return out


# --------------------------------------------------------------------------- stage


def run(cfg: DictConfig) -> dict[str, Any]:
    with torch_threads(cfg.train.num_threads):
        return _run(cfg)


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


def _run(cfg: DictConfig) -> dict[str, Any]:
    from transformers import get_scheduler

    out_root = run_dir(cfg)
    variant = str(cfg.train.method)
    out = out_root / "train" / variant
    rows = Rows(out_root / "train_data")
    path = search_result_path(cfg)
    if path is not None and not path.is_file():
        raise ConfigError(f"train.method = {variant}: {path} is missing; run stage search "
                          f"(search.method={path.parent.name}) first")
    accelerator = make_accelerator(cfg)
    layout = Layout(accelerator.num_processes, accelerator.process_index, int(cfg.train.context_parallel))
    check_config(cfg, layout, rows)
    cp_mesh = None
    if layout.cp > 1:  # groups of cp consecutive ranks share rows and shard long rows among them
        from torch.distributed.device_mesh import init_device_mesh

        cp_mesh = init_device_mesh(accelerator.device.type, (layout.dp_world, layout.cp),
                                   mesh_dim_names=("dp", "cp"))["cp"]
    tokenizer = load_tokenizer(str(cfg.model.path))
    # fp32 master weights; on GPUs bf16 autocast (accelerate's mixed precision), whose attention
    # takes the document masks in its own dtype
    lm, facts = load_base(cfg, str(cfg.train.attn_implementation), torch.float32)
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

    key = fingerprint(cfg, scaling)
    ckpt_dir = out_root / "checkpoints" / f"train-{variant}-{key}"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    history: list[dict[str, Any]] = []
    start, wall = 0, 0.0
    last = latest_checkpoint(ckpt_dir)
    if last is not None:
        accelerator.load_state(str(last))
        meta = json.loads((last / "trainer.json").read_text())
        start, history, wall = int(meta["step"]), meta["history"], float(meta["wall_s"])
        accelerator.print(f"resuming the fine-tuning from {last} (step {start} of {steps})")

    main = accelerator.is_main_process
    world, seed, length = accelerator.num_processes, run_seed(cfg), rows.length
    params = [p for p in model.parameters() if p.requires_grad]
    tracker_cm = stage_run(cfg, f"train-{variant}", per_seed=True) if main else contextlib.nullcontext(StageRun())
    with tracker_cm as tracker:
        if last is not None:
            tracker.mark_resumed(f"step {start} of {steps} from {last}")
        for h in history:
            _log(tracker, h)
        bar = tqdm(total=steps, initial=start, desc=f"train {variant}", disable=not main, dynamic_ncols=True)
        for step in range(start, steps):
            t0 = time.monotonic()
            indices = step_rows(len(rows), int(t.global_batch), step, seed)
            all_rows = rows.get(indices)
            global_weight = float(row_weight_total(all_rows, cfg))
            local = {k: v[layout.dp_rank :: layout.dp_world] for k, v in all_rows.items()}
            sums = train_step(accelerator, model, local, cfg, mask_dtype, global_weight, layout, cp_mesh)
            sums = accelerator.reduce(sums.to(accelerator.device), reduction="sum").cpu()
            loss = float((sums[0] + sums[2]) / global_weight)
            grad_norm = float(accelerator.clip_grad_norm_(params, float(t.grad_clip)))
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                saved = latest_checkpoint(ckpt_dir)
                raise TrainingDiverged(
                    f"train: non-finite loss {loss} / gradient norm {grad_norm} at step {step + 1} of {steps} "
                    f"(train.lr = {t.lr}); the last good checkpoint is "
                    f"{saved if saved is not None else 'none (no checkpoint written yet)'}")
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            dt = time.monotonic() - t0
            wall += dt
            row = {"step": step + 1, "loss": loss, "short_loss": _ratio(sums[0], sums[1]),
                   "long_loss": _ratio(sums[2], sums[3]), "lr": lr, "grad_norm": grad_norm,
                   "tokens": int(t.global_batch) * length, "tokens_per_s": int(t.global_batch) * length / dt,
                   "wall_s": wall}
            history.append(row)
            if main and ((step + 1) % int(t.log_every) == 0 or step + 1 == steps):
                _log(tracker, row)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
            if (step + 1) % int(t.checkpoint_every) == 0 and step + 1 < steps:
                save_checkpoint(accelerator, ckpt_dir, step + 1, history, wall)
        bar.close()

        with atomic_dir(out) if main else contextlib.nullcontext() as scratch:
            export_model(accelerator, model, tokenizer, scaling, cfg, (scratch / "model") if main else Path())
            if not main:
                return {}
            write_loss_csv(scratch / "loss.csv", history)
            plot_loss(history, variant, scratch / "loss.png")
            with torch_threads(int(cfg.resources.train.cpus)):  # the other processes have exited
                validation = validate(cfg, scratch / "model", accelerator.device)
            write_json(scratch / "validation.json", {"variant": variant, **validation})
            tokens = sum(h["tokens"] for h in history)
            mixed_window = scaling.switches and scaling.short_factor != scaling.long_factor
            summary = {"variant": variant, "method": variant, "mixed_window": mixed_window, "steps": steps,
                       "rows": len(rows),
                       "epochs": int(t.epochs), "global_batch": int(t.global_batch), "tokens": tokens,
                       "processes": world, "wall_s": wall, "tokens_per_s": tokens / wall if wall else None,
                       "final_loss": history[-1]["loss"] if history else None, "seed": seed,
                       "rope_parameters": scaling.to_rope_parameters(), "long_factor": list(scaling.long_factor),
                       "critical_dim": scaling.critical_dim, "device": str(accelerator.device),
                       "mixed_precision": str(accelerator.mixed_precision)}
            write_json(scratch / "train.json", summary)
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        tracker.log_metrics({"wall_s": wall, "tokens_per_s_mean": summary["tokens_per_s"] or 0.0}
                            | _flat_validation(validation))
        for name in ("train.json", "loss.csv", "loss.png", "validation.json"):
            tracker.log_artifact(out / name)
    print(f"fine-tuned {variant}: {steps} steps, {tokens} tokens in {wall:.0f} s "
          f"({summary['tokens_per_s'] or 0:.0f} tokens/s, {summary['device']}) -> {out}")
    for name in ("base", "tuned"):
        for split, m in validation.get(name, {}).items():
            print(f"  {name:5s} {split:16s} ({m['length']:6d} tokens) needle-PPL {m['needle_ppl']:9.4f}   "
                  f"exact match {m['exact_match']:.3f}")
    if validation.get("retention") is not None:
        print(f"  retention (exact match within L_train, tuned / base): {validation['retention']:.3f}")
    return summary


def row_weight_total(rows: dict[str, Tensor], cfg: DictConfig) -> Tensor:
    """Sum of label weights over the global batch: the loss's denominator, the same on every process."""
    total = torch.zeros((), dtype=torch.float64)
    for is_long in (False, True):
        sel = rows["is_long"] == is_long
        if bool(sel.any()):
            _, weights = row_targets({k: v[sel] for k, v in rows.items()}, per_document(cfg, is_long))
            total += weights.double().sum()
    return total


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

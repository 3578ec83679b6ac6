"""The toy base model's architecture and pretraining settings."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from longrope2.core.errors import ConfigError
from longrope2.data.needles import NeedleTemplate

LogFn = Callable[[dict[str, float], int], None]


def toy_llama_config(
    vocab_size: int,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    head_dim: int = 32,
    intermediate_size: int = 256,
    rope_theta: float = 1e4,
    train_len: int = 128,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> LlamaConfig:
    """Tiny Llama; theta 1e4 puts the critical RoPE pair mid-spectrum at L_train 128."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        head_dim=head_dim,
        max_position_embeddings=train_len,
        rope_parameters={"rope_type": "default", "rope_theta": float(rope_theta)},
        tie_word_embeddings=True,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )


@dataclass
class ToyPretrainSettings:
    """Every knob of the toy pretraining and its gate (defaults: the measured recipe).

    Measured on 2 CPU cores (1 thread): retrieval appears ~50-150 steps after the copy
    warm-up, so seeds 0-4 stop early at 350-450 steps; tokenizer + training + gate
    takes ~70 s (2 threads, quiet machine) to ~100 s (1 thread).
    """

    # data / tokenizer
    seq_len: int = 128
    vocab_size: int = 512
    num_digits: int = 5
    distinct_digits: bool = True
    add_bos: bool = True  # start every sample with <s>
    # model
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    head_dim: int = 32
    intermediate_size: int = 256
    rope_theta: float = 1e4
    # curriculum
    max_steps: int = 1000  # bound; early stop normally ends training at ~400
    warmup_copy_steps: int = 300  # induction heads form at ~200-300 steps of copying
    needle_fraction: float = 0.7  # rest: span-filler-span recall
    copy_span_min: int = 8
    copy_span_max: int = 32
    recall_span_min: int = 4
    recall_span_max: int = 16
    span_digit_prob: float = 0.3  # digits mixed into copy/recall spans
    # Up to this many filler tokens after the answer (0: the answer ends every sample).
    # Measured: 48 made bases LESS extendable, so it is off.
    needle_end_jitter: int = 0
    # optimisation
    batch_size: int = 32
    lr: float = 1.5e-3
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    warmup_steps: int = 50
    grad_clip: float = 1.0
    answer_loss_weight: float = 2.0
    # torch.compile: ~50 s to compile, no measurable step speed-up for 0.4 M params.
    compile: bool = False
    # 1 thread: results independent of the machine's core count (float reductions
    # differ across thread counts) and no collapse when another process takes a core
    # (2 threads under contention measured up to 15x slower). None: torch's default.
    num_threads: int | None = 1
    # monitoring / early stop
    log_every: int = 25
    eval_every: int = 50
    eval_samples: int = 128
    early_stop_em: float = 0.97  # held-out EM at 1x; the gate then asks >= gate_min_em
    checkpoint_every: int = 100
    progress: bool = True
    # gate
    gate_samples: int = 128  # held-out samples per cell
    gate_scales: tuple[int, ...] = (1, 2, 4, 8)
    gate_fragility_scale: int = 2
    gate_fragility_depth: float = 0.95
    gate_collapse_scale: int = 8
    gate_batch_size: int = 8
    gate_sample_seed: int = 0  # same held-out gate samples for every training seed
    max_seed_tries: int = 3
    # The gate's pass / fail thresholds have one home, conf/model/toy.yaml (model.pretrain.gate_*): no default
    # here. Passes when EM at 1x >= gate_min_em, EM at gate_fragility_scale with the needle at
    # gate_fragility_depth >= gate_min_fragility_em, EM at gate_collapse_scale <= gate_max_collapse_em.
    gate_min_em: float = field(kw_only=True)
    gate_min_fragility_em: float = field(kw_only=True)
    gate_max_collapse_em: float = field(kw_only=True)

    def template(self) -> NeedleTemplate:
        """The toy's RULER-like template: shortened to fit a 128-token window."""
        return NeedleTemplate(
            num_digits=self.num_digits, distinct_digits=self.distinct_digits, add_bos=self.add_bos
        ).shortened()

    def model_config(self, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
        return toy_llama_config(
            vocab_size=len(tokenizer),
            hidden_size=self.hidden_size,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            head_dim=self.head_dim,
            intermediate_size=self.intermediate_size,
            rope_theta=self.rope_theta,
            train_len=self.seq_len,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )


@dataclass
class ToyPretrainResult:
    model: LlamaForCausalLM
    tokenizer: PreTrainedTokenizerFast
    seed: int
    steps: int
    stopped_early: bool
    final_eval_em: float
    wall_s: float  # this call's wall time (excludes time before a resume)
    history: list[dict[str, float]] = field(default_factory=list)


def pretrain_tokens(s: ToyPretrainSettings, steps: int) -> int:
    """Tokens a base trained on in `steps` steps (every position of every row, as a fine-tuning row counts)."""
    return int(steps) * s.batch_size * s.seq_len


def toy_pretrain_settings(cfg: DictConfig) -> ToyPretrainSettings:
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
    accepted = {f.name for f in dataclasses.fields(ToyPretrainSettings)} - set(shape)
    unknown = sorted(set(knobs) - accepted)
    if unknown:
        raise ConfigError(
            f"model.pretrain.{unknown[0]}: unknown setting; accepted: enabled, " + ", ".join(sorted(accepted))
        )
    for key, value in knobs.items():
        if isinstance(value, list):
            knobs[key] = tuple(value)
    return ToyPretrainSettings(**shape, **knobs)

"""A toy Llama base model that retrieves a needle inside its short window (CPU, minutes).

Recipe (see notes/TOY_FINDINGS.md): a 2-layer Llama with a small BPE vocabulary is
trained first on dense copying (induction heads form), then on a mix of RULER-like
needle samples and "span, filler, same span" recall samples, with the answer tokens
weighted up. Retrieval appears as a phase transition whose step varies by seed, and
some seeds learn absolute positions (a fragile base), hence the quality gate and the
seed retry in :func:`pretrain_with_gate`.

Entry point for the pipeline stage: :func:`pretrain_with_gate`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from longrope2.needle import (
    NeedleSample,
    NeedleTemplate,
    build_needle_sample,
    needle_scores,
)
from longrope2.outputs import atomic_file

LogFn = Callable[[dict[str, float], int], None]

SPECIAL_TOKENS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
DIGITS = "0123456789"


# --------------------------------------------------------------------------- tokenizer


def train_tokenizer(
    texts: Sequence[str], vocab_size: int, template: NeedleTemplate | None = None
) -> PreTrainedTokenizerFast:
    """Byte-level BPE with every digit its own token (a key's digits = one token each).

    The template's needle/question sentences are added to the training texts for every
    key, so template words and keys become whole tokens in a small vocabulary.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    # Digits first: split every digit off, then byte-level for lossless decoding.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    specials = [SPECIAL_TOKENS[k] for k in ("unk_token", "bos_token", "eos_token", "pad_token")]
    # No full 256-byte alphabet: in a 512-token vocabulary it would crowd out merges;
    # the template texts guarantee every digit and punctuation mark is in the alphabet.
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        show_progress=False,
    )
    tok.train_from_iterator(list(texts) + [DIGITS] + _template_texts(template), trainer)
    # Like Llama: plain encode prepends BOS (the needle builder encodes without it).
    bos = SPECIAL_TOKENS["bos_token"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)


def _template_texts(template: NeedleTemplate | None, repeats: int = 20) -> list[str]:
    if template is None:
        return []
    rng = random.Random(0)
    out = []
    for key in template.keys:
        for _ in range(repeats):
            number = template.random_number(rng)
            out.append(
                f"{template.prefix} {template.needle.format(key=key, number=number)}\n"
                f"{template.question.format(key=key)} {number}"
            )
    return out


# --------------------------------------------------------------------------- model


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


# --------------------------------------------------------------------------- settings


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
    gate_min_em: float = 0.95  # at 1x
    gate_fragility_scale: int = 2
    gate_fragility_depth: float = 0.95
    # EM at 2x with the needle at depth 0.95. Measured: seeds at ~0.5 pass this but
    # extend badly (8x EM 0.12 with critical-dim rescaling vs 0.5-0.8 for seeds >= 0.84).
    gate_min_fragility_em: float = 0.5
    gate_collapse_scale: int = 8
    gate_max_collapse_em: float = 0.2  # no-scaling EM at 8x must be this low
    gate_batch_size: int = 8
    gate_sample_seed: int = 0  # same held-out gate samples for every training seed
    max_seed_tries: int = 3

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


# --------------------------------------------------------------------------- data


def encode_stream(tokenizer: PreTrainedTokenizerFast, docs: Sequence[str]) -> torch.Tensor:
    """All documents as one int64 token stream (documents separated by a newline)."""
    if not docs:
        raise ValueError("no documents to encode")
    enc = tokenizer(list(docs), add_special_tokens=False)["input_ids"]
    nl = tokenizer("\n", add_special_tokens=False)["input_ids"]
    out: list[int] = []
    for ids in enc:
        out += ids + nl
    return torch.tensor(out, dtype=torch.long)


class ToyData:
    """Curriculum batches; batch ``step`` depends only on (seed, step) so resume is exact."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerFast, stream: torch.Tensor, settings: ToyPretrainSettings
    ):
        self.tok = tokenizer
        self.stream = stream
        self.s = settings
        self.template = settings.template()
        self.digit_ids = [tokenizer.convert_tokens_to_ids(d) for d in DIGITS]
        self.head = [tokenizer.bos_token_id] if settings.add_bos else []
        if len(stream) < 2 * settings.seq_len:
            raise ValueError(f"training text too short: {len(stream)} tokens")

    def _window(self, rng: random.Random, n: int) -> list[int]:
        start = rng.randrange(len(self.stream) - n)
        return self.stream[start : start + n].tolist()

    def _span(self, rng: random.Random, lo: int, hi: int) -> list[int]:
        span = self._window(rng, rng.randint(lo, hi))
        return [rng.choice(self.digit_ids) if rng.random() < self.s.span_digit_prob else t for t in span]

    def copy_sample(self, rng: random.Random) -> tuple[list[int], list[float]]:
        """A random span repeated back-to-back: dense induction signal."""
        span = self._span(rng, self.s.copy_span_min, self.s.copy_span_max)
        n = self.s.seq_len - len(self.head)
        ids = self.head + (span * (n // len(span) + 1))[:n]
        return ids, [1.0] * self.s.seq_len

    def recall_sample(self, rng: random.Random) -> tuple[list[int], list[float]]:
        """filler, span, filler, the same span at the end (span weighted like an answer)."""
        span = self._span(rng, self.s.recall_span_min, self.s.recall_span_max)
        n_fill = self.s.seq_len - len(self.head) - 2 * len(span)
        fill = self._window(rng, n_fill)
        cut = rng.randint(0, n_fill)
        ids = self.head + fill[:cut] + span + fill[cut:] + span
        w = [1.0] * (len(ids) - len(span) + 1) + [self.s.answer_loss_weight] * (len(span) - 1)
        return ids, w

    def needle_sample(self, rng: random.Random) -> tuple[list[int], list[float]]:
        # Optional jitter: the answer does not always end the window, so the question's
        # absolute position varies (discourages position-bound retrieval).
        tail = rng.randint(0, self.s.needle_end_jitter) if self.s.needle_end_jitter else 0
        s = build_needle_sample(
            self.tok, self.stream, self.s.seq_len - tail, rng.random(), rng, self.template
        )
        w = torch.where(s.answer_mask, self.s.answer_loss_weight, 1.0).tolist()
        return s.input_ids.tolist() + self._window(rng, tail), w + [1.0] * tail

    def batch(self, seed: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = random.Random(f"toy-batch/{seed}/{step}")
        rows = []
        for _ in range(self.s.batch_size):
            if step < self.s.warmup_copy_steps:
                rows.append(self.copy_sample(rng))
            elif rng.random() < self.s.needle_fraction:
                rows.append(self.needle_sample(rng))
            else:
                rows.append(self.recall_sample(rng))
        ids = torch.tensor([r[0] for r in rows], dtype=torch.long)
        weights = torch.tensor([r[1] for r in rows], dtype=torch.float32)
        return ids, weights


def heldout_samples(
    tokenizer: PreTrainedTokenizerFast,
    stream: torch.Tensor,
    template: NeedleTemplate,
    length: int,
    n: int,
    seed: int,
    depth: float | None = None,
    purpose: str = "eval",
) -> list[NeedleSample]:
    """n needle samples of ``length`` tokens; depths evenly spread over [0, 1] unless fixed.

    ``purpose`` namespaces the draws so the gate never reuses the early-stop samples.
    """
    rng = random.Random(f"heldout/{purpose}/{seed}/{length}/{depth}")
    depths = [depth] * n if depth is not None else [i / max(1, n - 1) for i in range(n)]
    return [build_needle_sample(tokenizer, stream, length, d, rng, template) for d in depths]


# --------------------------------------------------------------------------- training


def pretrain_tokens(s: ToyPretrainSettings, steps: int) -> int:
    """Tokens a base trained on in `steps` steps (every position of every row, as a fine-tuning row counts)."""
    return int(steps) * s.batch_size * s.seq_len


def _lr_at(step: int, s: ToyPretrainSettings) -> float:
    """Linear warmup, then cosine from lr to lr * min_lr_ratio at max_steps."""
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    progress = min(1.0, (step - s.warmup_steps) / max(1, s.max_steps - s.warmup_steps))
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _weighted_lm_loss(model: torch.nn.Module, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
    nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1), reduction="none")
    w = weights[:, 1:].reshape(-1)
    return (nll * w).sum() / w.sum()


def _settings_fingerprint(s: ToyPretrainSettings) -> dict[str, Any]:
    # Monitoring-only fields may change across a resume without changing the result.
    d = dataclasses.asdict(s)
    for k in ("progress", "log_every", "checkpoint_every", "num_threads", "compile") + tuple(
        k for k in d if k.startswith("gate_") or k == "max_seed_tries"
    ):
        d.pop(k, None)
    return d


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run with n intra-op threads, restoring the caller's setting afterwards."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def load_or_train_tokenizer(
    settings: ToyPretrainSettings, train_docs: Sequence[str], work_dir: Path
) -> PreTrainedTokenizerFast:
    tok_dir = Path(work_dir) / "tokenizer"
    if (tok_dir / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(str(tok_dir))
    tok = train_tokenizer(train_docs, settings.vocab_size, settings.template())
    tok.save_pretrained(str(tok_dir))
    return tok


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
    template = s.template()
    data = ToyData(tokenizer, encode_stream(tokenizer, train_docs), s)
    eval_set = heldout_samples(
        tokenizer, encode_stream(tokenizer, heldout_docs), template, s.seq_len, s.eval_samples, seed
    )

    torch.manual_seed(seed)
    model = LlamaForCausalLM(s.model_config(tokenizer))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, betas=(0.9, 0.95), weight_decay=s.weight_decay)
    step, history, done = 0, [], False
    ckpt_path = work_dir / "checkpoint.pt"
    fingerprint = _settings_fingerprint(s)
    if ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if ckpt["settings"] != fingerprint or ckpt["seed"] != seed:
            raise RuntimeError(
                f"{ckpt_path} was written with other settings/seed; remove it or use another work_dir"
            )
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        step, history, done = ckpt["step"], ckpt["history"], ckpt["done"]

    def save() -> None:
        with atomic_file(ckpt_path) as scratch:  # a kill mid-save never leaves a torn checkpoint
            torch.save(
                {"settings": fingerprint, "seed": seed, "step": step, "history": history, "done": done,
                 "model": model.state_dict(), "optimizer": opt.state_dict()},
                scratch,
            )

    loss_fn = torch.compile(_weighted_lm_loss) if s.compile else _weighted_lm_loss
    bar = tqdm(total=s.max_steps, initial=step, desc=f"toy seed {seed}", disable=not s.progress,
               mininterval=2.0, dynamic_ncols=True)
    loss_sum, n_loss, t_log = 0.0, 0, time.time()
    while not done and step < s.max_steps and (stop_after is None or step < stop_after):
        ids, weights = data.batch(seed, step)
        lr = _lr_at(step, s)
        for g in opt.param_groups:
            g["lr"] = lr
        loss = loss_fn(model, ids, weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        opt.step()
        step += 1
        bar.update(1)
        loss_sum, n_loss = loss_sum + loss.item(), n_loss + 1

        metrics: dict[str, float] = {}
        if step % s.log_every == 0:
            dt = time.time() - t_log
            metrics |= {"loss": loss_sum / n_loss, "lr": lr,
                        "tokens_per_s": n_loss * ids.numel() / max(dt, 1e-9)}
            loss_sum, n_loss, t_log = 0.0, 0, time.time()
        if step % s.eval_every == 0 and step >= s.warmup_copy_steps:
            sc = needle_scores(model, eval_set, batch_size=16)
            metrics |= {"eval_em": sc["exact_match"], "eval_needle_ppl": sc["needle_ppl"]}
            history.append({"step": step, "eval_em": sc["exact_match"], "eval_needle_ppl": sc["needle_ppl"]})
            done = sc["exact_match"] >= s.early_stop_em
            bar.set_postfix(em=f"{sc['exact_match']:.2f}")
        if metrics and log_fn is not None:
            log_fn(metrics, step)
        if step % s.checkpoint_every == 0 or done or step == s.max_steps:
            done = done or step >= s.max_steps
            save()
    bar.close()
    model.eval()
    return ToyPretrainResult(
        model=model,
        tokenizer=tokenizer,
        seed=seed,
        steps=step,
        stopped_early=bool(history) and history[-1]["eval_em"] >= s.early_stop_em,
        final_eval_em=history[-1]["eval_em"] if history else float("nan"),
        wall_s=time.time() - t0,
        history=history,
    )


# --------------------------------------------------------------------------- gate


def gate(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    heldout_docs: Sequence[str],
    settings: ToyPretrainSettings,
    seed: int = 0,
) -> dict[str, float | bool]:
    """No-scaling needle scores on held-out text at each scale, plus the fragility check.

    Passes when EM at 1x >= gate_min_em (it retrieves), EM at 2x with the needle at
    depth 0.95 >= gate_min_fragility_em (it did not learn absolute positions), and EM
    at 8x <= gate_max_collapse_em (the collapse the pipeline is meant to fix).
    ``seed`` draws the held-out samples (keys, numbers, haystack offsets).
    """
    with torch_threads(settings.num_threads):
        return _gate(model, tokenizer, heldout_docs, settings, seed)


def _gate(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    heldout_docs: Sequence[str],
    s: ToyPretrainSettings,
    seed: int,
) -> dict[str, float | bool]:
    stream = encode_stream(tokenizer, heldout_docs)
    template = s.template()
    out: dict[str, float | bool] = {"seq_len": s.seq_len, "n_per_cell": s.gate_samples}

    def cell(scale: int, depth: float | None = None) -> dict[str, float]:
        samples = heldout_samples(tokenizer, stream, template, scale * s.seq_len, s.gate_samples,
                                  seed, depth=depth, purpose="gate")
        return needle_scores(model, samples, batch_size=s.gate_batch_size)

    for scale in sorted(set(s.gate_scales) | {1, s.gate_collapse_scale}):
        sc = cell(scale)  # depths evenly spread over [0, 1]
        out[f"em_{scale}x"], out[f"needle_ppl_{scale}x"] = sc["exact_match"], sc["needle_ppl"]
    sc = cell(s.gate_fragility_scale, s.gate_fragility_depth)
    out["fragility_em"], out["fragility_needle_ppl"] = sc["exact_match"], sc["needle_ppl"]
    out["pass_1x"] = out["em_1x"] >= s.gate_min_em
    out["pass_fragility"] = out["fragility_em"] >= s.gate_min_fragility_em
    out["collapse_8x"] = out[f"em_{s.gate_collapse_scale}x"] <= s.gate_max_collapse_em
    out["passed"] = bool(out["pass_1x"] and out["pass_fragility"] and out["collapse_8x"])
    return out


def pretrain_with_gate(
    settings: ToyPretrainSettings,
    train_docs: Sequence[str],
    heldout_docs: Sequence[str],
    seeds: Sequence[int],
    work_dir: str | Path,
    log_fn: LogFn | None = None,
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast, dict[str, float | bool], int, list[dict[str, Any]]]:
    """Train seeds in order (at most ``max_seed_tries``) until one passes the gate.

    Returns (model, tokenizer, gate_metrics, seed_used, attempts); each attempt is
    {seed, steps, train_wall_s, gate_wall_s, **gate figures}. Raises RuntimeError listing every tried
    seed's gate figures when none passes. Each seed resumes from
    ``work_dir/seed_<n>/checkpoint.pt``; the tokenizer lives in ``work_dir/tokenizer``.
    """
    work_dir = Path(work_dir)
    tried = list(seeds)[: settings.max_seed_tries]
    if not tried:
        raise ValueError("pretrain_with_gate needs at least one seed")
    tokenizer = load_or_train_tokenizer(settings, train_docs, work_dir)
    attempts: list[dict[str, Any]] = []
    for seed in tried:
        res = pretrain_base_model(settings, train_docs, heldout_docs, seed, work_dir / f"seed_{seed}",
                                  log_fn=log_fn, tokenizer=tokenizer)
        t0 = time.time()
        g = gate(res.model, tokenizer, heldout_docs, settings, settings.gate_sample_seed)
        attempts.append({"seed": seed, "steps": res.steps, "train_wall_s": res.wall_s,
                         "gate_wall_s": time.time() - t0, **g})
        if log_fn is not None:
            log_fn({f"gate_{k}": float(v) for k, v in g.items()}, res.steps)
        if g["passed"]:
            return res.model, tokenizer, g, seed, attempts
    lines = "\n".join(
        f"  seed {a['seed']}: steps {a['steps']}, EM "
        + " / ".join(f"{a[f'em_{x}x']:.2f}" for x in settings.gate_scales)
        + f" at {'/'.join(f'{x}x' for x in settings.gate_scales)}, fragility {a['fragility_em']:.2f}"
        f" (need 1x >= {settings.gate_min_em}, fragility >= {settings.gate_min_fragility_em},"
        f" {settings.gate_collapse_scale}x <= {settings.gate_max_collapse_em})"
        for a in attempts
    )
    raise RuntimeError(f"no seed passed the toy base-model gate:\n{lines}")

"""RULER-style needle samples (docs/method.md §4), tokenizer-agnostic; their scores are lm.losses.needle_scores.

A sample is exactly ``length`` tokens::

    [bos] prefix  haystack[:p]  needle  haystack[p:]  "\n" question " " number
                                                                         ^^^^^^ answer

The answer (the number's tokens) ends every sample, so one teacher-forced forward
pass scores it: exact match (argmax at every answer position, the same as greedy
decoding) and needle-PPL (exp of the mean over samples of the mean answer NLL).

Used by the toy pretraining, the factor search's fitness and the evaluation, with
the toy BPE tokenizer as well as real ones (LLaMA3, Phi): pieces are tokenized
separately with ``add_special_tokens=False`` and the answer tokens are found from
character offsets, so nothing assumes how a tokenizer splits numbers.
"""

from __future__ import annotations

import dataclasses
import random
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from longrope2.core.artifacts import damaged, first_line, load_tensors, read_json

RULER_PREFIX = (
    "A special magic number is hidden within the following text. "
    "Make sure to memorize it. I will quiz you about the number afterwards."
)


RULER_NEEDLE = "One of the special magic numbers for {key} is: {number}."


RULER_QUESTION = (
    "What is the special magic number for {key} mentioned in the provided text? "
    "The special magic number for {key} mentioned in the provided text is"
)


# Short question for small windows: RULER's words minus "mentioned in the provided text".
SHORT_QUESTION = (
    "What is the special magic number for {key}? The special magic number for {key} is"
)


# RULER draws keys from an English word list; a fixed vocabulary keeps samples
# reproducible and lets a toy tokenizer learn every key as whole words.
DEFAULT_KEYS: tuple[str, ...] = (
    "apple", "river", "candle", "garden", "silver", "window", "forest", "harbor",
    "lantern", "meadow", "pepper", "rocket", "saddle", "tiger", "violet", "wagon",
    "anchor", "basket", "cactus", "dolphin", "engine", "falcon", "glacier", "hammer",
    "island", "jacket", "kettle", "ladder", "marble", "needle", "orange", "pillow",
    "quartz", "ribbon", "spider", "tunnel", "umbrella", "valley", "walnut", "yellow",
    "zebra", "bottle", "castle", "desert", "feather", "guitar", "helmet", "iron",
    "jungle", "kitten", "lemon", "mirror", "nickel", "oyster", "parrot", "rabbit",
    "sunset", "thunder", "velvet", "whistle", "button", "copper", "dragon", "planet",
)


_SENTENCE_ENDS = (".", "!", "?", ";", ":")


@dataclass(frozen=True)
class NeedleTemplate:
    """The texts and number format of a needle task (default: RULER niah_single)."""

    prefix: str = RULER_PREFIX
    needle: str = RULER_NEEDLE
    question: str = RULER_QUESTION
    num_digits: int = 7
    # Distinct digits make digit-by-digit copying unambiguous (matters for tiny models).
    distinct_digits: bool = False
    keys: tuple[str, ...] = DEFAULT_KEYS
    add_bos: bool = True
    # The needle snaps to the nearest sentence end within this fraction of the haystack.
    max_snap_fraction: float = 0.05

    def __post_init__(self) -> None:
        if not 1 <= self.num_digits <= (10 if self.distinct_digits else 30):
            raise ValueError(f"num_digits={self.num_digits} out of range")
        if not self.keys:
            raise ValueError("NeedleTemplate.keys must not be empty")
        for field_name in ("needle", "question"):
            if "{key}" not in getattr(self, field_name):
                raise ValueError(f"NeedleTemplate.{field_name} must contain '{{key}}'")
        if "{number}" not in self.needle:
            raise ValueError("NeedleTemplate.needle must contain '{number}'")

    def shortened(self) -> NeedleTemplate:
        """Variant for small windows: no prefix, RULER's question without its tail."""
        return dataclasses.replace(self, prefix="", question=SHORT_QUESTION)

    def random_number(self, rng: random.Random) -> str:
        """A number of ``num_digits`` digits without a leading zero (as RULER)."""
        first = rng.choice("123456789")
        pool = [d for d in "0123456789" if d != first] if self.distinct_digits else None
        rest = (
            rng.sample(pool, self.num_digits - 1)
            if pool is not None
            else [rng.choice("0123456789") for _ in range(self.num_digits - 1)]
        )
        return first + "".join(rest)


@dataclass(frozen=True)
class NeedleSample:
    """One scored sample: ``input_ids`` of exactly the requested length."""

    input_ids: torch.Tensor  # (length,) int64
    answer_mask: torch.Tensor  # (length,) bool, True exactly on the answer tokens
    key: str
    number: str
    depth: float  # requested relative depth
    actual_depth: float  # needle start / haystack tokens after snapping
    needle_position: int  # index of the needle's first token in input_ids
    haystack_tokens: int  # filler tokens in the sample (the depth's denominator)

    @property
    def length(self) -> int:
        return int(self.input_ids.numel())

    @property
    def answer_positions(self) -> torch.Tensor:
        return torch.nonzero(self.answer_mask, as_tuple=False).flatten()


def _encode(tokenizer: Any, text: str) -> list[int]:
    if not text:
        return []
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _encode_tail(tokenizer: Any, text: str, answer_start: int) -> tuple[list[int], int]:
    """Tokenize question+answer; return ids and how many final tokens are the answer."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    # A token belongs to the answer iff its characters overlap the number's span.
    n_answer = sum(1 for (s, e) in offsets if e > answer_start)
    if n_answer == 0 or any(e <= answer_start for (s, e) in offsets[len(ids) - n_answer:]):
        raise ValueError(f"could not locate the answer tokens in {text[-40:]!r}")
    return ids, n_answer


_END_FLAGS: weakref.WeakKeyDictionary[Any, dict[int, bool]] = weakref.WeakKeyDictionary()


def _sentence_end_flags(tokenizer: Any, ids: Sequence[int]) -> list[bool]:
    """Whether each token ends a sentence (decoded text ends with . ! ? ; : or a newline)."""
    try:
        cache = _END_FLAGS.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable: no cache
        cache = {}
    missing = sorted({int(i) for i in ids} - cache.keys())
    if missing:
        for tok, text in zip(missing, tokenizer.batch_decode([[t] for t in missing])):
            stripped = text.rstrip(" \t\"'”’)]")
            cache[tok] = "\n" in text or stripped.endswith(_SENTENCE_ENDS)
    return [cache[int(i)] for i in ids]


def template_overhead(tokenizer: Any, template: NeedleTemplate) -> int:
    """Tokens a sample spends outside the haystack (for the longest key)."""
    key = max(template.keys, key=len)
    number = "9" * template.num_digits
    n = int(template.add_bos and tokenizer.bos_token_id is not None)
    n += len(_encode(tokenizer, template.prefix))
    n += len(_encode(tokenizer, " " + template.needle.format(key=key, number=number)))
    q = "\n" + template.question.format(key=key) + " "
    return n + len(_encode_tail(tokenizer, q + number, len(q))[0])


def _haystack_part(hay: Sequence[int] | torch.Tensor, n_hay: int, length: int, start: int | None,
                   rng: random.Random) -> list[int]:
    """The ``n_hay`` haystack tokens from ``start`` (default: drawn from ``rng``)."""
    if len(hay) < n_hay:
        raise ValueError(f"haystack too short: {len(hay)} tokens, but length {length} needs {n_hay}")
    if start is None:
        start = rng.randrange(len(hay) - n_hay + 1)
    elif not 0 <= start <= len(hay) - n_hay:
        raise ValueError(f"start={start} leaves fewer than {n_hay} haystack tokens")
    window = hay[start : start + n_hay]  # slice first: never copy a whole book
    return window.tolist() if isinstance(window, torch.Tensor) else [int(t) for t in window]


def build_needle_sample(
    tokenizer: Any,
    haystack_ids: Sequence[int] | torch.Tensor,
    length: int,
    depth: float,
    rng: random.Random,
    template: NeedleTemplate = NeedleTemplate(),
    *,
    key: str | None = None,
    number: str | None = None,
    start: int | None = None,
) -> NeedleSample:
    """Build one sample of exactly ``length`` tokens.

    ``haystack_ids``: token ids of filler text (no special tokens), at least as many
    as the haystack part needs; the part used starts at ``start`` (default: drawn
    from ``rng``). ``depth`` in [0, 1] places the needle at that relative position
    of the haystack part, moved to the nearest sentence end nearby. ``key`` and
    ``number`` default to random draws from ``rng`` and the template.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    key = rng.choice(template.keys) if key is None else key
    number = template.random_number(rng) if number is None else number

    head: list[int] = []
    if template.add_bos and tokenizer.bos_token_id is not None:
        head.append(int(tokenizer.bos_token_id))
    head += _encode(tokenizer, template.prefix)
    needle_ids = _encode(tokenizer, " " + template.needle.format(key=key, number=number))
    question = "\n" + template.question.format(key=key) + " "
    tail_ids, n_answer = _encode_tail(tokenizer, question + number, len(question))

    n_hay = length - len(head) - len(needle_ids) - len(tail_ids)
    if n_hay < 0:
        raise ValueError(f"length {length} is too short for the needle template: it needs "
                         f"{length - n_hay} tokens before any haystack")
    part = _haystack_part(haystack_ids, n_hay, length, start, rng)

    pos = _snap_to_sentence_end(tokenizer, part, depth, template.max_snap_fraction)
    ids = head + part[:pos] + needle_ids + part[pos:] + tail_ids
    assert len(ids) == length
    mask = torch.zeros(length, dtype=torch.bool)
    mask[length - n_answer :] = True
    return NeedleSample(input_ids=torch.tensor(ids, dtype=torch.long), answer_mask=mask, key=key, number=number,
                        depth=float(depth), actual_depth=pos / n_hay if n_hay else float(depth),
                        needle_position=len(head) + pos, haystack_tokens=n_hay)


def _snap_to_sentence_end(
    tokenizer: Any, part: list[int], depth: float, max_snap_fraction: float
) -> int:
    n = len(part)
    target = round(depth * n)
    if n == 0 or target in (0, n):
        return target
    flags = _sentence_end_flags(tokenizer, part)
    max_snap = max(1, int(max_snap_fraction * n))
    # Insertion point p is a boundary if the token before it ends a sentence.
    for dist in range(max_snap + 1):
        for p in (target - dist, target + dist):
            if 0 <= p <= n and (p in (0, n) or flags[p - 1]):
                return p
    return target


def template_for(name: str, num_digits: int, *, distinct_digits: bool = False, add_bos: bool = True) -> NeedleTemplate:
    """The template a config names: ``ruler`` (docs/method.md §4 verbatim) or ``toy`` (shortened for small windows)."""
    if name not in TEMPLATES:
        raise ValueError(f"unknown needle template {name!r}; accepted: {', '.join(TEMPLATES)}")
    template = NeedleTemplate(num_digits=num_digits, distinct_digits=distinct_digits, add_bos=add_bos)
    return template.shortened() if name == "toy" else template


TEMPLATES = ("ruler", "toy")


def stack_samples(samples: Sequence[NeedleSample]) -> dict[str, torch.Tensor]:
    """Tensors of a needle set: input_ids (n, L) int32, answer_mask (n, L) bool, needle_position (n,)."""
    if not samples or len({s.length for s in samples}) != 1:
        raise ValueError("a needle set needs at least one sample, all of one length")
    return {
        "input_ids": torch.stack([s.input_ids for s in samples]).to(torch.int32),
        "answer_mask": torch.stack([s.answer_mask for s in samples]),
        "needle_position": torch.tensor([s.needle_position for s in samples], dtype=torch.int64),
    }


def unstack_samples(tensors: dict[str, torch.Tensor], meta: Sequence[dict[str, Any]]) -> list[NeedleSample]:
    """Inverse of :func:`stack_samples` with the per-sample metadata (key, number, depths)."""
    ids, mask = tensors["input_ids"].long(), tensors["answer_mask"].bool()
    if len(meta) != ids.shape[0]:
        raise ValueError(f"needle set holds {ids.shape[0]} samples but {len(meta)} metadata rows")
    return [
        NeedleSample(input_ids=ids[i], answer_mask=mask[i], key=m["key"], number=m["number"],
                     depth=float(m["depth"]), actual_depth=float(m["actual_depth"]),
                     needle_position=int(tensors["needle_position"][i]), haystack_tokens=int(m["haystack_tokens"]))
        for i, m in enumerate(meta)
    ]


NEEDLE_SET_KEYS = ("input_ids", "answer_mask", "needle_position", "plain_ids")  # a needle_data .pt file


def needle_template(cfg: DictConfig) -> NeedleTemplate:
    """data.needle's template; the toy's digits and BOS follow its pretraining."""
    pretrain = cfg.model.pretrain
    toy_base = bool(pretrain.enabled)
    return template_for(
        str(cfg.data.needle.template), int(cfg.data.needle.number_digits),
        distinct_digits=bool(pretrain.get("distinct_digits", False)) if toy_base else False,
        add_bos=bool(pretrain.get("add_bos", True)) if toy_base else True,
    )


def load_needle_sets(folder: Path) -> dict[str, tuple[list[NeedleSample], torch.Tensor]]:
    """Every needle set stage needle_data wrote: split -> (samples, plain_ids); a size-0 split is absent."""
    meta = read_json(folder / "needle_data.json")
    sets = {}
    for split in ("search", "validation", "validation_short"):
        if split in meta:
            path = folder / f"{split}.pt"
            tensors = load_tensors(path, NEEDLE_SET_KEYS)
            try:
                sets[split] = unstack_samples(tensors, meta[split]["meta"]), tensors["plain_ids"]
            except (ValueError, KeyError, TypeError) as err:  # the two files are not of one run
                raise damaged(path, f"does not match needle_data.json: {first_line(err)}") from None
    return sets

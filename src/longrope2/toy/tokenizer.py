"""The toy's byte-level BPE tokenizer, every digit its own token."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

from transformers import PreTrainedTokenizerFast

from longrope2.data.needles import NeedleTemplate
from longrope2.toy.settings import ToyPretrainSettings

SPECIAL_TOKENS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}


DIGITS = "0123456789"


def train_tokenizer(
    texts: Sequence[str], vocab_size: int, template: NeedleTemplate | None = None
) -> PreTrainedTokenizerFast:
    """Byte-level BPE with every digit its own token (a key's digits = one token each).

    The template's needle/question sentences are added to the training texts for every
    key, so template words and keys become whole tokens in a small vocabulary.
    """
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )

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


def load_or_train_tokenizer(
    settings: ToyPretrainSettings, train_docs: Sequence[str], work_dir: Path
) -> PreTrainedTokenizerFast:
    tok_dir = Path(work_dir) / "tokenizer"
    if (tok_dir / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(str(tok_dir))
    tok = train_tokenizer(train_docs, settings.vocab_size, settings.template())
    tok.save_pretrained(str(tok_dir))
    return tok

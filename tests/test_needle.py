"""Needle samples (docs/method.md §4): exact length, answer-only scoring, tokenizer-agnostic."""

from __future__ import annotations

import math
import random

import pytest
import torch
from numerics import IDENTITY_REL
from tokenizers import (
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    trainers,
)
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from longrope2.data.corpus import generate_documents
from longrope2.data.needles import (
    RULER_NEEDLE,
    RULER_PREFIX,
    RULER_QUESTION,
    NeedleTemplate,
    build_needle_sample,
    template_overhead,
)
from longrope2.lm.losses import needle_sample_losses, needle_scores
from longrope2.toy.data import encode_stream
from longrope2.toy.settings import toy_llama_config
from longrope2.toy.tokenizer import train_tokenizer

DOCS = generate_documents(4, 3000, seed=1)
TOY = NeedleTemplate(num_digits=5, distinct_digits=True).shortened()


def _sentencepiece_like(texts: list[str]) -> PreTrainedTokenizerFast:
    """Metaspace BPE (Llama-2 style): numbers are NOT split into digits."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"],
                                  show_progress=False)
    extra = [RULER_PREFIX, RULER_QUESTION, RULER_NEEDLE, " ".join(NeedleTemplate().keys),
             "0123456789 12 345 6789 1234567"]
    tok.train_from_iterator(texts + extra * 50, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _llama3_like(texts: list[str]) -> PreTrainedTokenizerFast:
    """Byte-level BPE with LLaMA-3's split regex: numbers in groups of up to 3 digits."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=800, special_tokens=["<|begin_of_text|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    extra = [RULER_PREFIX, RULER_QUESTION, RULER_NEEDLE, "123 4567 890"]
    tok.train_from_iterator(texts + extra * 50, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>")


@pytest.fixture(scope="module")
def toy_tok() -> PreTrainedTokenizerFast:
    return train_tokenizer(DOCS, 400, TOY)


@pytest.fixture(scope="module", params=["toy_bpe", "sentencepiece_like", "llama3_like"])
def tok_and_template(request, toy_tok):
    if request.param == "toy_bpe":
        return toy_tok, TOY
    if request.param == "llama3_like":
        return _llama3_like(DOCS), NeedleTemplate()
    return _sentencepiece_like(DOCS), NeedleTemplate()  # full RULER template, 7 digits


@pytest.fixture(scope="module")
def stream(toy_tok) -> torch.Tensor:
    return encode_stream(toy_tok, DOCS)


@pytest.mark.parametrize("haystack_len", [8, 33, 160, 400])
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 0.95, 1.0])
def test_exact_length_and_answer_only_mask(tok_and_template, haystack_len, depth):
    tok, tmpl = tok_and_template
    hay = encode_stream(tok, DOCS)
    # Lengths relative to the template's own size, so every tokenizer gets every case.
    length = template_overhead(tok, tmpl) + haystack_len
    s = build_needle_sample(tok, hay, length, depth, random.Random(3), tmpl)
    assert s.input_ids.shape == (length,)
    assert s.answer_mask.shape == (length,)
    pos = s.answer_positions.tolist()
    # the answer is one contiguous span ending the window, and nothing else is scored
    assert pos == list(range(length - len(pos), length))
    assert 1 <= len(pos) <= tmpl.num_digits
    assert tok.decode(s.input_ids[s.answer_mask]).strip() == s.number
    assert tok.decode(s.input_ids[: pos[0]]).rstrip().endswith(
        tmpl.question.format(key=s.key).split()[-1]
    )
    n = s.haystack_tokens
    assert abs(s.actual_depth - depth) <= (max(1, int(tmpl.max_snap_fraction * n)) + 0.5) / n


def test_decoded_text_is_the_template(toy_tok, stream):
    s = build_needle_sample(toy_tok, stream, 160, 0.5, random.Random(0), TOY)
    text = toy_tok.decode(s.input_ids, skip_special_tokens=True)
    assert TOY.needle.format(key=s.key, number=s.number) in text
    assert text.endswith("\n" + TOY.question.format(key=s.key) + " " + s.number)
    assert s.key in TOY.keys and len(set(s.number)) == len(s.number) == 5
    assert toy_tok.decode(s.input_ids[s.needle_position : s.needle_position + 3]).strip().startswith("One")


def test_full_ruler_template_text():
    tok = _sentencepiece_like(DOCS)
    hay = encode_stream(tok, DOCS)
    s = build_needle_sample(tok, hay, 400, 0.2, random.Random(1), NeedleTemplate())
    text = tok.decode(s.input_ids, skip_special_tokens=True)
    assert text.startswith(RULER_PREFIX)
    assert RULER_NEEDLE.format(key=s.key, number=s.number) in text
    assert text.endswith(RULER_QUESTION.format(key=s.key) + " " + s.number)
    assert len(s.number) == 7 and s.number[0] != "0"


def test_deterministic_for_a_seed(toy_tok, stream):
    a = [build_needle_sample(toy_tok, stream, 128, d, random.Random(7), TOY) for d in (0.1, 0.9)]
    b = [build_needle_sample(toy_tok, stream, 128, d, random.Random(7), TOY) for d in (0.1, 0.9)]
    c = build_needle_sample(toy_tok, stream, 128, 0.1, random.Random(8), TOY)
    for x, y in zip(a, b):
        assert torch.equal(x.input_ids, y.input_ids) and (x.key, x.number) == (y.key, y.number)
    assert not torch.equal(a[0].input_ids, c.input_ids)


def test_haystack_too_short_is_a_clear_error(toy_tok, stream):
    with pytest.raises(ValueError, match="haystack too short"):
        build_needle_sample(toy_tok, stream[:50], 256, 0.5, random.Random(0), TOY)
    with pytest.raises(ValueError, match="too short for the needle template"):
        build_needle_sample(toy_tok, stream, 20, 0.5, random.Random(0), TOY)
    with pytest.raises(ValueError, match="depth"):
        build_needle_sample(toy_tok, stream, 128, 1.5, random.Random(0), TOY)


def test_needle_scores_match_naive_full_logits(toy_tok, stream, torch_threads):
    # float64 (tests/numerics.py): batched answer-only logits vs one sample's full logits is an identity,
    # and no near-tie of two logits can flip an argmax between the two summation orders.
    torch.manual_seed(0)
    model = LlamaForCausalLM(toy_llama_config(len(toy_tok), hidden_size=64, num_layers=2,
                                              num_heads=2, head_dim=32, intermediate_size=128)).double()
    model.eval()
    rng = random.Random(5)
    samples = [build_needle_sample(toy_tok, stream, L, d, rng, TOY)
               for L in (96, 128) for d in (0.0, 0.4, 0.8)]
    # make one sample an exact match by construction: not needed for equality, so also
    # check the EM computation against argmax of the full logits
    got = needle_scores(model, samples, batch_size=2)
    nll_got, em_got = needle_sample_losses(model, samples, batch_size=4)

    nlls, ems = [], []
    with torch.no_grad():
        for s in samples:
            logits = model(input_ids=s.input_ids[None]).logits[0]  # (L, V): naive
            labels = torch.full_like(s.input_ids, -100)
            labels[s.answer_mask] = s.input_ids[s.answer_mask]
            shift_logits, shift_labels = logits[:-1], labels[1:]
            nlls.append(float(torch.nn.functional.cross_entropy(shift_logits, shift_labels,
                                                                ignore_index=-100)))
            sel = shift_labels != -100
            ems.append(bool((shift_logits[sel].argmax(-1) == shift_labels[sel]).all()))
    assert got["n"] == len(samples)
    assert got["needle_ppl"] == pytest.approx(math.exp(sum(nlls) / len(nlls)), rel=IDENTITY_REL)
    assert got["exact_match"] == pytest.approx(sum(ems) / len(ems))
    assert nll_got == pytest.approx(nlls, rel=IDENTITY_REL)
    assert em_got == ems


def test_needle_scores_exact_match_when_model_is_perfect(toy_tok, stream):
    """A model that always predicts 'the next token of this very sample' has EM 1."""

    class Oracle(torch.nn.Module):
        def __init__(self, ids: torch.Tensor, vocab: int):
            super().__init__()
            self.ids, self.vocab = ids, vocab
            self.w = torch.nn.Parameter(torch.zeros(1))
            outer = self

            class Backbone(torch.nn.Module):
                def forward(self, input_ids, use_cache=False):
                    h = torch.arange(input_ids.shape[1]).expand_as(input_ids).float()[..., None]
                    return type("O", (), {"last_hidden_state": h})()

            class Head(torch.nn.Module):
                def forward(self, h):
                    nxt = outer.ids[h[:, 0].long() + 1]
                    return torch.nn.functional.one_hot(nxt, outer.vocab).float() * 50

            self.model, self.head = Backbone(), Head()

        def get_output_embeddings(self):
            return self.head

    s = build_needle_sample(toy_tok, stream, 128, 0.5, random.Random(0), TOY)
    sc = needle_scores(Oracle(s.input_ids, len(toy_tok)), [s])
    assert sc["exact_match"] == 1.0 and sc["needle_ppl"] == pytest.approx(1.0, abs=1e-6)

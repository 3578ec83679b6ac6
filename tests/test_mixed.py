"""Mixed-window rows: packed short rows equal separate documents, the switch, per-document masks,
and the chunked loss equals the full-logits loss (value and gradients).

The identities are checked in float64, under 1 and 2 threads, with bounds relative to each tensor's
scale (tests/numerics.py): they hold on any CPU's summation order."""

from __future__ import annotations

import pytest
import torch
from numerics import FLOAT32_REL, IDENTITY_REL, assert_close_to_scale
from transformers import AutoModelForCausalLM

from longrope2.data import rows as rows_
from longrope2.lm import losses
from longrope2.rope import factors as rope
from longrope2.rope.hf_config import rope_facts_from_hf_config
from longrope2.rope.scaling import RopeScaling
from longrope2.training import mixed

TRAIN_LEN = 64  # the toy_model_dir fixture's window


def _float64_model(toy_model_dir):
    # transformers computes RoPE's cos/sin in float32 on every path alike; the rest runs in float64.
    return AutoModelForCausalLM.from_pretrained(toy_model_dir, dtype=torch.float64, attn_implementation="sdpa")


@pytest.fixture(scope="module")
def base(toy_model_dir):
    return _float64_model(toy_model_dir)


def _docs(vocab, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(5, vocab, (n,), generator=g) for n in lengths]


def _sum_nll(model, ids, position_ids=None, doc_ids=None):
    mask = None if doc_ids is None else mixed.document_causal_mask(doc_ids, ids_dtype(model))
    hidden = model.model(input_ids=ids, position_ids=position_ids, attention_mask=mask).last_hidden_state
    labels = losses.causal_lm_labels(ids, doc_ids)
    return losses.chunked_causal_lm_loss(hidden, model.get_output_embeddings(), labels, chunk=23)


def ids_dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


def test_packed_short_row_equals_its_documents_run_separately(toy_model_dir, torch_threads):
    # A longrope model: the packed row is 150 tokens long, but every position is < L_train, so
    # the switch must pick the short factors, exactly as for the documents alone (transformers'
    # longrope scales cos/sin by the attention factor on both paths).
    model = _float64_model(toy_model_dir)
    facts = rope_facts_from_hf_config(model.config)
    RopeScaling.longrope2(facts, 512, tail=[8.0] * 10, critical_dim=6).apply_to_model(model)
    lengths = [64, 30, 1, 55]
    docs = _docs(model.config.vocab_size, lengths)
    row = torch.cat(docs)[None]
    pos = rows_.document_position_ids(lengths)[None]
    assert not mixed.uses_long_rope(pos, TRAIN_LEN)
    with torch.no_grad():
        packed, n_packed = _sum_nll(model, row, pos, doc_ids=rows_.document_ids(pos))
        alone = [_sum_nll(model, d[None]) for d in docs]
    assert n_packed == sum(n for _, n in alone) == sum(lengths) - len(lengths)
    assert float(packed) / n_packed == pytest.approx(float(sum(s for s, _ in alone)) / n_packed, rel=IDENTITY_REL)


def test_long_row_uses_the_rescaled_rope(toy_model_dir):
    model = AutoModelForCausalLM.from_pretrained(toy_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    facts = rope_facts_from_hf_config(model.config)
    scaling = RopeScaling.longrope2(facts, 512, tail=[9.0] * 10, critical_dim=6)
    scaling.apply_to_model(model)
    pos = torch.arange(200)[None]
    assert mixed.uses_long_rope(pos, TRAIN_LEN)
    rotary = model.model.rotary_emb
    cos, _ = rotary(torch.zeros(1, dtype=torch.float32), pos)
    ours, _ = scaling.cos_sin(pos)
    # both in float32 (transformers' RoPE is): angles up to 200 rad carry ~200 x eps of rounding
    assert_close_to_scale(cos, ours, FLOAT32_REL, "long cos")
    short_cos, _ = rotary(torch.zeros(1, dtype=torch.float32), torch.arange(TRAIN_LEN)[None])
    plain = torch.outer(torch.arange(TRAIN_LEN).float(), rope.inv_freq(32, facts.rope_theta))
    assert_close_to_scale(short_cos[0], torch.cat([plain, plain], -1).cos() * scaling.attention_factor, FLOAT32_REL,
                          "short cos")


def test_per_document_mask_in_a_long_row(base, torch_threads):
    lengths = [40, 70, 50]
    docs = _docs(base.config.vocab_size, lengths, seed=1)
    row = torch.cat(docs)[None]
    doc_ids = torch.repeat_interleave(torch.arange(3), torch.tensor(lengths))[None]
    mask = mixed.document_causal_mask(doc_ids, torch.float64)
    with torch.no_grad():
        hidden = base.model(input_ids=row, attention_mask=mask).last_hidden_state
        # The second document alone, at the positions it has in the row (40 ... 109).
        alone = base.model(input_ids=docs[1][None], position_ids=torch.arange(40, 110)[None]).last_hidden_state
    assert_close_to_scale(hidden[0, 40:110], alone[0], IDENTITY_REL, "masked doc 2")
    with torch.no_grad():
        full = base.model(input_ids=row).last_hidden_state
    with pytest.raises(AssertionError):  # full attention does see doc 1: the bound tells the two apart
        assert_close_to_scale(full[0, 40:110], alone[0], IDENTITY_REL, "unmasked doc 2")


def test_chunked_loss_equals_full_logits_loss_with_gradients(base, torch_threads):
    ids = _docs(base.config.vocab_size, [97])[0][None]
    labels = losses.causal_lm_labels(ids)
    with torch.no_grad():  # transformers' own shift + mean (it casts the logits to float32)
        theirs = float(base(input_ids=ids, labels=ids).loss)
    base.zero_grad()
    logits = base(input_ids=ids).logits[0]  # (97, V) float64: the full logits at once
    full = torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:])
    full.backward()
    expected = {n: p.grad.clone() for n, p in base.named_parameters()}
    base.zero_grad()
    hidden = base.model(input_ids=ids).last_hidden_state
    total, count = losses.chunked_causal_lm_loss(hidden, base.get_output_embeddings(), labels, chunk=10)
    (total / count).backward()
    assert total.dtype == torch.float64 and count == 96
    assert float((total / count).detach()) == pytest.approx(float(full.detach()), rel=IDENTITY_REL)
    assert float(full.detach()) == pytest.approx(theirs, rel=FLOAT32_REL)
    for name, p in base.named_parameters():
        assert_close_to_scale(p.grad, expected[name], IDENTITY_REL, name)
    base.zero_grad()


def test_labels_never_cross_documents():
    pos = rows_.document_position_ids([3, 2])[None]
    ids = torch.tensor([[10, 11, 12, 20, 21]])
    assert losses.causal_lm_labels(ids, rows_.document_ids(pos)).tolist() == [[11, 12, -100, 21, -100]]
    with pytest.raises(ValueError, match=r"document lengths must be positive, got \[3, 0\]"):
        rows_.document_position_ids([3, 0])


def test_label_weights_follow_the_predicted_token():
    pos = rows_.document_position_ids([3, 2])[None]
    ids = torch.tensor([[10, 11, 12, 20, 21]])
    labels = losses.causal_lm_labels(ids, rows_.document_ids(pos))
    loss_weight = torch.tensor([[1.0, 1.0, 2.0, 1.0, 2.0]])  # tokens 12 and 21 are answers
    # label t predicts token t+1: weight of the predicted token, 0 where there is no target
    assert losses.label_weights(loss_weight, labels).tolist() == [[1.0, 2.0, 0.0, 2.0, 0.0]]


def test_weighted_chunked_loss_equals_a_hand_weighted_full_loss(base, torch_threads):
    ids = _docs(base.config.vocab_size, [80], seed=2)[0][None]
    labels = losses.causal_lm_labels(ids)
    loss_weight = torch.ones(ids.shape)
    loss_weight[0, 60:70] = 3.0
    weights = losses.label_weights(loss_weight, labels)
    with torch.no_grad():
        logits = base(input_ids=ids).logits[0, :-1]
        nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
        expected = float((nll * loss_weight[0, 1:]).sum() / loss_weight[0, 1:].sum())
        hidden = base.model(input_ids=ids).last_hidden_state
        total, denom = losses.chunked_causal_lm_loss(hidden, base.get_output_embeddings(), labels, 17, weights)
    assert denom == pytest.approx(79 + 2 * 10)
    assert float(total) / denom == pytest.approx(expected, rel=IDENTITY_REL)
    with pytest.raises(ValueError, match=r"weights \(1, 79\) and labels \(1, 80\) disagree"):
        losses.chunked_causal_lm_loss(hidden, base.get_output_embeddings(), labels, 17, weights[:, :-1])


def test_unpacked_documents_are_right_padded_rows_of_their_own():
    pos = torch.stack([rows_.document_position_ids([3, 2]), rows_.document_position_ids([5])])  # (2, 5)
    ids = torch.tensor([[10, 11, 12, 20, 21], [30, 31, 32, 33, 34]])
    doc_ids = rows_.document_ids(pos)
    labels = losses.causal_lm_labels(ids, doc_ids)
    weights = losses.label_weights(torch.tensor([[1.0, 1.0, 2.0, 1.0, 2.0], [1.0] * 5]), labels)
    u_ids, u_pos, u_labels, u_weights = mixed.unpack_documents(doc_ids, ids, pos, labels, weights)
    assert u_ids.tolist() == [[10, 11, 12, 0, 0], [20, 21, 0, 0, 0], [30, 31, 32, 33, 34]]
    assert u_pos.tolist() == [[0, 1, 2, 3, 4]] * 3  # padding continues the document's positions
    assert u_labels.tolist() == [[11, 12, -100, -100, -100], [21, -100, -100, -100, -100],
                                 [31, 32, 33, 34, -100]]
    assert u_weights.tolist() == [[1.0, 2.0, 0.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0, 0.0], [1.0] * 4 + [0.0]]
    # row 0's last document and row 1's only one share doc id 0 in their rows: still two documents
    assert mixed.unpack_documents(torch.zeros(2, 4, dtype=torch.long), *[torch.ones(2, 4)] * 4)[0].shape == (2, 4)
    with pytest.raises(ValueError, match=r"doc_ids must be \(batch, length\), got shape \(5,\)"):
        mixed.unpack_documents(doc_ids[0], ids, pos, labels, weights)


def test_unpacked_documents_give_the_masked_packed_rows_loss_and_gradients(toy_model_dir, torch_threads):
    # What the train stage runs for short rows under SDPA: each document as a row of its own
    # (no mask) must train exactly like the packed rows under the per-document mask, on a
    # longrope model whose short factors the unpacked rows must keep.
    model = _float64_model(toy_model_dir)
    facts = rope_facts_from_hf_config(model.config)
    RopeScaling.longrope2(facts, 512, tail=[8.0] * 10, critical_dim=6).apply_to_model(model)
    rows = [[30, 64, 10, 50, 40, 62], [64, 64, 64, 64]]  # two packed rows of 256 tokens
    pos = torch.stack([rows_.document_position_ids(r) for r in rows])
    doc_ids = rows_.document_ids(pos)
    ids = torch.cat(_docs(model.config.vocab_size, [256, 256], seed=3)).view(2, 256)
    labels = losses.causal_lm_labels(ids, doc_ids)
    loss_weight = torch.ones(ids.shape)
    loss_weight[:, 100:120] = 3.0
    weights = losses.label_weights(loss_weight, labels)
    head = model.get_output_embeddings()

    def loss_and_grads(ids, pos, mask, labels, weights):
        model.zero_grad()
        hidden = model.model(input_ids=ids, position_ids=pos, attention_mask=mask).last_hidden_state
        total, denom = losses.chunked_causal_lm_loss(hidden, head, labels, 64, weights)
        total.backward()
        return float(total.detach()), denom, {n: p.grad.clone() for n, p in model.named_parameters()}

    packed = loss_and_grads(ids, pos, mixed.document_causal_mask(doc_ids, torch.float64), labels, weights)
    u_ids, u_pos, u_labels, u_weights = mixed.unpack_documents(doc_ids, ids, pos, labels, weights)
    assert u_ids.shape == (10, 64) and not mixed.uses_long_rope(u_pos, TRAIN_LEN)
    unpacked = loss_and_grads(u_ids, u_pos, None, u_labels, u_weights)
    assert unpacked[1] == packed[1]
    assert unpacked[0] == pytest.approx(packed[0], rel=IDENTITY_REL)
    for name, grad in packed[2].items():
        assert_close_to_scale(unpacked[2][name], grad, IDENTITY_REL, name)
    # without its mask the packed row is a different computation, which the comparison tells apart
    unmasked = loss_and_grads(ids, pos, None, labels, weights)[2]
    differs = []
    for name, grad in packed[2].items():
        try:
            assert_close_to_scale(unmasked[name], grad, IDENTITY_REL, name)
        except AssertionError:
            differs.append(name)
    assert differs
    model.zero_grad()

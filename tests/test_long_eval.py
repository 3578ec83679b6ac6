"""Long-context evaluations: sliding-window NLL against naive full-logit loops, the needle grid."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from longrope2.data.corpus import generate_documents
from longrope2.data.needles import NeedleTemplate
from longrope2.evaluation.niah import NiahCell, niah_grid, niah_samples, niah_table
from longrope2.evaluation.perplexity import perplexity_by_length, sliding_window_nll
from longrope2.reporting.figures import plot_niah_heatmap
from longrope2.toy.data import encode_stream
from longrope2.toy.settings import toy_llama_config
from longrope2.toy.tokenizer import train_tokenizer

TOY = NeedleTemplate(num_digits=5, distinct_digits=True).shortened()
DOCS = generate_documents(3, 1500, seed=11)


@pytest.fixture(scope="module")
def lm() -> LlamaForCausalLM:
    """Tiny random Llama, fp32; a large init spread so per-token losses differ visibly."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                      initializer_range=0.2, rope_parameters={"rope_type": "default", "rope_theta": 1e4})
    return LlamaForCausalLM(cfg).float().eval()


@pytest.fixture(scope="module")
def doc() -> torch.Tensor:
    return torch.randint(0, 100, (203,), generator=torch.Generator().manual_seed(1))


def _naive_disjoint(model, ids, window):
    """Sum over non-overlapping windows of model(w, labels=w).loss x (len(w) - 1)."""
    nll, n = 0.0, 0
    with torch.no_grad():
        for b in range(0, ids.numel(), window):
            w = ids[b : b + window][None]
            if w.shape[1] < 2:
                continue
            nll += float(model(input_ids=w, labels=w).loss) * (w.shape[1] - 1)
            n += w.shape[1] - 1
    return nll, n


def _naive_hf_guide(model, ids, window, stride):
    """The HF guide's loop with full logits per window; scores the tokens new to each window."""
    nll, scored = 0.0, []
    prev_end, T = 0, ids.numel()
    with torch.no_grad():
        for begin in range(0, T, stride):
            end = min(begin + window, T)
            logits = model(input_ids=ids[begin:end][None]).logits[0]  # (W, V): naive
            logp = torch.log_softmax(logits.double(), dim=-1)
            new = torch.arange(max(prev_end, begin + 1), end)  # positions not scored before
            nll -= float(logp[new - begin - 1, ids[new]].sum())
            scored += new.tolist()
            prev_end = end
            if end == T:
                break
    return nll, scored


@pytest.mark.parametrize("window,chunk", [(64, 1024), (50, 7), (203, 16)])
def test_disjoint_windows_equal_plain_losses(lm, doc, window, chunk):
    got, n = sliding_window_nll(lm, doc, window=window, stride=window, chunk=chunk)
    exp_nll, exp_n = _naive_disjoint(lm, doc, window)
    assert n == exp_n == doc.numel() - math.ceil(doc.numel() / window)
    assert got == pytest.approx(exp_nll, rel=1e-4)


def test_window_longer_than_document_is_one_full_forward(lm, doc):
    with torch.no_grad():
        full = float(lm(input_ids=doc[None], labels=doc[None]).loss) * (doc.numel() - 1)
    for window, stride in [(doc.numel(), 5), (300, 300), (512, 1)]:
        got, n = sliding_window_nll(lm, doc, window=window, stride=stride, chunk=33)
        assert n == doc.numel() - 1
        assert got == pytest.approx(full, rel=1e-4)


@pytest.mark.parametrize("window,stride", [(64, 16), (64, 63), (40, 25), (24, 1)])
def test_overlapping_windows_equal_hf_guide_loop(lm, doc, window, stride):
    ids = doc[:60] if stride == 1 else doc
    got, n = sliding_window_nll(lm, ids, window=window, stride=stride, chunk=10)
    exp_nll, scored = _naive_hf_guide(lm, ids, window, stride)
    assert sorted(scored) == list(range(1, ids.numel()))  # each token but the first, once
    assert n == len(scored)
    assert got == pytest.approx(exp_nll, rel=1e-4)


def test_never_builds_window_by_vocab_logits(lm, doc):
    seen = []
    hook = lm.lm_head.register_forward_hook(lambda mod, inp, out: seen.append(tuple(out.shape)))
    original = lm.forward
    lm.forward = lambda *a, **k: pytest.fail("the full causal-LM forward must not run")
    try:
        sliding_window_nll(lm, doc, window=128, stride=64, chunk=16)
    finally:
        lm.forward = original
        hook.remove()
    assert seen and max(s[1] for s in seen) <= 16


@pytest.mark.parametrize("stride", [0, -3, 65])
def test_stride_out_of_range(lm, doc, stride):
    with pytest.raises(ValueError) as err:
        sliding_window_nll(lm, doc, window=64, stride=stride)
    assert str(err.value) == f"stride must be in [1, window=64], got {stride}"


def test_perplexity_by_length(lm):
    g = torch.Generator().manual_seed(2)
    docs = [torch.randint(0, 100, (n,), generator=g) for n in (150, 64, 65, 90)]
    out = perplexity_by_length(lm, docs, [64, 128], progress=False)
    parts = [sliding_window_nll(lm, d, 64, 64) for d in (docs[0], docs[2], docs[3])]
    nll, n = sum(p[0] for p in parts), sum(p[1] for p in parts)
    assert out[64]["tokens"] == n and out[64]["documents"] == 3 and out[64]["skipped"] == 1
    assert out[64]["ppl"] == pytest.approx(math.exp(nll / n), rel=1e-6)
    assert out[64]["stride"] == 64
    d128 = sliding_window_nll(lm, docs[0], 128, 128)
    assert out[128]["documents"] == 1 and out[128]["skipped"] == 3 and out[128]["tokens"] == d128[1]
    # overlapping stride, truncation: documents cut to 80 tokens, the 64-token one skipped
    cut = perplexity_by_length(lm, docs, [64], stride=16, max_tokens=80, progress=False)[64]
    parts = [sliding_window_nll(lm, d[:80], 64, 16) for d in (docs[0], docs[2], docs[3])]
    assert cut["tokens"] == sum(p[1] for p in parts) == 79 + 64 + 79
    assert cut["ppl"] == pytest.approx(math.exp(sum(p[0] for p in parts) / cut["tokens"]), rel=1e-6)
    none = perplexity_by_length(lm, docs, [200], progress=False)[200]
    assert none["ppl"] is None and none["skipped"] == 4 and none["tokens"] == 0
    with pytest.raises(ValueError, match=r"stride must be in \[1, window=64\], got 100"):
        perplexity_by_length(lm, docs, [64], stride=100, progress=False)


# --------------------------------------------------------------------------- needle grid


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(DOCS, 300, TOY)


@pytest.fixture(scope="module")
def books(tok) -> list[torch.Tensor]:
    return [encode_stream(tok, [d]) for d in DOCS]


LENGTHS, DEPTHS, RUNS = (96, 160), (0.0, 0.5, 1.0), 3


@pytest.fixture(scope="module")
def grid_samples(tok, books):
    return niah_samples(tok, books, LENGTHS, DEPTHS, RUNS, TOY, seed=4)


def _same(a, b) -> bool:
    return torch.equal(a.input_ids, b.input_ids) and torch.equal(a.answer_mask, b.answer_mask) \
        and (a.key, a.number, a.needle_position) == (b.key, b.number, b.needle_position)


def test_niah_samples_shape_and_determinism(tok, books, grid_samples):
    assert set(grid_samples) == {(L, d) for L in LENGTHS for d in DEPTHS}
    for (L, d), cell in grid_samples.items():
        assert len(cell) == RUNS
        assert all(s.length == L and s.input_ids.shape == (L,) and s.depth == d for s in cell)
        assert len({s.number for s in cell}) == RUNS  # distinct numbers across runs
        assert tok.decode(cell[0].input_ids[cell[0].answer_mask]).strip() == cell[0].number
    again = niah_samples(tok, books, LENGTHS, DEPTHS, RUNS, TOY, seed=4)
    more = niah_samples(tok, books, (128, *LENGTHS), DEPTHS[1:], RUNS + 1, TOY, seed=4)
    other = niah_samples(tok, books, LENGTHS, DEPTHS, RUNS, TOY, seed=5)
    for key, cell in grid_samples.items():
        assert all(_same(a, b) for a, b in zip(cell, again[key]))
        if key in more:  # another length, fewer depths and one more run change nothing here
            assert all(_same(a, b) for a, b in zip(cell, more[key][:RUNS]))
        assert not all(_same(a, b) for a, b in zip(cell, other[key]))
    # one stream or several: a single tensor works too
    single = niah_samples(tok, books[0], (96,), (0.5,), 2, TOY, seed=0)
    assert [s.length for s in single[(96, 0.5)]] == [96, 96]


def test_niah_samples_too_short_haystack(tok, books):
    short = [b[:100] for b in books]
    with pytest.raises(ValueError, match=r"haystack too short for length 160: a sample needs \d+ haystack tokens "
                                         r"in one stream, but the longest of the 3 haystack stream\(s\) has 100 "
                                         r"tokens \(300 in all\)"):
        niah_samples(tok, short, (96, 160), (0.5,), 2, TOY, seed=0)
    with pytest.raises(ValueError, match=r"niah cell \(length=20, depth=0.5\), run 0: length 20 is too short"):
        niah_samples(tok, books, (20,), (0.5,), 1, TOY, seed=0)


@pytest.fixture(scope="module")
def toy_lm(tok):
    torch.manual_seed(0)
    cfg = toy_llama_config(len(tok), hidden_size=32, num_layers=2, num_heads=2, head_dim=16, intermediate_size=64,
                           train_len=64, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id)
    return LlamaForCausalLM(cfg).float().eval()


def _with_greedy_answer(model, sample, miss_last=False):
    """The sample with its answer tokens replaced by the model's own greedy choices given the true prefix
    (full-sequence forwards, one per answer token): an exact match by construction, so the grid's exact
    match is not 0 everywhere, as it is for a random model on real answers. miss_last: the last answer token
    is the model's second choice instead, so every answer token but one is right and the sample is no match."""
    ids = sample.input_ids.clone()
    answer = sample.answer_positions.tolist()
    with torch.no_grad():
        for t in answer:
            ranked = model(input_ids=ids[None]).logits[0, t - 1].topk(2).indices
            ids[t] = ranked[1] if miss_last and t == answer[-1] else ranked[0]
    return dataclasses.replace(sample, input_ids=ids)


def _transformers_answer_scores(model, sample):
    """(mean answer NLL, exact match) of one sample by transformers alone: its causal-LM loss with every
    non-answer label set to -100, and the argmax of the full logits at t - 1 against token t."""
    labels = sample.input_ids.masked_fill(~sample.answer_mask, -100)[None]
    with torch.no_grad():
        out = model(input_ids=sample.input_ids[None], labels=labels)
    pos = sample.answer_positions
    logits = out.logits[0, pos - 1]  # (answer tokens, V)
    top2 = logits.topk(2, dim=-1).values
    # an argmax that a float32 summation order could flip would make the exact match ill-defined
    assert float((top2[:, 0] - top2[:, 1]).min()) > 1e-4, "near-tie at an answer position"
    return float(out.loss), bool((logits.argmax(-1) == sample.input_ids[pos]).all())


def test_niah_grid_equals_transformers_loss(toy_lm, grid_samples):
    # runs 0 .. k-1 of the k-th cell (k = 0, 1, 2, 3, 0, ...) answer greedily: exact matches 0, 1/3, 2/3, 1;
    # run k (where there is one) misses only its last answer token
    samples = {key: [_with_greedy_answer(toy_lm, s, miss_last=r == k % (RUNS + 1)) if r <= k % (RUNS + 1) else s
                     for r, s in enumerate(cell)]
               for k, (key, cell) in enumerate(sorted(grid_samples.items()))}
    cells = niah_grid(toy_lm, samples, batch_size=2, progress=False)
    assert [(c.length, c.depth) for c in cells] == sorted(samples)
    assert sorted({c.exact_match for c in cells}) == [0.0, 1 / 3, 2 / 3, 1.0]
    for c in cells:
        ref = [_transformers_answer_scores(toy_lm, s) for s in samples[(c.length, c.depth)]]
        assert c.runs == RUNS
        assert c.correct == tuple(int(em) for _, em in ref)
        assert c.exact_match == sum(em for _, em in ref) / RUNS
        # float32 forwards on both sides (batches of 2 and answer-position logits vs one sample's full
        # logits): the mean answer NLL (~6 nats) agrees to ~1e-6, the relative error of its exp; a wrong
        # position (t instead of t - 1) or a sample's NLL left out moves it by far more than 1e-5
        assert c.needle_ppl == pytest.approx(math.exp(sum(nll for nll, _ in ref) / RUNS), rel=1e-5)
    table = niah_table(cells)
    assert table["lengths"] == list(LENGTHS) and table["depths"] == list(DEPTHS)
    for i, d in enumerate(DEPTHS):
        for j, L in enumerate(LENGTHS):
            cell = next(c for c in cells if (c.length, c.depth) == (L, d))
            assert table["exact_match"][i][j] == cell.exact_match
            assert table["needle_ppl"][i][j] == cell.needle_ppl
    # every outcome has its sample's id, in the same order: (length, depth, run) -> the sample it scored
    for L in LENGTHS:
        expected = [(f"niah/{L}/{d:g}/{r}", x) for d in DEPTHS for r, x in enumerate(
            next(c for c in cells if (c.length, c.depth) == (L, d)).correct)]
        assert list(zip(table["ids"][str(L)], table["correct"][str(L)])) == expected
        assert len(set(table["ids"][str(L)])) == len(expected)
    assert json.loads(json.dumps(table)) == table


def _synthetic_cells():
    em = {(256, 0.0): 1.0, (256, 0.5): 2 / 3, (256, 1.0): 1.0, (512, 0.0): 0.0, (512, 0.5): 1 / 3,
          (512, 1.0): 0.0, (1024, 0.0): 0.0, (1024, 0.5): 0.0}  # (1024, 1.0) missing
    return [NiahCell(length=L, depth=d, runs=3, exact_match=v, needle_ppl=math.exp(3 * (1 - v)))
            for (L, d), v in reversed(em.items())]


def test_niah_table_ordering_and_missing_cells():
    table = niah_table(_synthetic_cells())
    assert table["lengths"] == [256, 512, 1024] and table["depths"] == [0.0, 0.5, 1.0]
    assert table["exact_match"] == [[1.0, 0.0, 0.0], [2 / 3, 1 / 3, 0.0], [1.0, 0.0, None]]
    assert table["needle_ppl"][2] == [1.0, pytest.approx(math.exp(3)), None]
    assert table["mean_by_length"] == {"256": pytest.approx(8 / 9), "512": pytest.approx(1 / 9), "1024": 0.0}
    assert table["runs"][0] == [3, 3, 3]


def test_heatmap_image_is_the_exact_match_grid():
    from matplotlib.figure import Figure

    cells = _synthetic_cells()
    fig = plot_niah_heatmap(cells, "toy", train_len=256, target_len=768)
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert len(ax.images) == 1
    arr = ax.images[0].get_array()
    expected = np.array([[1.0, 0.0, 0.0], [2 / 3, 1 / 3, 0.0], [1.0, 0.0, np.nan]])
    assert arr.shape == expected.shape
    assert np.ma.getmaskarray(arr).tolist() == np.isnan(expected).tolist()
    np.testing.assert_allclose(np.ma.filled(arr, np.nan), expected)
    assert ax.get_ylim()[0] > ax.get_ylim()[1]  # depth 0 at the top
    assert [t.get_text() for t in ax.get_xticklabels()] == ["256", "512", "1k"]
    assert len(ax.texts) == 8  # one annotation per present cell
    xs = sorted(line.get_xdata()[0] for line in ax.lines)
    assert xs == [0.0, pytest.approx(1 + math.log(1.5) / math.log(2))]
    fig.canvas.draw()  # renders on the Agg canvas

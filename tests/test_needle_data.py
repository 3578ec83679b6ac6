"""Stage needle_data: exact lengths, answer-only masks, decodable samples, early errors."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from conftest import smoke_args
from transformers import AutoTokenizer

from longrope2 import needle_data
from longrope2.core.config import compose_config
from longrope2.core.errors import ConfigError
from longrope2.data.needles import needle_template
from longrope2.needle_data import sample_plan


def _cfg(tmp_path, model_dir, folder, *extra):
    return compose_config([
        *smoke_args(tmp_path / "out", model_dir),
        "data.corpus.source=folder", f"data.corpus.path={folder}", "data.corpus.heldout_fraction=0.0",
        "target_len=256", "data.search_set.books=3", "data.search_set.samples=9",
        "data.search_set.validation_books=2", "data.search_set.validation_samples=4", *extra,
    ])


def _load(out, seed=0):
    folder = out / f"seed{seed}" / "needle_data"
    meta = json.loads((folder / "needle_data.json").read_text())
    return meta, {s: torch.load(folder / f"{s}.pt") for s in ("search", "validation", "validation_short")}


def test_samples_are_exact_answer_only_and_decode_to_the_template(tmp_path, toy_model_dir, book_folder):
    cfg = _cfg(tmp_path, toy_model_dir, book_folder)
    needle_data.run(cfg)
    meta, sets = _load(tmp_path / "out")
    tok = AutoTokenizer.from_pretrained(toy_model_dir)
    template = needle_template(cfg)
    assert meta["search"]["books"] == [str(book_folder / f"book_{i}.txt") for i in range(3)]
    assert meta["validation"]["books"] == [str(book_folder / f"book_{i}.txt") for i in (3, 4)]
    assert meta["validation_short"]["books"] == meta["validation"]["books"]  # the within-window check
    assert (meta["validation"]["length"], meta["validation_short"]["length"]) == (256, 128)
    for split, n, length in (("search", 9, 256), ("validation", 4, 256), ("validation_short", 4, 128)):
        t = sets[split]
        assert t["input_ids"].shape == t["answer_mask"].shape == t["plain_ids"].shape == (n, length)
        for i, m in enumerate(meta[split]["meta"]):
            ids, mask = t["input_ids"][i].tolist(), t["answer_mask"][i]
            # The answer is inside the window, at its end, and is the only scored span.
            positions = torch.nonzero(mask).flatten().tolist()
            assert positions == list(range(length - m["answer_tokens"], length))
            assert tok.decode([ids[p] for p in positions]).strip() == m["number"]
            text = tok.decode(ids, skip_special_tokens=True)
            assert template.needle.format(key=m["key"], number=m["number"]) in text
            assert text.endswith(template.question.format(key=m["key"]) + " " + m["number"])
            plain = tok.decode(t["plain_ids"][i].tolist(), skip_special_tokens=True)
            assert "magic number" not in plain
    # Book k mod books, depth depths[(k // books) mod len(depths)].
    depths = list(cfg.data.needle.depths)
    assert [m["depth"] for m in meta["search"]["meta"]] == [depths[k // 3 % len(depths)] for k in range(9)]
    assert [m["book"] for m in meta["search"]["meta"]] == [meta["search"]["books"][k % 3] for k in range(9)]


def test_deterministic_for_a_seed(tmp_path, toy_model_dir, book_folder):
    needle_data.run(_cfg(tmp_path / "a", toy_model_dir, book_folder))
    needle_data.run(_cfg(tmp_path / "b", toy_model_dir, book_folder))
    # another replicate seed of the same experiment: other samples, in its own folder
    needle_data.run(_cfg(tmp_path / "c", toy_model_dir, book_folder, "seeds=[0,1]", "run_seed=1"))
    a, b = (_load(tmp_path / x / "out")[1]["search"] for x in "ab")
    meta_c, sets_c = _load(tmp_path / "c" / "out", seed=1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["input_ids"], sets_c["search"]["input_ids"]) and meta_c["seed"] == 1
    assert not (tmp_path / "c" / "out" / "seed0").exists()


def test_short_document_is_named_before_any_output(tmp_path, toy_model_dir, book_folder):
    (book_folder / "book_1.txt").write_text("Too short a book. " * 10)
    with pytest.raises(ConfigError, match=r"document '.*book_1\.txt' has \d+ tokens; a sample of target_len "
                                          r"= 256 needs at least 256"):
        needle_data.run(_cfg(tmp_path, toy_model_dir, book_folder))
    assert not (tmp_path / "out").exists()


def test_fewer_documents_than_asked(tmp_path, toy_model_dir, book_folder):
    with pytest.raises(ConfigError, match=r"has 8 documents; accepted: at least books \+ validation_books "
                                          r"= 7 \+ 2 = 9"):
        needle_data.run(_cfg(tmp_path, toy_model_dir, book_folder, "data.search_set.books=7"))


def test_empty_folder(tmp_path, toy_model_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=r"data.corpus: corpus source 'folder': no non-empty \*.txt files in"):
        needle_data.run(_cfg(tmp_path, toy_model_dir, empty))


def test_no_validation_set_when_its_size_is_zero(tmp_path, toy_model_dir, book_folder):
    needle_data.run(_cfg(tmp_path, toy_model_dir, book_folder, "data.search_set.validation_samples=0"))
    folder = tmp_path / "out" / "seed0" / "needle_data"
    assert (folder / "search.pt").is_file() and not (folder / "validation.pt").exists()
    assert not (folder / "validation_short.pt").exists()
    assert "validation" not in json.loads((folder / "needle_data.json").read_text())


def test_sample_plan_cycle_is_books_then_depths_with_random_starts():
    depths, lengths = [0.0, 0.5, 1.0], [900, 1000, 1100]
    plan = list(sample_plan("cycle", 9, 3, depths, lengths, 256, random.Random(7)))
    rng = random.Random(7)  # the formula the stage has always used, in its draw order
    assert plan == [(k % 3, depths[k // 3 % 3], rng.randrange(lengths[k % 3] - 256 + 1)) for k in range(9)]


def test_sample_plan_reference_is_one_sample_per_book_in_depth_strata_from_the_start():
    plan = list(sample_plan("reference", 5, 5, [0.3], [1000] * 5, 256, random.Random(1)))
    assert [(book, start) for book, _, start in plan] == [(k, 0) for k in range(5)]
    assert all(k / 5 <= depth < (k + 1) / 5 for k, (_, depth, _) in enumerate(plan))  # data.needle.depths unused
    assert plan == list(sample_plan("reference", 5, 5, [0.9], [300] * 5, 256, random.Random(1)))
    assert plan != list(sample_plan("reference", 5, 5, [0.3], [1000] * 5, 256, random.Random(2)))
    with pytest.raises(ValueError, match="one sample per book: n = 6 != books = 5"):
        list(sample_plan("reference", 6, 5, [0.3], [1000] * 5, 256, random.Random(1)))


def test_reference_layout_takes_each_book_once_from_its_start(tmp_path, toy_model_dir, book_folder):
    cfg = _cfg(tmp_path, toy_model_dir, book_folder, "data.search_set.layout=reference",
               "data.search_set.samples=3", "data.search_set.validation_samples=2")
    needle_data.run(cfg)
    meta, sets = _load(tmp_path / "out")
    tok = AutoTokenizer.from_pretrained(toy_model_dir)
    head = [tok.bos_token_id] if needle_template(cfg).add_bos and tok.bos_token_id is not None else []
    assert (meta["layout"], meta["depths"]) == ("reference", None)
    for split, n, length in (("search", 3, 256), ("validation", 2, 256), ("validation_short", 2, 128)):
        rows = meta[split]["meta"]
        assert meta[split]["samples"] == len(rows) == n
        assert [m["book"] for m in rows] == meta[split]["books"]  # sample k: book k
        assert [m["start"] for m in rows] == [0] * n
        assert all(k / n <= m["depth"] < (k + 1) / n for k, m in enumerate(rows))
        assert sets[split]["input_ids"].shape == sets[split]["plain_ids"].shape == (n, length)
        for i, m in enumerate(rows):  # the needle-free row is the book's first tokens
            ids = tok(Path(m["book"]).read_text(), add_special_tokens=False)["input_ids"]
            assert sets[split]["plain_ids"][i].tolist() == head + ids[: length - len(head)]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "data.search_set.samples = 9: layout 'reference' builds one sample per book; "
             "accepted: samples = books = 3 (or layout 'cycle')"),
        (["data.search_set.samples=3"],
         "data.search_set.validation_samples = 4: layout 'reference' builds one sample per book; "
         "accepted: validation_samples = validation_books = 2 (or layout 'cycle')"),
    ],
)
def test_reference_layout_needs_one_sample_per_book(tmp_path, book_folder, extra, message):
    # model.path does not exist: the layout is checked before the tokenizer is loaded.
    cfg = _cfg(tmp_path, tmp_path / "no_model", book_folder, "data.search_set.layout=reference", *extra)
    with pytest.raises(ConfigError) as err:
        needle_data.run(cfg)
    assert str(err.value) == message
    assert not (tmp_path / "out").exists()


def test_unknown_layout_is_rejected_by_the_schema():
    with pytest.raises(ConfigError) as err:
        compose_config(["data.search_set.layout=foo"])
    assert 'data.search_set.layout = "foo": accepted: cycle, reference' in str(err.value)
    schema = json.loads((Path(__file__).parents[1] / "workflow" / "schemas" / "config.schema.json").read_text())
    layout = schema["properties"]["data"]["properties"]["search_set"]["properties"]["layout"]
    assert tuple(layout["enum"]) == needle_data.LAYOUTS

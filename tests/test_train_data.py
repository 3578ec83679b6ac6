"""Stage train_data: exact rows, restarting / continuous positions, budgets, toy exercises on training
text only, determinism, local corpora by weight, early and clean errors."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from conftest import smoke_args
from transformers import AutoTokenizer

from longrope2 import train_data
from longrope2.core.config import compose_config
from longrope2.core.errors import ConfigError
from longrope2.data import corpora as corpora_
from longrope2.data import corpus
from longrope2.data import rows as mixed
from longrope2.data.rows import Rows

L, L_TRAIN = 256, 64
MIX = "train.length_mix=[{max_len:64,tokens:2560},{max_len:256,tokens:2000}]"  # 10 short, ceil(7.8) = 8 long rows


def _cfg(tmp_path, model_dir, *extra):
    return compose_config([
        *smoke_args(tmp_path / "out", model_dir),
        f"model.train_len={L_TRAIN}", f"target_len={L}", MIX, "data.train_set.long_lengths=[128,256]", *extra,
    ])


def _toy_cfg(tmp_path, model_dir, folder, *extra):
    return _cfg(tmp_path, model_dir, "data.corpus.source=folder", f"data.corpus.path={folder}",
                "data.corpus.heldout_fraction=0.25", *extra)


# The dtypes train_data stored dense rows in (kept, so these tests read rows as before the compact format).
_STORED_DTYPES = (torch.int32, torch.int32, torch.int32, torch.float16, torch.bool)


def _load(out, seed=0):
    folder = out / f"seed{seed}" / "train_data"
    meta = json.loads((folder / "train_data.json").read_text())
    rows = Rows(folder)
    dense = rows.get(list(range(len(rows))))
    return meta, {k: v.to(dtype) for (k, v), dtype in zip(dense.items(), _STORED_DTYPES, strict=True)}


@pytest.fixture
def marked_books(tmp_path):
    """Eight books; book i repeats the marker word 'mark' + 3 x letter i, so a row's text tells its books."""
    folder = tmp_path / "marked"
    folder.mkdir()
    for i, text in enumerate(corpus.generate_documents(8, 1500, seed=5)):
        words = text.split(" ")
        marker = "mark" + "abcdefgh"[i] * 3
        (folder / f"book_{i}.txt").write_text(" ".join(w if k % 15 else f"{marker} {w}" for k, w in enumerate(words)))
    return folder


def _check_short_rows(t):
    short = ~t["is_long"]
    pos, docs = t["position_ids"][short].long(), t["doc_ids"][short].long()
    assert pos.shape[1] == L and int(pos.max()) < L_TRAIN
    # Positions restart exactly at document starts, and count up inside a document.
    assert torch.equal(mixed.document_ids(pos), docs)
    starts = torch.ones_like(docs, dtype=torch.bool)
    starts[:, 1:] = docs[:, 1:] != docs[:, :-1]
    assert torch.equal(pos == 0, starts)
    assert bool((pos[:, 1:][~starts[:, 1:]] == pos[:, :-1][~starts[:, 1:]] + 1).all())


def _check_long_rows(t):
    long = t["is_long"]
    assert torch.equal(t["position_ids"][long].long(), torch.arange(L).expand(int(long.sum()), L))
    assert bool((t["doc_ids"][long][:, 1:] >= t["doc_ids"][long][:, :-1]).all())


def test_toy_rows_budgets_positions_and_exercises(tmp_path, toy_model_dir, marked_books):
    cfg = _toy_cfg(tmp_path, toy_model_dir, marked_books)
    train_data.run(cfg)
    meta, t = _load(tmp_path / "out")
    tok = AutoTokenizer.from_pretrained(toy_model_dir)
    # Budgets: ceil(tokens / L) rows per bucket, short rows first.
    assert [b["rows"] for b in meta["buckets"]] == [math.ceil(2560 / L), math.ceil(2000 / L)] == [10, 8]
    assert t["is_long"].tolist() == [False] * 10 + [True] * 8
    for key in ("input_ids", "position_ids", "doc_ids"):
        assert t[key].shape == (18, L) and t[key].dtype == torch.int32
    assert t["loss_weight"].shape == (18, L) and t["is_long"].dtype == torch.bool
    assert not bool((t["input_ids"] == tok.pad_token_id).any())  # no padding
    _check_short_rows(t)
    _check_long_rows(t)
    # Short documents are the toy's own L_train-token samples, answers weighted.
    assert set(torch.bincount(t["doc_ids"][0].long()).tolist()) == {L_TRAIN}
    assert bool((t["loss_weight"][:10] == 2.0).any())

    # Long exercises: configured lengths only, one per row, each answer inside the row and weighted.
    template = train_data.needle_template(cfg)
    lengths = set()
    for r in range(10, 18):
        ids, docs, w = t["input_ids"][r].tolist(), t["doc_ids"][r], t["loss_weight"][r]
        counts = torch.bincount(docs.long()).tolist()
        assert len(set(counts)) == 1 and counts[0] in (128, 256) and sum(counts) == L
        lengths.add(counts[0])
        keys = []
        for d in range(len(counts)):
            idx = torch.nonzero(docs == d).flatten().tolist()
            answer = [i for i in idx if w[i] == 2.0]
            assert answer and answer == idx[-len(answer):]  # the answer ends the exercise
            number = tok.decode([ids[i] for i in answer]).strip()
            text = tok.decode([ids[i] for i in idx], skip_special_tokens=True)
            key = re.search(r"special magic number for (\w+)\? The special magic number for \1 is\s*$",
                            tok.decode([ids[i] for i in idx[: -len(answer)]], skip_special_tokens=True)).group(1)
            needle = template.needle.format(key=key, number=number)
            assert needle in text and text.index(needle) < text.rindex("What is the special magic number")
            keys.append(key)
        assert len(set(keys)) == len(keys)  # distinct keys inside a row
    assert lengths == {128, 256}
    assert sum(meta["stats"]["exercises_per_length"].values()) == meta["buckets"][1]["documents"]

    # Training-split text only: the held-out books' markers never appear.
    train_docs, heldout = corpus.split_documents(sorted(str(p) for p in marked_books.glob("*.txt")), 0.25, 0)
    text = tok.decode(t["input_ids"].flatten().tolist())
    found = set(re.findall(r"mark([a-h])\1\1", text))
    expected = {"abcdefgh"[int(p.split("_")[-1][0])] for p in train_docs}
    assert found and found <= expected
    assert meta["stats"]["heldout_documents_excluded"] == heldout and len(heldout) == 2
    assert meta["stats"]["train_documents"] == train_docs


def test_deterministic_for_a_seed(tmp_path, toy_model_dir, book_folder):
    # c: another replicate seed of the same experiment (its own rows, in its own folder)
    for name, extra in (("a", ()), ("b", ()), ("c", ("seeds=[0,1]", "run_seed=1"))):
        train_data.run(_toy_cfg(tmp_path / name, toy_model_dir, book_folder, "data.train_set.shard_rows=7", *extra))
    (ma, a), (mb, b), (mc, c) = (_load(tmp_path / x / "out", seed=int(x == "c")) for x in "abc")
    assert mc["seed"] == 1
    assert ma["shards"] == ["rows-00000", "rows-00001", "rows-00002"] == mb["shards"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["input_ids"], c["input_ids"])


def test_long_lengths_outside_the_window_range(tmp_path, toy_model_dir, book_folder):
    with pytest.raises(ConfigError, match=r"data\.train_set\.long_lengths = \[64, 512\]: accepted: a non-empty "
                                          r"list of lengths in \(model\.train_len, target_len\] = \(64, 256\]"):
        train_data.run(_toy_cfg(tmp_path, toy_model_dir, book_folder, "data.train_set.long_lengths=[64,512]"))
    assert not (tmp_path / "out").exists()


def test_length_mix_must_start_at_the_window():
    with pytest.raises(ConfigError, match=r"train\.length_mix = .*accepted: a first bucket with max_len = "
                                          r"model\.train_len = 128"):
        compose_config(["train.length_mix=[{max_len:100,tokens:10},{max_len:1024,tokens:10}]"])


# --------------------------------------------------------------------------- corpora


def _doc(rng, words):
    vocabulary = ["the", "river", "a", "stone", "garden", "fell", "quiet", "road."]
    return " ".join(rng.choice(vocabulary) for _ in range(words))


@pytest.fixture
def corpora(tmp_path):
    """Two folders: *.txt files and a *.jsonl file, each with short (<= 64 tokens) and long documents."""
    import random

    rng = random.Random(0)
    txt, jsonl = tmp_path / "txt", tmp_path / "jsonl"
    txt.mkdir()
    jsonl.mkdir()
    for i in range(40):
        (txt / f"doc_{i:02d}.txt").write_text(_doc(rng, 12 if i % 4 else 300))
    lines = [json.dumps({"text": _doc(rng, 12 if i % 4 else 300), "id": i}) for i in range(40)]
    (jsonl / "part-0.jsonl").write_text("\n".join(lines[:20]) + "\n\n")
    (jsonl / "part-1.jsonl").write_text("\n".join(lines[20:]) + "\n")
    return txt, jsonl


def _corpora_cfg(tmp_path, model_dir, specs, *extra):
    items = ",".join(f"{{name:{n},path:{'null' if p is None else repr(str(p))},weight:{w}}}" for n, p, w in specs)
    return _cfg(tmp_path, model_dir, "data.train_set.source=corpora", f"data.train_set.corpora=[{items}]", *extra)


def test_corpora_rows_and_weights(tmp_path, toy_model_dir, corpora):
    txt, jsonl = corpora
    cfg = _corpora_cfg(tmp_path, toy_model_dir, [("books", txt, 3.0), ("web", jsonl, 1.0)])
    train_data.run(cfg)
    meta, t = _load(tmp_path / "out")
    assert [b["rows"] for b in meta["buckets"]] == [10, 8] and t["input_ids"].shape == (18, L)
    assert int(t["is_long"].sum()) == 8
    _check_short_rows(t)
    _check_long_rows(t)
    assert bool((t["loss_weight"] == 1.0).all())
    stats = {c["name"]: c for c in meta["stats"]["corpora"]}
    assert stats["books"]["documents_indexed"] == stats["web"]["documents_indexed"] == 40
    drawn = stats["books"]["documents_drawn"] / (stats["books"]["documents_drawn"] + stats["web"]["documents_drawn"])
    assert 0.6 < drawn < 0.9  # weight 3 : 1
    assert stats["books"]["documents_used"] > stats["web"]["documents_used"] > 0
    # Every document starts with BOS; long rows hold documents longer than L_train.
    tok = AutoTokenizer.from_pretrained(toy_model_dir)
    assert int(t["input_ids"][0, 0]) == tok.bos_token_id
    long_rows = t["doc_ids"][t["is_long"]]
    assert int(torch.bincount(long_rows[0].long())[0]) > L_TRAIN


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("missing", (r"data\.train_set\.corpora\[1\]\.path = '.*missing': no such folder; accepted: a local "
                     r"folder of \*\.txt files \(one document per file\) or \*\.jsonl files")),
        ("empty", (r"data\.train_set\.corpora\[1\]\.path = '.*empty': no documents \(no non-empty \*\.txt or "
                   r"\*\.jsonl files\); accepted: a local folder")),
        ("hub", (r"data\.train_set\.corpora\[1\]\.path = 'HuggingFaceFW/fineweb-edu': dataset "
                 r"HuggingFaceFW/fineweb-edu \(split train\): the hub is not reachable \(offline\) and the Hugging "
                 r"Face cache holds no copy; accepted: a local copy: .* with the override "
                 r"data\.train_set\.corpora\.1\.path=/path/to/local/fineweb-edu")),
        ("null", r"data\.train_set\.corpora\[1\]\.path = null \(corpus 'web'\): accepted: a local folder"),
    ],
)
def test_bad_corpora_fail_before_any_output(tmp_path, toy_model_dir, corpora, path, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.txt").write_text("")
    second = {"missing": tmp_path / "missing", "empty": tmp_path / "empty", "hub": "HuggingFaceFW/fineweb-edu",
              "null": None}[path]
    cfg = _corpora_cfg(tmp_path, toy_model_dir, [("books", corpora[0], 1.0), ("web", second, 1.0)])
    with pytest.raises(ConfigError, match=message):
        train_data.run(cfg)
    assert not (tmp_path / "out").exists()


def test_paper_preset_composes_and_names_the_local_copy_override():
    cfg = compose_config(["experiment=llama3_8b_128k"])
    assert [(c.name, c.weight) for c in cfg.data.train_set.corpora] == [
        ("redpajama_v1", 4.5), ("redpajama_v2", 2.5), ("starcoder", 2.0), ("fineweb_edu", 1.0)]
    # Offline (conftest: HF_HUB_OFFLINE) the first hub id fails, naming the override to a local copy.
    with pytest.raises(ConfigError, match=r"data\.train_set\.corpora\[0\]\.path = 'togethercomputer/RedPajama-Data-1T'"
                                          r": .* the override data\.train_set\.corpora\.0\.path=/path/to/local/"):
        corpora_.index_corpora(cfg)


def test_bad_jsonl_line_leaves_no_folder(tmp_path, toy_model_dir):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "part.jsonl").write_text("\n".join(json.dumps({"content": "no text field"}) for _ in range(5)))
    with pytest.raises(ConfigError, match=r"part\.jsonl at byte \d+: accepted: one JSON object per line with a "
                                          r"\"text\" field"):
        train_data.run(_corpora_cfg(tmp_path, toy_model_dir, [("bad", folder, 1.0)]))
    assert not (tmp_path / "out" / "seed0" / "train_data").exists()
    assert not (tmp_path / "out" / "train_data.partial").exists()


# --------------------------------------------------------------------------- corpora per bucket (corpora[i].buckets)

WORDS = ("the", "river", "a", "stone", "garden", "fell", "quiet", "road.")
# Every document of a corpus starts with its corpus's marker word (and holds no other marker).
MARKERS = {"web": "webword", "books": "bookword", "code": "codeword", "stream": "streamword"}
# Three buckets: 10 short rows, 6 rows of documents of (64, 128] tokens, 8 of longer ones.
MIX3 = "train.length_mix=[{max_len:64,tokens:2560},{max_len:128,tokens:1536},{max_len:256,tokens:2048}]"


@pytest.fixture(scope="module")
def word_model_dir(tmp_path_factory):
    """A word-level tokenizer: one id per word of WORDS and MARKERS, plus BOS / EOS. No tokenizer training, so
    a document of n words is n + 2 tokens and the row digests below do not depend on a library version."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "[UNK]", *WORDS, *MARKERS.values()])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="[UNK]",
                                  pad_token="<pad>")
    path = tmp_path_factory.mktemp("word_model")
    tok.save_pretrained(path)
    return path


def _marked_docs(name, words, seed):
    """Documents of ``words`` words each (marker first): len(words) documents of corpus ``name``."""
    import random

    rng = random.Random(seed)
    return [" ".join([MARKERS[name], *(rng.choice(WORDS) for _ in range(n - 1))]) for n in words]


def _write_corpus(folder, texts, kind):
    folder.mkdir()
    if kind == "txt":
        for i, text in enumerate(texts):
            (folder / f"doc_{i:03d}.txt").write_text(text)
    else:
        (folder / "part-0.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return folder


@pytest.fixture
def marked_corpora(tmp_path):
    """Three folder corpora, every one with documents of every bucket of MIX3 (words + 2 tokens each):
    web (*.txt; mostly short), books (*.jsonl; mostly long), code (*.txt)."""
    web = _marked_docs("web", [100 if i % 5 == 4 else 220 if i % 7 == 6 else 12 for i in range(60)], 1)
    books = _marked_docs("books", [(12, 80, 200, 400)[i % 4] for i in range(40)], 2)
    code = _marked_docs("code", [(12, 90, 180)[i % 3] for i in range(30)], 3)
    return {"web": _write_corpus(tmp_path / "web", web, "txt"),
            "books": _write_corpus(tmp_path / "books", books, "jsonl"),
            "code": _write_corpus(tmp_path / "code", code, "txt")}


def _bucket_cfg(tmp_path, model_dir, specs, *extra, out="out", mix=MIX3):
    """specs: (name, path, weight, buckets or None: no key[, extra keys "k:v,..."])."""
    items = ",".join(f"{{name:{n},path:{str(p)!r},weight:{w}" + ("" if b is None else f",buckets:{b}")
                     + "".join(f",{x}" for x in more) + "}" for n, p, w, b, *more in specs)
    return compose_config([
        *smoke_args(tmp_path / out, model_dir),
        f"model.train_len={L_TRAIN}", f"target_len={L}", mix, "data.train_set.source=corpora",
        f"data.train_set.corpora=[{items}]", *extra])


def _digest(out):
    """sha256 (16 hex digits) of the written rows (tokens, documents, kinds, weights) and of each corpus's draws."""
    import hashlib

    meta, t = _load(out)
    h = hashlib.sha256()
    for key in ("input_ids", "doc_ids", "is_long", "loss_weight"):
        h.update(t[key].contiguous().numpy().tobytes())
    draws = [[c[k] for k in ("name", "documents_drawn", "documents_used", "tokens_drawn", "epochs")]
             for c in meta["stats"]["corpora"]]
    h.update(json.dumps([draws, meta["stats"]["empty_documents"], meta["stats"]["skipped_documents"]]).encode())
    return h.hexdigest()[:16]


# Digests (_digest) of the rows the stage wrote before corpora entries had the key `buckets`, recorded with
# train_data.py of commit 06a01a0: configs without the key must keep writing exactly these rows, drawn the
# same way (the word-level tokenizer keeps them independent of tokenizer training and library versions).
ROWS_WITHOUT_BUCKETS = {"two_buckets": "4e82be113a58a2a1", "three_buckets_num_proc2": "8975758bff3b86bf"}


@pytest.mark.parametrize("case", sorted(ROWS_WITHOUT_BUCKETS))
def test_corpora_without_buckets_write_the_rows_they_wrote_before(tmp_path, word_model_dir, marked_corpora, case,
                                                                   monkeypatch):
    c = marked_corpora
    if case == "two_buckets":  # full buckets skip documents; the small folders repeat (epochs > 1)
        cfg = _bucket_cfg(tmp_path, word_model_dir, [("web", c["web"], 3.0, None), ("books", c["books"], 1.0, None)],
                          mix=MIX)
    else:  # three buckets, a streamed dataset beside the folders, two tokenizer processes
        import datasets

        monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
        stream = tmp_path / "stream"
        stream.mkdir()
        datasets.Dataset.from_dict({"text": _marked_docs("stream", [(12, 70, 150, 300)[i % 4] for i in range(400)], 4)}
                                   ).to_parquet(stream / "train-00000-of-00001.parquet")
        cfg = _bucket_cfg(tmp_path, word_model_dir, [
            ("web", c["web"], 1.0, None), ("books", c["books"], 2.0, None), ("code", c["code"], 1.0, None),
            ("stream", stream, 1.5, None, "streaming:true")], "+data.train_set.num_proc=2")
    train_data.run(cfg)
    assert _digest(tmp_path / "out") == ROWS_WITHOUT_BUCKETS[case]


def _documents(t, r):
    """Row r's documents as (token ids, is the row's last document), read from its doc_ids."""
    ids, docs = t["input_ids"][r].tolist(), t["doc_ids"][r].long()
    n = int(docs.max()) + 1
    return [([ids[i] for i in torch.nonzero(docs == d).flatten().tolist()], d == n - 1) for d in range(n)]


def _corpus_of(tok, ids):
    """The corpus a document came from, by its marker word (its first word); None for a piece of BOS alone."""
    words = tok.decode(ids, skip_special_tokens=True).split()
    if not words:
        assert ids == [tok.bos_token_id]  # a document cut to its first token
        return None
    by_marker = {m: name for name, m in MARKERS.items()}
    assert words[0] in by_marker and not set(words[1:]) & set(by_marker), words[:3]
    return by_marker[words[0]]


def _corpora_per_bucket(model_dir, t):
    """{bucket: the corpora whose documents its rows hold}, from the rows' text alone: short rows are bucket 0;
    a long row's bucket is that of its whole (not last) documents, (64, 128] tokens: 1, more: 2; a long row of
    one document holds a cut one of >= L tokens: bucket 2."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    found: dict[int, set[str]] = {0: set(), 1: set(), 2: set()}
    for r in range(len(t["is_long"])):
        docs = _documents(t, r)
        whole = [len(ids) for ids, last in docs if not last]
        if not bool(t["is_long"][r]):
            assert all(n <= L_TRAIN for n in whole)
            bucket = 0
        elif whole:
            assert all(L_TRAIN < n <= 128 for n in whole) or all(n > 128 for n in whole), whole
            bucket = 1 if whole[0] <= 128 else 2
        else:
            bucket = 2
        found[bucket] |= {_corpus_of(tok, ids) for ids, _ in docs} - {None}
    return found


def test_corpora_feed_only_their_buckets(tmp_path, word_model_dir, marked_corpora):
    """web feeds the short bucket, books the long ones, code the longest: every corpus has documents of every
    length, so the rows tell by their marker words whether a document reached a bucket its corpus does not feed."""
    c = marked_corpora
    specs = [("web", c["web"], 1.0, "[0]"), ("books", c["books"], 1.0, "[1,2]"), ("code", c["code"], 1.0, "[2]")]
    metas, tensors = [], []
    for n in (1, 2):
        train_data.run(_bucket_cfg(tmp_path, word_model_dir, specs, f"+data.train_set.num_proc={n}", out=f"out{n}"))
        meta, t = _load(tmp_path / f"out{n}")
        metas.append(meta)
        tensors.append(t)
    meta, t = metas[0], tensors[0]
    assert [b["rows"] for b in meta["buckets"]] == [10, 6, 8] and t["input_ids"].shape == (24, L)
    assert t["is_long"].tolist().count(False) == 10
    _check_short_rows(t)
    _check_long_rows(t)
    assert _corpora_per_bucket(word_model_dir, t) == {0: {"web"}, 1: {"books"}, 2: {"books", "code"}}
    # Documents of other lengths were drawn and left out: web's long ones, books' and code's short ones.
    assert meta["stats"]["other_bucket_documents"] > 0
    assert [x["buckets"] for x in meta["stats"]["corpora"]] == [[0], [1, 2], [2]]
    # The rows do not depend on the tokenizer processes.
    assert all(torch.equal(t[k], tensors[1][k]) for k in t) and metas[0]["stats"] == metas[1]["stats"]


@pytest.mark.parametrize(
    ("buckets", "message"),
    [
        (("[0]", "[1,3]", "[2]"),
         "data.train_set.corpora.1.buckets = [1, 3] (corpus 'books'): accepted: null (every bucket) or a non-empty "
         "list of bucket indices of train.length_mix, 0 ... 2 (3 buckets; 0 is the short one, max_len = "
         "model.train_len)"),
        (("[-1]", "null", "null"), "data.train_set.corpora.0.buckets = [-1] (corpus 'web'): accepted: null (every "
                                   "bucket) or a non-empty list of bucket indices of train.length_mix, 0 ... 2"),
        (("[]", "null", "null"), "data.train_set.corpora.0.buckets = [] (corpus 'web'): accepted: null"),
        (("[0]", "[2]", "[2]"),
         "data.train_set.corpora.<i>.buckets = {web: [0], books: [2], code: [2]}: no corpus feeds bucket 1 of "
         "train.length_mix; accepted: lists that together cover every bucket 0 ... 2 (null or absent: every "
         "bucket)"),
        (("[1]", "[2]", "[1,2]"), "data.train_set.corpora.<i>.buckets = {web: [1], books: [2], code: [1, 2]}: no "
                                  "corpus feeds bucket 0 of train.length_mix"),
        (("[0]", "[0]", "[0]"), "no corpus feeds buckets 1, 2 of train.length_mix; accepted"),
    ],
)
def test_bad_buckets_fail_before_any_output(tmp_path, word_model_dir, marked_corpora, buckets, message):
    specs = [(name, marked_corpora[name], 1.0, b) for name, b in zip(("web", "books", "code"), buckets, strict=True)]
    # The config checks (every stage and the Snakefile compose the config through them): before any job.
    with pytest.raises(ConfigError) as err:
        _bucket_cfg(tmp_path, word_model_dir, specs)
    assert message in str(err.value)
    # The stage refuses them too, in a config built in code that skipped the checks: before any output.
    from omegaconf import OmegaConf, open_dict

    cfg = _bucket_cfg(tmp_path, word_model_dir, [(n, p, w, None) for n, p, w, _ in specs])
    with open_dict(cfg):
        for entry, b in zip(cfg.data.train_set.corpora, buckets, strict=True):
            entry.buckets = None if b in (None, "null") else OmegaConf.create(f"x: {b}").x
    with pytest.raises(ConfigError) as err:
        train_data.run(cfg)
    assert message in str(err.value)
    assert not (tmp_path / "out").exists()

"""Corpora through Hugging Face `datasets` (data.corpus source datasets, data.train_set.corpora entries):
local parquet / jsonl / save_to_disk folders read as written, streaming and in-memory rows identical,
batched and multi-process tokenization identical to document-by-document encoding, exact errors before
any output, hub ids offline (conftest sets HF_HUB_OFFLINE)."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import datasets
import pytest
import torch
from conftest import smoke_args
from transformers import AutoTokenizer

from longrope2 import train_data
from longrope2.core.config import compose_config
from longrope2.core.errors import ConfigError
from longrope2.data import corpora as corpora_
from longrope2.data import hf_corpus, tokenize
from longrope2.data.corpus import corpus_parts
from longrope2.data.rows import Rows

L, L_TRAIN = 256, 64
MIX = "train.length_mix=[{max_len:64,tokens:2560},{max_len:256,tokens:2000}]"  # 10 short, 8 long rows
TOTAL = 18 * L


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    # In-memory loads of local shards write an Arrow copy: into tmp_path, not ~/.cache.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def _texts(n, seed=0):
    rng = random.Random(seed)
    words = ["the", "river", "a", "stone", "garden", "fell", "quiet", "road."]
    return [" ".join(rng.choice(words) for _ in range(12 if i % 4 else 300)) for i in range(n)]


def _parquet(folder, texts, field="text", shards=2):
    """A dataset folder as the hub lays it out: data/train-0000k-of-0000n.parquet plus a validation split."""
    (folder / "data").mkdir(parents=True)
    ds = datasets.Dataset.from_dict({field: texts, "id": list(range(len(texts)))})
    step = -(-len(texts) // shards)
    for k in range(shards):
        ds.select(range(k * step, min(len(texts), (k + 1) * step))).to_parquet(
            folder / "data" / f"train-{k:05d}-of-{shards:05d}.parquet")
    ds.select(range(3)).to_parquet(folder / "data" / "validation-00000-of-00001.parquet")
    return folder


def _cfg(tmp_path, model_dir, *extra, out="out"):
    return compose_config([
        *smoke_args(tmp_path / out, model_dir),
        f"model.train_len={L_TRAIN}", f"target_len={L}", MIX, "data.train_set.source=corpora", *extra])


def _corpora(*entries):
    items = ",".join("{" + ",".join(f"{k}:{v!r}" if isinstance(v, str) else f"{k}:{json.dumps(v)}"
                                    for k, v in e.items()) + "}" for e in entries)
    return f"data.train_set.corpora=[{items}]"


def _rows(out):
    folder = out / "seed0" / "train_data"
    rows = Rows(folder)
    return json.loads((folder / "train_data.json").read_text()), rows.get(list(range(len(rows))))


# --------------------------------------------------------------------------- reading


@pytest.mark.parametrize("layout", ["parquet", "parquet_streaming", "jsonl_shards", "save_to_disk",
                                    "save_to_disk_streaming"])
def test_search_books_from_a_local_dataset_equal_the_source(tmp_path, layout):
    texts = _texts(20)
    folder, extra = tmp_path / "ds", []
    if layout.startswith("parquet"):
        _parquet(folder, texts, field="body")
        extra = ["+data.corpus.text_field=body"]
    elif layout == "jsonl_shards":
        (folder / "data").mkdir(parents=True)
        for k in range(2):
            (folder / "data" / f"train-{k}.jsonl").write_text(
                "\n".join(json.dumps({"text": t}) for t in texts[10 * k:10 * k + 10]) + "\n")
    else:
        datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": texts})}).save_to_disk(folder)
    if layout.endswith("streaming"):
        extra.append("+data.corpus.streaming=true")
    cfg = compose_config(["experiment=smoke", "data.corpus.source=datasets", f"data.corpus.path={folder}",
                          "data.corpus.heldout_fraction=0.0", *extra])
    docs, heldout = corpus_parts(cfg)
    assert heldout == [] and [t for _, t in docs] == texts
    assert docs[3][0] == f"{folder}:train[3]"


def test_a_corpus_entry_reads_the_split_it_names(tmp_path):
    folder = _parquet(tmp_path / "ds", _texts(20))
    spec = hf_corpus.DatasetSpec(str(folder), "k", split="validation")
    assert list(hf_corpus.texts(hf_corpus.open_checked(spec), spec)) == _texts(3)


# --------------------------------------------------------------------------- rows


def test_streaming_rows_equal_in_memory_rows(tmp_path, toy_model_dir):
    folder = _parquet(tmp_path / "ds", _texts(400))
    entry = {"name": "web", "path": str(folder), "weight": 1.0}
    summaries, tensors = [], []
    for streaming in (False, True):
        out = f"out_{streaming}"
        train_data.run(_cfg(tmp_path, toy_model_dir, _corpora({**entry, "streaming": streaming}), out=out))
        meta, t = _rows(tmp_path / out)
        summaries.append(meta)
        tensors.append(t)
    assert [b["rows"] for b in summaries[0]["buckets"]] == [10, 8]
    for key in tensors[0]:
        assert torch.equal(tensors[0][key], tensors[1][key]), key
    first = summaries[1]["stats"]["corpora"][0]
    assert first["streaming"] and first["documents_indexed"] is None and first["epochs"] == 1


def test_batched_and_multiprocess_tokenization_equal_one_document_at_a_time(tmp_path, toy_model_dir):
    tok = AutoTokenizer.from_pretrained(toy_model_dir)
    texts = _texts(50) + ["", "  spaced  out ", "ünïcode — text\nwith lines"]
    expected = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert tokenize.encode_texts(tok, texts) == expected
    for num_proc in (1, 2):  # the stage's reader: batches of 7 tokenized ahead, in num_proc processes
        with tokenize.tokenizer_pool(tok, num_proc) as pool:
            reader = corpora_.CorpusReader(iter([(1, t) for t in texts]), tok, pool, batch=7)
            got = [reader.next(ahead=2 * num_proc)[2] for _ in texts]
        assert got == expected, num_proc
    # The stage: the same rows whatever num_proc (two corpora, one in memory, one a folder of *.txt).
    books = tmp_path / "books"
    books.mkdir()
    for i, t in enumerate(_texts(40, seed=1)):
        (books / f"doc_{i:02d}.txt").write_text(t)
    corpora = _corpora({"name": "web", "path": str(_parquet(tmp_path / "ds", _texts(200))), "weight": 2.0},
                       {"name": "books", "path": str(books), "weight": 1.0})
    rows = []
    for n in (1, 2):
        train_data.run(_cfg(tmp_path, toy_model_dir, corpora, f"+data.train_set.num_proc={n}", out=f"out{n}"))
        rows.append(_rows(tmp_path / f"out{n}"))
    for key in rows[0][1]:
        assert torch.equal(rows[0][1][key], rows[1][1][key]), key
    assert rows[0][0]["stats"] == rows[1][0]["stats"]


def test_weights_are_token_shares(tmp_path, toy_model_dir):
    # Short documents (12 words) in one corpus, long ones (300 words) in the other, weights 1 : 1: by
    # documents the long corpus would give ~25x the tokens; by tokens both give about as many.
    short, long = _texts(400, seed=2), _texts(400, seed=3)
    short = [t for i, t in enumerate(short) if i % 4] * 2
    long = [t for i, t in enumerate(long) if not i % 4] * 4
    corpora = _corpora({"name": "short", "path": str(_parquet(tmp_path / "s", short)), "weight": 1.0},
                       {"name": "long", "path": str(_parquet(tmp_path / "l", long)), "weight": 1.0})
    train_data.run(_cfg(tmp_path, toy_model_dir, corpora, "train.length_mix=[{max_len:64,tokens:25600},"
                                                          "{max_len:256,tokens:25600}]"))
    stats = {c["name"]: c for c in _rows(tmp_path / "out")[0]["stats"]["corpora"]}
    share = stats["short"]["tokens_drawn"] / (stats["short"]["tokens_drawn"] + stats["long"]["tokens_drawn"])
    assert 0.35 < share < 0.65, stats


def test_a_corpus_whose_buckets_are_full_is_read_no_further(tmp_path, toy_model_dir):
    # web (streamed, short documents, weight 100) feeds only the short bucket, books (long documents, weight 1)
    # only the long one. Once the short bucket is full web is drawn no more: drawn on at its weight, its 300
    # documents would run out long before books gave the long rows (~1 draw in 2000), and the stage would stop.
    web = _parquet(tmp_path / "web", [t for i, t in enumerate(_texts(400, seed=4)) if i % 4])
    books = _parquet(tmp_path / "books", [t for i, t in enumerate(_texts(160, seed=5)) if not i % 4])
    train_data.run(_cfg(tmp_path, toy_model_dir, _corpora(
        {"name": "web", "path": str(web), "weight": 100.0, "streaming": True, "buckets": [0]},
        {"name": "books", "path": str(books), "weight": 1.0, "buckets": [1]})))
    meta, t = _rows(tmp_path / "out")
    assert [b["rows"] for b in meta["buckets"]] == [10, 8] and int(t["is_long"].sum()) == 8
    stats = {c["name"]: c for c in meta["stats"]["corpora"]}
    # web's every drawn document went into the short rows, none after they were complete; the stream did not end
    assert stats["web"]["documents_drawn"] == stats["web"]["documents_used"] == meta["buckets"][0]["documents"] < 300
    assert stats["books"]["documents_used"] == meta["buckets"][1]["documents"]


# --------------------------------------------------------------------------- errors


def _fails(tmp_path, cfg, message):
    with pytest.raises(ConfigError) as err:
        train_data.run(cfg)
    assert str(err.value) == message
    folder = tmp_path / "out" / "seed0" / "train_data"
    assert not folder.exists() and not folder.with_name("train_data.partial").exists()  # nothing taken as done
    return err


def test_missing_text_field_names_the_fields(tmp_path, toy_model_dir):
    good = _parquet(tmp_path / "good", _texts(40))
    bad = _parquet(tmp_path / "bad", _texts(40), field="content")
    for streaming in (False, True):
        label = f"{bad} (split train{', streaming' if streaming else ''})"
        _fails(tmp_path, _cfg(tmp_path, toy_model_dir, _corpora(
            {"name": "web", "path": str(good), "weight": 1.0},
            {"name": "code", "path": str(bad), "weight": 1.0, "streaming": streaming})),
            f"data.train_set.corpora[1].text_field = 'text': dataset {label} has no such field; accepted: one of "
            "its fields: content, id")


def test_empty_split(tmp_path, toy_model_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    datasets.Dataset.from_dict({"text": []}, features=datasets.Features({"text": datasets.Value("string")})) \
        .to_parquet(empty / "train.parquet")
    for streaming in (False, True):
        label = f"{empty} (split train{', streaming' if streaming else ''})"
        _fails(tmp_path, _cfg(tmp_path, toy_model_dir, _corpora(
            {"name": "web", "path": str(empty), "weight": 1.0, "streaming": streaming})),
            f"data.train_set.corpora[0].split = 'train': dataset {label} has 0 documents; accepted: a non-empty "
            "split")


def _short_stream(tmp_path, toy_model_dir) -> tuple[Path, int]:
    """A parquet folder of 12 documents, and their tokens with BOS and EOS: a stream that ends too early."""
    texts = _texts(12)
    folder = _parquet(tmp_path / "short", texts)
    tok = AutoTokenizer.from_pretrained(toy_model_dir)
    return folder, sum(len(tok(t, add_special_tokens=False)["input_ids"]) + 2 for t in texts)


def test_a_stream_that_ends_before_the_rows_are_complete(tmp_path, toy_model_dir):
    folder, tokens = _short_stream(tmp_path, toy_model_dir)
    _fails(tmp_path, _cfg(tmp_path, toy_model_dir, _corpora(
        {"name": "big", "path": str(_parquet(tmp_path / "big", _texts(100))), "weight": 1.0},
        {"name": "web", "path": str(folder), "weight": 3.0, "streaming": True})),
        f"data.train_set.corpora[1]: corpus 'web', dataset {folder} (split train, streaming): the stream ended "
        f"after 12 documents, {tokens} tokens, before the rows were complete (needed: its share by weight, "
        f"{round(TOTAL * 3 / 4)} of the {TOTAL} tokens of train.length_mix, and more where documents fall into "
        "full buckets); accepted: a larger split, streaming: false (documents repeat), or a lower weight")


def test_a_stream_that_ends_names_its_share_of_the_buckets_it_feeds(tmp_path, toy_model_dir):
    # web feeds buckets 0 and 1, big bucket 1 only: web's share is all of bucket 0 (2560 tokens) and 3 / (3 + 1)
    # of bucket 1 (2048 tokens): 4096 of the 4608 tokens of its buckets.
    folder, tokens = _short_stream(tmp_path, toy_model_dir)
    _fails(tmp_path, _cfg(tmp_path, toy_model_dir, _corpora(
        {"name": "big", "path": str(_parquet(tmp_path / "big", _texts(100))), "weight": 1.0, "buckets": [1]},
        {"name": "web", "path": str(folder), "weight": 3.0, "streaming": True, "buckets": [0, 1]})),
        f"data.train_set.corpora[1]: corpus 'web', dataset {folder} (split train, streaming): the stream ended "
        f"after 12 documents, {tokens} tokens, before the rows were complete (needed: its share by weight in the "
        "buckets it feeds, 4096 of the 4608 tokens of its train.length_mix buckets [0, 1], and more where documents "
        "fall into full buckets or buckets it does not feed); accepted: a larger split, streaming: false (documents "
        "repeat), or a lower weight")


@pytest.mark.parametrize("weight", [0, -1])
def test_weight_zero_or_negative_is_refused_before_any_stage(tmp_path, toy_model_dir, weight):
    with pytest.raises(ConfigError, match=re.escape(
            f"data.train_set.corpora.1.weight = {weight}: accepted: a value > 0")):
        _cfg(tmp_path, toy_model_dir, _corpora({"name": "a", "path": "x", "weight": 1.0},
                                               {"name": "b", "path": "y", "weight": weight}))


def test_hub_id_offline_names_the_override_at_once(tmp_path, toy_model_dir, monkeypatch):
    """Offline, a hub id is looked up once, in the cache only: no network connection is even attempted
    (so none is retried), and the error names the local-copy override."""
    import socket

    network = []  # every host lookup and internet connection attempted while the stage runs

    def refuse(kind, original):
        def spy(*args, **kwargs):
            address = args[1] if kind == "connect" else args[0]
            sock = args[0] if kind == "connect" else None
            if sock is not None and sock.family not in (socket.AF_INET, socket.AF_INET6):
                return original(*args, **kwargs)  # local IPC (unix sockets) is not the network
            network.append((kind, address))
            raise OSError(f"test: no network ({kind} {address!r})")
        return spy

    monkeypatch.setattr(socket, "getaddrinfo", refuse("getaddrinfo", socket.getaddrinfo))
    for method in ("connect", "connect_ex"):
        monkeypatch.setattr(socket.socket, method, refuse("connect", getattr(socket.socket, method)))
    loads = []  # the datasets.load_dataset calls, by dataset path
    load_dataset = datasets.load_dataset

    def counted_load(path, *args, **kwargs):
        loads.append(path)
        return load_dataset(path, *args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", counted_load)

    cfg = _cfg(tmp_path, toy_model_dir, _corpora(
        {"name": "web", "path": str(_parquet(tmp_path / "ds", _texts(40))), "weight": 1.0},
        {"name": "starcoder", "path": "bigcode/starcoderdata", "weight": 2.0, "text_field": "content",
         "streaming": True}))
    _fails(tmp_path, cfg, (
        "data.train_set.corpora[1].path = 'bigcode/starcoderdata': dataset bigcode/starcoderdata (split train, "
        "streaming): the hub is not reachable (offline) and the Hugging Face cache holds no copy; accepted: a "
        "local copy: a folder of parquet / arrow / jsonl shards or one written by save_to_disk, with the override "
        "data.train_set.corpora.1.path=/path/to/local/starcoderdata (docs/data.md: local copies)"))
    assert network == []  # no network retries: not one attempt
    assert loads.count("bigcode/starcoderdata") == 1  # one cache-only load, not retried


def test_paper_presets_name_the_papers_sources():
    cfg = compose_config(["experiment=llama3_8b_128k", "model.path=/models/llama3"])
    assert (cfg.data.corpus.source, cfg.data.corpus.path, cfg.data.corpus.split) == (
        "datasets", "emozilla/pg19", "validation")
    assert [(c.name, c.path, c.weight) for c in cfg.data.train_set.corpora] == [
        ("redpajama_v1", "togethercomputer/RedPajama-Data-1T", 4.5),
        ("redpajama_v2", "togethercomputer/RedPajama-Data-V2", 2.5),
        ("starcoder", "bigcode/starcoderdata", 2.0), ("fineweb_edu", "HuggingFaceFW/fineweb-edu", 1.0)]
    with pytest.raises(ConfigError, match=re.escape("with the override data.corpus.path=/path/to/local/pg19 (")):
        corpus_parts(cfg)
    # The override the message names is one Hydra takes, and it points the stage at the local copy.
    local = compose_config(["experiment=llama3_8b_128k", "model.path=/models/llama3",
                            "data.train_set.corpora.2.path=/path/to/local/starcoderdata"])
    assert local.data.train_set.corpora[2].path == "/path/to/local/starcoderdata"


def test_a_folder_of_books_overrides_a_presets_hub_id(tmp_path):
    """data.corpus.path=<folder of *.txt> on a paper preset (source: datasets): one document per file, as
    source folder reads it; a folder with parquet shards beside them stays a dataset folder."""
    books = tmp_path / "books"
    books.mkdir()
    for i, text in enumerate(["First book.\nIts second line.", "Second book."]):
        (books / f"book_{i}.txt").write_text(text)
    cfg = compose_config(["experiment=llama3_8b_128k", "model.path=/models/llama3", f"data.corpus.path={books}"])
    docs, heldout = corpus_parts(cfg)
    assert [text for _, text in docs] == ["First book.\nIts second line.", "Second book."] and heldout == []

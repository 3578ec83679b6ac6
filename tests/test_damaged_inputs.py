"""Damaged intermediate files: the stage that reads a truncated, empty or half-written
output of an earlier stage stops with one error naming the file, what is wrong and the rule that writes it;
an intact file reads as before."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import smoke_args

from longrope2 import eval_data, evaluate, needle_data, report, search, train_data
from longrope2.core import artifacts
from longrope2.core.artifacts import DamagedInputError
from longrope2.core.config import compose_config
from longrope2.core.errors import ConfigError
from longrope2.core.outputs import write_json
from longrope2.data.needles import load_needle_sets
from longrope2.data.rows import Rows
from longrope2.lm.loading import load_base_model, load_causal_lm

SMOKE = [*smoke_args(), "data.corpus.source=folder", "data.corpus.heldout_fraction=0.0", "model.train_len=64",
         "target_len=256"]


def _cfg(out: Path, model_dir: Path, books: Path, *extra: str):
    return compose_config([*SMOKE, f"out_dir={out}", f"model.path={model_dir}", f"data.corpus.path={books}", *extra])


def _truncate(path: Path, keep: float = 0.5) -> None:
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])


def _assert_names(err: pytest.ExceptionInfo, path: Path, rule: str, problem: str) -> None:
    """One message: the file, what is wrong, the rule that writes it and the command that reruns it."""
    message = str(err.value)
    assert isinstance(err.value, ConfigError)  # a stage's main prints it and exits 2, no traceback
    assert message.startswith(f"damaged input {path} (") and problem in message, message
    assert f"written by rule {rule}: delete it and rerun, e.g. snakemake --cores 2 --forcerun {rule}" in message


# --------------------------------------------------------------------------- 1. train_data's row shards

@pytest.fixture(scope="module")
def rows_folder(tmp_path_factory, toy_model_dir, books) -> Path:
    """Stage train_data's output: 11 rows of 256 tokens in shards of 4 (three shards) and train_data.json."""
    out = tmp_path_factory.mktemp("rows") / "out"
    cfg = _cfg(out, toy_model_dir, books, "train.length_mix=[{max_len:64,tokens:640},{max_len:256,tokens:2000}]",
               "data.train_set.long_lengths=[128,256]", "data.train_set.shard_rows=4")
    train_data.run(cfg)
    return out / "seed0" / "train_data"


def _damaged_rows(rows_folder: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "out" / "seed0" / "train_data"
    shutil.copytree(rows_folder, folder)
    return folder


@pytest.mark.parametrize(("name", "damage", "problem"), [
    ("rows-00001.tokens.npy", lambda p: _truncate(p, 0.7), "truncated: "),
    ("rows-00001.tokens.npy", lambda p: _truncate(p, 0.01), "cannot be read: "),  # header cut
    ("rows-00002.index.npz", _truncate, "cannot be read: "),
    ("rows-00000.tokens.npy", Path.unlink, "missing"),
    ("rows-00001.index.npz", Path.unlink, "missing"),
    ("train_data.json", lambda p: p.write_text(""), "empty"),
])
def test_damaged_row_shard_stops_the_reader_when_opening(rows_folder, tmp_path, name, damage, problem):
    folder = _damaged_rows(rows_folder, tmp_path)
    damage(folder / name)
    with pytest.raises(DamagedInputError) as err:
        Rows(folder)
    _assert_names(err, folder / name, "train_data", problem)


def test_shard_index_that_does_not_fit_its_tokens(rows_folder, tmp_path):
    folder = _damaged_rows(rows_folder, tmp_path)
    # another shard's index (4 rows) beside the last shard's tokens (3 rows): both files read, they disagree
    shutil.copy(folder / "rows-00000.index.npz", folder / "rows-00002.index.npz")
    with pytest.raises(DamagedInputError) as err:
        Rows(folder)
    _assert_names(err, folder / "rows-00002.index.npz", "train_data", "indexes 4 rows but the tokens file holds 3")


# --------------------------------------------------------------------------- 2. needle_data's .pt files, books.pt

@pytest.fixture(scope="module")
def needle_folder(tmp_path_factory, toy_model_dir, books) -> Path:
    out = tmp_path_factory.mktemp("needles") / "out"
    needle_data.run(_cfg(out, toy_model_dir, books, "data.search_set.books=3", "data.search_set.samples=3",
                         "data.search_set.validation_books=2", "data.search_set.validation_samples=2"))
    return out / "seed0" / "needle_data"


def _without_plain_ids(path: Path) -> None:
    tensors = torch.load(path, weights_only=True)
    del tensors["plain_ids"]
    torch.save(tensors, path)


@pytest.mark.parametrize(("name", "damage", "problem"), [
    ("search.pt", _truncate, "cannot be read: "),
    ("validation.pt", lambda p: p.write_bytes(b""), "cannot be read: "),
    ("validation_short.pt", _without_plain_ids, "lacks 'plain_ids'"),
    ("validation.pt", Path.unlink, "missing"),
    ("needle_data.json", lambda p: _truncate(p, 0.5), "invalid JSON: "),
])
def test_damaged_needle_set(needle_folder, tmp_path, name, damage, problem):
    folder = tmp_path / "out" / "seed0" / "needle_data"
    shutil.copytree(needle_folder, folder)
    damage(folder / name)
    with pytest.raises(DamagedInputError) as err:
        load_needle_sets(folder)
    _assert_names(err, folder / name, "needle_data", problem)


def test_damaged_books_stop_the_evaluation(tmp_path, toy_model_dir, books):
    cfg = _cfg(tmp_path / "out", toy_model_dir, books, "data.search_set.books=3", "eval.suites=[niah]",
               "eval.niah.lengths=[64]", "eval.niah.depths=[0.5]", "eval.niah.runs=1", "eval.variant=base",
               "eval.suite=niah")
    eval_data.run(cfg)
    path = tmp_path / "out" / "eval_data" / "books.pt"
    _truncate(path)
    with pytest.raises(DamagedInputError) as err:
        evaluate.run(cfg)
    _assert_names(err, path, "eval_data", "cannot be read: ")
    assert not (tmp_path / "out" / "eval" / "base" / "niah").exists()


# --------------------------------------------------------------------------- 3. model folders' safetensors

def _flip_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for i in range(8, 40):  # past the 8-byte header length: the JSON header itself
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(("where", "rule"), [("base_model", "pretrain"), ("seed0/train/longrope2/model", "train")])
@pytest.mark.parametrize(("damage", "problem"), [
    (lambda p: _truncate(p, 0.9), "incomplete metadata"),
    (_flip_header, "cannot be read: "),
    (lambda p: p.write_bytes(b""), "header too small"),
])
def test_corrupt_safetensors_stop_the_model_load(tmp_path, toy_model_dir, where, rule, damage, problem):
    folder = tmp_path / "out" / where
    shutil.copytree(toy_model_dir, folder)
    damage(folder / "model.safetensors")
    with pytest.raises(DamagedInputError) as err:
        load_causal_lm(str(folder), 256)
    _assert_names(err, folder / "model.safetensors", rule, problem)


def test_the_model_loader_passes_the_damaged_file_error_on(tmp_path, toy_model_dir, books):
    """lm.loading.load_base_model (search, train, evaluate) turns load errors into its own ConfigError: a damaged
    file keeps its message."""
    folder = tmp_path / "out" / "base_model"
    shutil.copytree(toy_model_dir, folder)
    _truncate(folder / "model.safetensors", 0.9)
    with pytest.raises(DamagedInputError) as err:
        load_base_model(_cfg(tmp_path / "out", folder, books), torch.float32, torch.device("cpu"), "sdpa")
    _assert_names(err, folder / "model.safetensors", "pretrain", "cannot be read: ")


# --------------------------------------------------------------------------- 4. JSON stage outputs

@pytest.fixture
def report_inputs(tmp_path) -> tuple[object, Path]:
    """What stage report reads, written as the stages write it (outputs.write_json)."""
    out = tmp_path / "out"
    cfg = compose_config([*smoke_args(out), "eval.suites=[niah]", "eval.training_free_suites=[]"])
    for variant, folder in (("base", out / "eval" / "base"), ("yarn", out / "seed0" / "eval" / "yarn"),
                            ("longrope2", out / "seed0" / "eval" / "longrope2")):
        write_json(folder / "niah" / "niah.json", {"variant": variant, "lengths": [128, 1024],
                                                   "mean_by_length": {"128": 1.0, "1024": 0.5}})
    write_json(out / "seed0" / "train" / "longrope2" / "validation.json", {"variant": "longrope2"})
    write_json(out / "seed0" / "train" / "longrope2" / "train.json", {"long_factor": [1.0, 2.0]})
    write_json(out / "seed0" / "search" / "longrope2" / "result.json",
               {"critical_dim": 6, "d_tcd": 6, "s": 8.0, "long_factor": [1.0] * 6 + [8.0] * 10})
    write_json(out / "pretrain" / "gate.json", {"pretrain_tokens": 1000})
    return cfg, out


@pytest.mark.parametrize(("name", "rule"), [
    ("seed0/train/longrope2/validation.json", "train"),
    ("seed0/train/longrope2/train.json", "train"),
    ("seed0/search/longrope2/result.json", "search"),
    ("eval/base/niah/niah.json", "evaluate_base"),
    ("seed0/eval/yarn/niah/niah.json", "evaluate"),
    ("pretrain/gate.json", "pretrain"),
])
@pytest.mark.parametrize(("damage", "problem"), [
    (lambda p: p.write_text(""), "empty"),
    (lambda p: _truncate(p, 0.5), "invalid JSON: "),
])
def test_damaged_json_stops_the_report(report_inputs, name, rule, damage, problem):
    cfg, out = report_inputs
    damage(out / name)
    with pytest.raises(DamagedInputError) as err:
        report.run(cfg)
    _assert_names(err, out / name, rule, problem)
    assert not (out / "report").exists()


def test_the_stage_exits_2_with_the_one_line(report_inputs):
    """Through the stage's main (as Snakemake runs it): status 2, the message on stderr, no traceback."""
    _, out = report_inputs
    path = out / "seed0" / "train" / "longrope2" / "validation.json"
    path.write_text("")
    proc = subprocess.run([sys.executable, "-m", "longrope2.report", *smoke_args(out), "eval.suites=[niah]",
                           "eval.training_free_suites=[]"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: damaged input {path} (empty); it is written by rule train: delete it and rerun, e.g. "
        "snakemake --cores 2 --forcerun train"]


def test_intact_report_inputs_make_the_report(report_inputs):
    cfg, out = report_inputs
    report.run(cfg)
    assert (out / "report" / "report.md").is_file()


def test_damaged_critical_dim_stops_the_search(tmp_path, toy_model_dir, books):
    out = tmp_path / "out"
    path = out / "critical_dim" / "critical_dim.json"
    write_json(path, {"d_tcd": 6, "d10_tcd": 2})
    path.write_text('{"d_tcd": 6, "d10_')  # a write cut short
    with pytest.raises(DamagedInputError) as err:
        search.run(_cfg(out, toy_model_dir, books, "search.method=longrope2"))
    _assert_names(err, path, "critical_dim", "invalid JSON: ")


@pytest.mark.parametrize(("text", "problem"), [("[1, 2]", "not a JSON object but a list"),
                                               ("{}", "lacks 'd_tcd', 'd10_tcd'")])
def test_json_that_parses_but_is_not_the_stages_object(tmp_path, text, problem):
    path = tmp_path / "out" / "critical_dim" / "critical_dim.json"
    path.parent.mkdir(parents=True)
    path.write_text(text)
    with pytest.raises(DamagedInputError) as err:
        artifacts.read_json(path, ("d_tcd", "d10_tcd"))
    _assert_names(err, path, "critical_dim", problem)


# --------------------------------------------------------------------------- the rules, intact files

@pytest.mark.parametrize(("path", "rule"), [
    ("results/toy/base_model/model.safetensors", "pretrain"),
    ("results/toy/pretrain/gate.json", "pretrain"),
    ("results/toy/critical_dim/critical_dim.json", "critical_dim"),
    ("results/toy/seed0/needle_data/search.pt", "needle_data"),
    ("results/toy/seed2/search/longrope2_plain_ppl/validation.json", "search"),
    ("results/toy/seed0/train_data/rows-00000.index.npz", "train_data"),
    ("results/toy/seed1/train/yarn/model/model.safetensors", "train"),
    ("results/toy/eval_data/books.pt", "eval_data"),
    ("results/toy/eval/base/short/short.json", "evaluate_base"),
    ("results/toy/seed0/eval/yarn/niah/niah.json", "evaluate"),
    ("results/toy/seed0/eval_training_free/yarn/niah/niah.json", "evaluate_training_free"),
    ("/models/llama3-8b/model.safetensors", None),  # a paper experiment's model.path: no rule writes it
    ("/data/train/model.safetensors", None),  # a folder named like a stage, not under seed<k>/
])
def test_writer_rule_from_the_folders(path, rule):
    assert artifacts.writer_rule(path) == rule


def test_file_no_rule_writes_says_so(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{")
    with pytest.raises(DamagedInputError, match=r"no rule of the workflow writes it: restore or replace it$"):
        artifacts.read_json(path)


def test_intact_artifacts_read_as_before(rows_folder, needle_folder, toy_model_dir):
    """The checks change nothing for intact files: the same rows, needle sets, JSON and weights."""
    rows = Rows(rows_folder)
    meta = json.loads((rows_folder / "train_data.json").read_text())
    assert rows.meta == meta and len(rows) == meta["rows"] == 11 and len(rows.shards) == 3
    got = rows.get(list(range(len(rows))))
    raw = [torch.from_numpy(s.tokens[i].astype("int64")) for s in rows.shards for i in range(len(s))]
    assert torch.equal(got["input_ids"], torch.stack(raw))

    sets = load_needle_sets(needle_folder)
    assert sorted(sets) == ["search", "validation", "validation_short"]
    for split, (samples, plain) in sets.items():
        saved = torch.load(needle_folder / f"{split}.pt", weights_only=True)
        assert torch.equal(plain, saved["plain_ids"])
        assert torch.equal(torch.stack([s.input_ids for s in samples]), saved["input_ids"].long())
    assert artifacts.load_tensors(needle_folder / "search.pt").keys() == saved.keys()

    from transformers import AutoModelForCausalLM

    loaded = load_causal_lm(str(toy_model_dir), 256)
    plain_load = AutoModelForCausalLM.from_pretrained(toy_model_dir)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), plain_load.state_dict().values(),
                                                  strict=True))

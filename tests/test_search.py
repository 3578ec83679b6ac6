"""Stage search: outputs, invariants, determinism, resume after a kill, 2 processes == 1."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from longrope2 import needle_data, rope, search
from longrope2.config import ConfigError, compose_config
from longrope2.scaling import RopeScaling, rope_facts_from_hf_config

REPO = Path(__file__).resolve().parents[1]


def _overrides(out, model_dir, folder, *extra):
    return [
        "experiment=smoke", f"out_dir={out}", f"model.path={model_dir}", "tracking.enabled=false",
        "data.corpus.source=folder", f"data.corpus.path={folder}", "data.corpus.heldout_fraction=0.0",
        "model.train_len=64", "target_len=512", "data.search_set.books=2", "data.search_set.samples=4",
        "data.search_set.validation_books=2", "data.search_set.validation_samples=4",
        "search.population=8", "search.parents=4", "search.mutants=2", "search.crossovers=2",
        "search.iterations=3", *extra,
    ]


def _prepare(out, model_dir, folder, *extra):
    """needle_data + critical_dim inputs for a search in `out`."""
    from longrope2 import critical_dim

    cfg = compose_config(_overrides(out, model_dir, folder, *extra))
    needle_data.run(cfg)
    critical_dim.run(cfg)
    return cfg


def _result(out):
    return json.loads((Path(out) / "seed0" / "search" / "longrope2" / "result.json").read_text())


def _history(out):
    with (Path(out) / "seed0" / "search" / "longrope2" / "history.csv").open() as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, toy_model_dir, books):
    """One uninterrupted single-process search: what every other run must reproduce."""
    out = tmp_path_factory.mktemp("reference")
    cfg = _prepare(out, toy_model_dir, books)
    search.run(cfg)
    return out


def test_outputs_and_invariants(reference):
    res = _result(reference)
    dims = json.loads((reference / "critical_dim" / "critical_dim.json").read_text())
    lam, c, s = res["long_factor"], res["critical_dim"], res["s"]
    assert s == 8.0 and len(lam) == 16
    assert dims["d10_tcd"] <= c <= dims["d_tcd"]
    assert all(b >= a for a, b in zip(lam, lam[1:])), "monotone"
    assert all(s - 1e-9 <= x <= 2 * s + 1e-9 for x in lam[c:]), "inside [s, 2s] above c"
    ntk = rope.ntk_tied_factors(lam[c], c, len(lam)).tolist()
    assert lam[:c] == pytest.approx(ntk[:c], rel=1e-12), "NTK tie below c"
    assert res["attention_factor"] == pytest.approx(rope.attention_temperature(8.0, 64))
    params = json.loads((reference / "seed0" / "search" / "longrope2" / "rope_parameters.json").read_text())
    assert params["rope_type"] == "longrope" and params["short_factor"] == [1.0] * 16
    assert params["long_factor"] == lam and params["original_max_position_embeddings"] == 64
    assert params["attention_factor"] == res["attention_factor"]
    # population 8 + 3 iterations x 4 children
    assert res["evaluations"] == 8 + 3 * 4
    history = _history(reference)
    assert [int(r["iteration"]) for r in history] == [0, 1, 2, 3]
    best = [float(r["best_fitness"]) for r in history]
    assert all(b <= a for a, b in zip(best, best[1:])), "the parents survive: the best never gets worse"
    assert best[-1] == pytest.approx(res["fitness_value"])
    validation = json.loads((reference / "seed0" / "search" / "longrope2" / "validation.json").read_text())
    assert set(validation["methods"]) == {"none", "pi", "ntk", "yarn", "dtcd_rule", "searched"}
    searched = validation["methods"]["searched"]["search_needle_ppl"]
    # recomputed on the job's cores after the search (another thread count): equal but for float sums
    assert searched == pytest.approx(res["fitness_value"], rel=1e-6)
    for name in ("convergence.png", "factors.png"):
        assert (reference / "seed0" / "search" / "longrope2" / name).stat().st_size > 1000


def test_same_seed_same_factors(tmp_path, reference, toy_model_dir, books):
    cfg = _prepare(tmp_path, toy_model_dir, books)
    search.run(cfg)
    assert _result(tmp_path)["long_factor"] == _result(reference)["long_factor"]
    assert _history(tmp_path) == _history(reference)


def _cli(out, model_dir, folder, *extra, launcher=()):
    cmd = [sys.executable, *launcher, "-m", "longrope2.search", *_overrides(out, model_dir, folder, *extra)]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "TQDM_DISABLE": "1"})


def test_killed_search_resumes_to_the_same_result(tmp_path, toy_model_dir, books):
    many = ("search.iterations=25",)
    _prepare(tmp_path / "ref", toy_model_dir, books, *many)
    _prepare(tmp_path / "killed", toy_model_dir, books, *many)
    state_dir = tmp_path / "killed" / "seed0" / "search" / "longrope2" / "state"
    proc = _cli(tmp_path / "killed", toy_model_dir, books, *many)
    iteration, deadline = -1, time.monotonic() + 300
    while iteration < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
        states = list(state_dir.glob("*.json"))
        if states:
            iteration = json.loads(states[0].read_text())["runs"][0]["iteration"]
    assert proc.poll() is None, "the search ended before it could be killed: make it longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "seed0" / "search" / "longrope2" / "result.json").exists()
    assert 2 <= iteration < 25

    resumed = _cli(tmp_path / "killed", toy_model_dir, books, *many)
    log = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, log
    assert "resuming the search from" in log
    search.run(compose_config(_overrides(tmp_path / "ref", toy_model_dir, books, *many)))
    killed, ref = _result(tmp_path / "killed"), _result(tmp_path / "ref")
    assert killed["long_factor"] == ref["long_factor"] and killed["fitness_value"] == ref["fitness_value"]
    assert _history(tmp_path / "killed") == _history(tmp_path / "ref")


def test_two_processes_give_the_same_result_as_one(tmp_path, reference, toy_model_dir, books):
    _prepare(tmp_path, toy_model_dir, books)
    torchrun = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    proc = _cli(tmp_path, toy_model_dir, books, "search.processes=2", launcher=torchrun)
    log = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, log
    assert _result(tmp_path)["long_factor"] == _result(reference)["long_factor"]
    assert _history(tmp_path) == _history(reference)


@pytest.mark.parametrize("override, message", [
    ("search.mutants=3", r"search.population = 8: accepted: parents \+ mutants \+ crossovers = 4 \+ 3 \+ 2"),
    ("search.attention_range=[1.2,1.1]", r"search.attention_range = \[1.2, 1.1\]: accepted: \[low, high\]"),
    ("resources.search.gpu=4", r"search.processes = 1: accepted: resources.search.gpu = 4"),
    ("search.monotone=increasing", r'search.monotone = "increasing": accepted: non_decreasing, strictly_increasing'),
])
def test_bad_search_settings_fail_before_any_work(tmp_path, toy_model_dir, books, override, message):
    with pytest.raises(ConfigError, match=message):
        compose_config(_overrides(tmp_path, toy_model_dir, books, override))


@pytest.mark.parametrize("options", [
    ("search.critical_dim_mode=per_c",),
    ("search.all_dims=true",),
    ("search.fitness=plain_ppl",),
    ("search.attention_factor=search", "search.attention_range=[1.0,1.3]"),
    ("search.attention_factor=1.1",),
    ("search.monotone=strictly_increasing", "search.last_step_max=4.0"),
    ("search=reference", "search.initial_population=12"),
])
def test_search_options(tmp_path, toy_model_dir, books, options):
    cfg = _prepare(tmp_path, toy_model_dir, books, *options, "search.iterations=1")
    search.run(cfg)
    res, history = _result(tmp_path), _history(tmp_path)
    lam, c, d_tcd, d10 = res["long_factor"], res["critical_dim"], res["d_tcd"], res["d10_tcd"]
    assert (d10, d_tcd) == (1, 5)  # the fixture's window is 64 tokens
    assert all(b >= a for a, b in zip(lam, lam[1:]))
    if "search.monotone=strictly_increasing" in options:
        assert all(b > a for a, b in zip(lam[c:], lam[c + 1:])) and lam[-1] <= lam[-2] + 4.0 + 1e-9
    if "search.all_dims=true" in options:  # every dim free: [1, 2s] below d_tcd, no NTK tie required
        assert lam[0] >= 1.0 and all(8.0 - 1e-9 <= x <= 16.0 + 1e-9 for x in lam[d_tcd:])
    else:
        assert lam[:c] == pytest.approx(rope.ntk_tied_factors(lam[c], c, 16).tolist()[:c], rel=1e-12)
    if "search.critical_dim_mode=per_c" in options:  # one GA per c in [d10_tcd, d_tcd]
        assert sorted({int(r["c_lo"]) for r in history}) == list(range(d10, d_tcd + 1))
        assert res["evaluations"] == 5 * (8 + 4)
    if "search=reference" in options:  # one GA at the reference code's c = d_tcd - 1, staircase seeds
        assert res["preset"] == "reference" and c == d_tcd - 1
        assert {(int(r["c_lo"]), int(r["c_hi"])) for r in history} == {(d_tcd - 1, d_tcd - 1)}
        assert res["evaluations"] == 12 + 4 and all(b > a for a, b in zip(lam[c:], lam[c + 1:]))
    if "search.attention_factor=search" in options:
        assert 1.0 <= res["attention_factor"] <= 1.3
    if "search.attention_factor=1.1" in options:
        assert res["attention_factor"] == 1.1
    if "search.fitness=plain_ppl" in options:
        assert res["fitness"] == "plain_ppl"
        facts = rope_facts_from_hf_config(json.loads((toy_model_dir / "config.json").read_text()))
        scaling = RopeScaling.longrope(facts, 512, long_factor=lam, attention_factor=res["attention_factor"])
        # the search's threads vs this process's: float32 logits, float64 sums, so ~1e-7 of the value
        assert res["fitness_value"] == pytest.approx(_plain_ppl_of(toy_model_dir, tmp_path, scaling), rel=1e-6)


def _plain_ppl_of(model_dir, out, scaling):
    """Independent check: the plain PPL of the needle-free rows under the searched scaling."""
    import torch
    from transformers import AutoModelForCausalLM

    from longrope2 import fitness

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    fitness.prepare_for_search(model, rope_facts_from_hf_config(model.config))
    fitness.set_long_rope(model, scaling)
    ids = torch.load(Path(out) / "seed0" / "needle_data" / "search.pt")["plain_ids"]
    return fitness.plain_ppl(model, ids)


def test_a_searched_method_sets_its_own_switches_and_writes_beside_the_others(tmp_path, toy_model_dir, books):
    cfg = _prepare(tmp_path, toy_model_dir, books, "search.method=longrope", "search.iterations=1")
    search.run(cfg)
    res = json.loads((tmp_path / "seed0" / "search" / "longrope" / "result.json").read_text())
    # LongRoPE (v1): every dim searched by plain perplexity, whatever search.* said
    assert (res["method"], res["fitness"], res["all_dims"]) == ("longrope", "plain_ppl", True)
    assert not (tmp_path / "seed0" / "search" / "longrope2").exists()


@pytest.mark.parametrize("search_cfg, expected", [
    ({"preset": "paper", "critical_dim_mode": "population", "c_range": None}, [(24, 35)]),
    ({"preset": "paper", "critical_dim_mode": "per_c", "c_range": [29, 31]}, [(29, 29), (30, 30), (31, 31)]),
    ({"preset": "reference", "critical_dim_mode": "per_c", "c_range": None}, [(34, 34)]),
    ({"preset": "reference", "critical_dim_mode": "population", "c_range": [27, 34]}, [(27, 34)]),
])
def test_critical_dims_searched_per_preset(search_cfg, expected):
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"search": search_cfg})
    assert search.c_ranges(cfg, {"d10_tcd": 24, "d_tcd": 35}) == expected


def test_a_c_range_beyond_d_tcd_is_refused():
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"search": {"preset": "paper", "critical_dim_mode": "population", "c_range": [30, 36]}})
    with pytest.raises(ConfigError, match=r"search.c_range = \[30, 36\]: accepted: null or \[lo, hi\] with "
                                          r"0 < lo <= hi <= d_tcd = 35"):
        search.c_ranges(cfg, {"d10_tcd": 24, "d_tcd": 35})

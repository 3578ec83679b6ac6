"""Stage search: outputs, invariants, determinism, resume after a kill, 2 processes == 1."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_figure, smoke_args

from longrope2 import needle_data, search
from longrope2.core.config import compose_config
from longrope2.core.errors import ConfigError
from longrope2.evolution import driver
from longrope2.rope import factors as rope

REPO = Path(__file__).resolve().parents[1]


def _overrides(out, model_dir, folder, *extra):
    return [
        *smoke_args(out, model_dir),
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
    assert res["attention_factor"] == pytest.approx(rope.longrope_attention_factor(8.0, 64))
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
        assert_figure(reference / "seed0" / "search" / "longrope2" / name)


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
    state_dir = tmp_path / "killed" / "seed0" / "checkpoints"  # core.resume: search-longrope2-<fingerprint>/
    proc = _cli(tmp_path / "killed", toy_model_dir, books, *many)
    iteration, deadline = -1, time.monotonic() + 300
    while iteration < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
        states = list(state_dir.glob("search-longrope2-*/state.json"))
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
    assert not list(state_dir.glob("search-longrope2-*")), "the state outlived the outputs"
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
    if "search.fitness=plain_ppl" in options:  # its value: test_fitness_is_the_perplexity_of_transformers_longrope
        assert res["fitness"] == "plain_ppl"


@pytest.fixture(scope="module")
def rope_sensitive_model_dir(tmp_path_factory, toy_model_dir):
    """The toy model (architecture, window 64, tokenizer) with a 10x init spread (0.2), so attention depends
    on the rotation. With the default 0.02 attention is near uniform: every factor set to 1 moves the fitness
    by only ~1e-4 relative (measured), inside any float32 tolerance, so no check could tell the searched factors
    from none; here it moves it by 7% (plain) to 39% (needle) and 1% more attention factor by >= 1e-3."""
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    path = tmp_path_factory.mktemp("rope_sensitive") / "base_model"
    config = AutoConfig.from_pretrained(toy_model_dir)
    config.initializer_range = 0.2
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(toy_model_dir).save_pretrained(path)
    return path


# float32 forwards on both sides (the search: sdpa at its thread count; the reference: eager here). The relative
# error of exp(mean NLL) is the absolute error of the mean NLL (~7 nats), i.e. ~1e-6 at float32's eps 1.2e-7;
# measured 3e-7. rel 1e-4 leaves a margin of ~300 while a 1% error in the attention factor moves the value by
# >= 1.3e-3 and a 1% error in the factors by >= 4e-2 (measured on this model).
FITNESS_REL = 1e-4


@pytest.mark.parametrize("fitness", ["needle_ppl", "plain_ppl"])
def test_fitness_is_the_perplexity_of_transformers_longrope(tmp_path, rope_sensitive_model_dir, books, fitness):
    """The fitness the search wrote for its best factors, recomputed by transformers alone: the base model
    loaded fresh with rope_type "longrope" in its config and scored by transformers' loss (plain PPL) or
    by float64 cross-entropy of its full logits at the answer tokens (needle PPL)."""
    cfg = _prepare(tmp_path, rope_sensitive_model_dir, books, f"search.fitness={fitness}", "search.iterations=1")
    search.run(cfg)
    res = _result(tmp_path)
    assert res["fitness"] == fitness
    tensors = torch.load(tmp_path / "seed0" / "needle_data" / "search.pt")
    ids, mask, plain = tensors["input_ids"].long(), tensors["answer_mask"].bool(), tensors["plain_ids"].long()
    assert ids.shape[1] == plain.shape[1] == 512 > 64, "longer than L_train: transformers takes the long factors"
    assert bool(mask.any(dim=1).all()), "every needle sample has answer tokens"

    def reference(result):
        model = _hf_longrope_model(rope_sensitive_model_dir, result, train_len=64, target_len=512)
        return _hf_plain_ppl(model, plain) if fitness == "plain_ppl" else _hf_needle_ppl(model, ids, mask)

    assert res["fitness_value"] == pytest.approx(reference(res), rel=FITNESS_REL)
    # the check can fail: the same model without the searched factors is far outside the tolerance
    unscaled = reference({**res, "long_factor": [1.0] * len(res["long_factor"]), "attention_factor": 1.0})
    assert abs(unscaled / res["fitness_value"] - 1) > 100 * FITNESS_REL


def _hf_longrope_model(model_dir, res, train_len, target_len):
    """Independent reference: the base model loaded fresh by transformers with the searched factors written into
    its config as transformers' own rope_type "longrope" (short factors ones below L_train, long factors beyond)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    base = AutoConfig.from_pretrained(model_dir)
    n = len(res["long_factor"])
    params = {"rope_type": "longrope", "rope_theta": float(base.rope_parameters["rope_theta"]),
              "short_factor": [1.0] * n, "long_factor": list(res["long_factor"]),
              "original_max_position_embeddings": train_len, "factor": target_len / train_len,
              "attention_factor": float(res["attention_factor"])}
    config = AutoConfig.from_pretrained(model_dir, rope_parameters=params)
    model = AutoModelForCausalLM.from_pretrained(model_dir, config=config, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    rotary = model.model.rotary_emb
    assert rotary.rope_type == "longrope" and rotary.attention_scaling == params["attention_factor"]
    return model


def _hf_plain_ppl(model, ids):
    """exp(mean over rows of transformers' own causal-LM loss: the row's mean NLL over its L - 1 predictions)."""
    with torch.no_grad():
        losses = [float(model(input_ids=row[None], labels=row[None]).loss) for row in ids]
    return math.exp(sum(losses) / len(losses))


def _hf_needle_ppl(model, ids, answer_mask):
    """exp(mean over samples of the mean NLL over the answer tokens), from full logits in float64."""
    nlls = []
    with torch.no_grad():
        for row, mask in zip(ids, answer_mask):
            logits = model(input_ids=row[None]).logits[0].double()  # (L, V)
            pos = torch.nonzero(mask).flatten()  # position t - 1 predicts token t
            nlls.append(float(F.cross_entropy(logits[pos - 1], row[pos])))
    return math.exp(sum(nlls) / len(nlls))


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
    assert driver.c_ranges(cfg, {"d10_tcd": 24, "d_tcd": 35}) == expected


def test_a_c_range_beyond_d_tcd_is_refused():
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"search": {"preset": "paper", "critical_dim_mode": "population", "c_range": [30, 36]}})
    with pytest.raises(ConfigError, match=r"search.c_range = \[30, 36\]: accepted: null or \[lo, hi\] with "
                                          r"0 < lo <= hi <= d_tcd = 35"):
        driver.c_ranges(cfg, {"d10_tcd": 24, "d_tcd": 35})

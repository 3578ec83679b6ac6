"""The default job itself: the whole toy DAG (`snakemake --cores 2`, ~10 min), checked against its
recorded (golden) figures and the acceptance lines of the pretrain, search, train and evaluate stages.

CI time: this runs one of the default's six methods, LongRoPE2 (the smoke DAG test runs a static
method beside it); the six-method Table 2 of `make run` is recorded in docs/methods.md."""

import json
from pathlib import Path

import pytest
from conftest import run_snakemake

GOLDEN_DIR = Path(__file__).parent / "golden"


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    proc = run_snakemake("--cores", "2", "--config", f"out_dir={root}/results/toy",
                         'overrides=["methods=[longrope2]"]', cwd=root, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root / "results" / "toy"


def test_toy_base_model_passes_the_gate_with_the_recorded_figures(toy_run):
    """A base that retrieves in its window, is not position-fragile, collapses at 8x without
    scaling, and is bit-for-bit the recorded one."""
    report = json.loads((toy_run / "pretrain" / "gate.json").read_text())
    metrics = report["metrics"]
    assert metrics["passed"] and metrics["em_1x"] >= 0.95 and metrics["fragility_em"] >= 0.7
    assert metrics["em_8x"] <= 0.2
    golden = json.loads((GOLDEN_DIR / "toy_pretrain.json").read_text())
    assert report["seed"] == golden["seed"]
    for key, value in golden["metrics"].items():
        assert metrics[key] == pytest.approx(value, rel=1e-3, abs=1e-3), key


def test_toy_search_finds_the_recorded_factors(toy_run):
    golden = json.loads((GOLDEN_DIR / "toy_pipeline.json").read_text())["search"]
    result = json.loads((toy_run / "seed0" / "search" / "longrope2" / "result.json").read_text())
    assert result["critical_dim"] == golden["critical_dim"]
    assert result["long_factor"] == pytest.approx(golden["long_factor"], rel=1e-9)
    assert result["fitness_value"] == pytest.approx(golden["fitness_value"], rel=1e-3)
    methods = json.loads((toy_run / "seed0" / "search" / "longrope2" / "validation.json").read_text())["methods"]
    for name, value in golden["validation_exact_match"].items():
        assert methods[name]["validation_exact_match"] == pytest.approx(value, abs=1e-9), name
        assert methods[name]["validation_needle_ppl"] == pytest.approx(golden["validation_needle_ppl"][name],
                                                                       rel=1e-3), name
    # training-free, the searched factors beat PI and NTK (the README states where they do not)
    for baseline in ("pi", "ntk"):
        assert methods["searched"]["validation_needle_ppl"] < methods[baseline]["validation_needle_ppl"]


def test_toy_fine_tuning_meets_the_acceptance_with_the_recorded_figures(toy_run):
    """The paper's regime (fine-tuning <= 10 % of the pretraining tokens): the fine-tuning lifts held-out 8x
    exact match far above the searched factors' training-free score and keeps the base's within the window
    (97.6 %, the paper's retention); an HF checkpoint; the recorded numbers. (Issue 4's >= 0.95 at 8x was
    for a fine-tuning as large as the pretraining, docs/toy_regime.md.)"""
    folder = toy_run / "seed0" / "train" / "longrope2"
    val = json.loads((folder / "validation.json").read_text())
    assert val["tuned"]["validation"]["length"] == 1024 and val["tuned"]["validation_short"]["length"] == 128
    assert val["tuned"]["validation"]["exact_match"] >= 0.75
    assert val["retention"] >= 0.976
    gate = json.loads((toy_run / "pretrain" / "gate.json").read_text())
    assert json.loads((folder / "train.json").read_text())["tokens"] <= 0.10 * gate["pretrain_tokens"]
    golden = json.loads((GOLDEN_DIR / "toy_pipeline.json").read_text())["train"]
    summary = json.loads((folder / "train.json").read_text())
    assert summary["steps"] == golden["steps"]
    assert summary["final_loss"] == pytest.approx(golden["final_loss"], rel=1e-3)
    for name in ("base", "tuned"):
        for split, figures in golden["validation"][name].items():
            assert val[name][split]["exact_match"] == pytest.approx(figures["exact_match"], abs=1e-9), (name, split)
            assert val[name][split]["needle_ppl"] == pytest.approx(figures["needle_ppl"], rel=1e-3), (name, split)
    config = json.loads((folder / "model" / "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == "longrope"
    assert config["rope_parameters"]["long_factor"] == json.loads(
        (toy_run / "seed0" / "search" / "longrope2" / "result.json").read_text())["long_factor"]
    assert not any((toy_run / "seed0" / "checkpoints").glob("train-*"))  # removed once the outputs exist


def test_toy_evaluations_show_the_extension_with_the_recorded_figures(toy_run):
    """Issue 5 on every variant: the base fails beyond its window where the LongRoPE2 model
    retrieves, retention holds, perplexity keeps improving with context."""
    golden = json.loads((GOLDEN_DIR / "toy_pipeline.json").read_text())["eval"]
    free = "longrope2 (training-free)"
    folder = {"base": toy_run / "eval" / "base", "longrope2": toy_run / "seed0" / "eval" / "longrope2",
              free: toy_run / "seed0" / "eval_training_free" / "longrope2"}
    result = {(v, s): json.loads((folder[v] / s / f"{s}.json").read_text())
              for v in golden for s in ("niah", "short", "ppl") if v != free or s == "niah"}
    base_niah, tuned_niah = result["base", "niah"]["mean_by_length"], result["longrope2", "niah"]["mean_by_length"]
    assert base_niah["128"] >= 0.95 and base_niah["1024"] <= 0.05  # inside vs 8x its window
    assert tuned_niah["128"] >= 0.95 and tuned_niah["1024"] >= 0.75
    assert tuned_niah["1024"] > result[free, "niah"]["mean_by_length"]["1024"] + 0.5  # the fine-tuning's share
    assert result["longrope2", "short"]["retention"] >= 0.9
    # the LongRoPE2 model models held-out text better at every length beyond the window
    base_ppl, tuned_ppl = result["base", "ppl"]["by_length"], result["longrope2", "ppl"]["by_length"]
    for length in ("256", "512", "1024", "2048"):
        assert tuned_ppl[length]["ppl"] < base_ppl[length]["ppl"]
    for variant in golden:
        for key, figures in golden[variant].items():
            suite, field = key.split(".")
            measured = result[variant, suite][field]
            if suite == "ppl":
                measured = {length: v["ppl"] for length, v in measured.items()}
            assert measured == pytest.approx(figures, rel=1e-3, abs=1e-6), (variant, key)
    # the report stage gathers them in the paper's shapes, and classifies the claims it can test
    text = (toy_run / "report" / "report.md").read_text()
    assert "**Short tasks and retention (Table 4)**" in text and "| longrope2 | 90.62 | 90.62 |" in text
    assert "Fine-tuning: 120,000 tokens = 8.37 % of the base's 1,433,600 pretraining tokens" in text
    assert "| §3, critical dimension | 2 | 2 | 0 | 0 | reproduced |" in text


"""The default job itself: the whole toy DAG (`snakemake --cores 2`, ~10 min), checked against its
recorded (golden) figures and the acceptance lines of the pretrain, search, train and evaluate stages.

The run is killed as a crash kills it (SIGKILL to Snakemake's whole process group) at four moments and
rerun each time as `make run` reruns it (longrope2.stale_lock, then snakemake): its results must still
be the recorded ones of an uninterrupted run, bit for bit, down to every sample's outcome.

CI time: this runs one of the default's six methods, LongRoPE2 (the smoke DAG test runs a static
method beside it); the six-method Table 2 of `make run` is recorded in docs/methods.md."""

import csv
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import REPO

GOLDEN_DIR = Path(__file__).parent / "golden"
TOY_ARGS = ("--cores", "2", "--config", "out_dir={root}/results/toy", 'overrides=["methods=[longrope2]"]')


def _kill_moments(out: Path) -> list[tuple[str, Callable[[], bool], Path]]:
    """(moment, reached?, the output that must not exist yet when it is reached), in the DAG's order."""
    def exists(pattern: str) -> Callable[[], bool]:
        return lambda: any(out.glob(pattern))

    return [
        ("after pretraining", exists("base_model/config.json"), out / "seed0" / "search" / "longrope2" / "result.json"),
        ("during the search", exists("seed0/checkpoints/search-longrope2-*/state.json"),  # complete: atomic_file
         out / "seed0" / "search" / "longrope2" / "result.json"),
        ("during the fine-tuning", exists("seed0/checkpoints/train-longrope2-*/step-*/trainer.json"),
         out / "seed0" / "train" / "longrope2" / "train.json"),
        ("during an evaluation", exists("seed0/eval/longrope2/*/*.json"), out / "report" / "report.md"),
    ]


def run_with_kills(root: Path, args: list[str], moments, timeout: float = 1800) -> list[dict]:
    """Start the DAG, SIGKILL its process group when each moment is reached, rerun it the way `make run`
    does (clear the stale lock, then snakemake); finally let it finish. What happened at each kill."""
    snakemake = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), *args]
    kills, start = [], time.monotonic()
    for name, reached, pending in [*moments, (None, None, None)]:
        if kills:  # the rerun, as `make run`: a lock left by the killed run is cleared first
            unlock = subprocess.run([sys.executable, "-m", "longrope2.stale_lock", "--snakefile",
                                     str(REPO / "Snakefile"), *args], cwd=root, capture_output=True, text=True)
            assert unlock.returncode == 0, unlock.stderr[-3000:]
            kills[-1]["lock_cleared"] = "running snakemake --unlock" in unlock.stderr
        with open(root / f"snakemake-{len(kills)}.log", "w") as log:
            proc = subprocess.Popen(snakemake, cwd=root, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)  # its own process group, as in a terminal
            if name is None:
                assert proc.wait(timeout=timeout) == 0, (root / f"snakemake-{len(kills)}.log").read_text()[-4000:]
                break
            while proc.poll() is None and not reached():
                assert time.monotonic() - start < timeout, f"moment {name!r} not reached"
                time.sleep(0.2)
            assert proc.poll() is None, f"the run ended before the moment {name!r}"
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        kills.append({"moment": name, "at_s": round(time.monotonic() - start, 1), "pending": not pending.exists(),
                      "locked": any((root / ".snakemake" / "locks").glob("*.lock"))})
    return kills


@pytest.fixture(scope="module")
def toy_killed(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    out = root / "results" / "toy"
    kills = run_with_kills(root, [a.format(root=root) for a in TOY_ARGS], _kill_moments(out))
    return out, kills


@pytest.fixture(scope="module")
def toy_run(toy_killed):
    return toy_killed[0]


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
    assert "**Short tasks and retention (Table 4)**" in text and "| longrope2 | 95.31 | 90.62 | " in text
    assert "Fine-tuning: 120,000 tokens = 8.37 % of the base's 1,433,600 pretraining tokens" in text
    assert "| §3, critical dimension | 2 | 2 | 0 | 0 | reproduced |" in text
    # this run fine-tunes LongRoPE2 only: Table 2's baselines are named as not run, never guessed; the
    # comparisons it can make (retention against the base) are decided against their bound
    rows = list(csv.DictReader((toy_run / "report" / "claims_detail.csv").open()))
    table2 = [r for r in rows if r["claim"] == "Table 2, fine-tuned: LongRoPE2 outperforms"]
    assert len(table2) == 12 and all(r["result"] == "unresolved" and "not run by this experiment (experiment toy:" in r["note"]
                                     for r in table2)
    retention = [r for r in rows if r["claim"] == "Table 4, short-context retention"]
    assert len(retention) == 3 and all(r["a − b [95 % CI]"] for r in retention)
    for r in retention:
        low = float(r["a − b [95 % CI]"].split("[")[1].split(",")[0])
        bound = float(r["comparison"].split("≥ ")[1].split(" ")[0])
        assert r["result"] != "reproduced" or (low > bound and float(r["p (Holm)"]) < 0.05), r


# Every sample's outcome, per model and suite: the results a kill must not change (golden "outcomes").
OUTCOME_FILES = ("eval/base/niah/niah.json", "eval/base/short/short.json", "seed0/eval/longrope2/niah/niah.json",
                 "seed0/eval/longrope2/short/short.json", "seed0/eval_training_free/longrope2/niah/niah.json")
REPORT_FILES = ("report/claims.md", "report/claims_detail.md", "report/niah.md")


def _correct(result: object) -> object:
    """Every `correct` list of a result (NIAH per length, short tasks per task), in place, nothing else."""
    if isinstance(result, dict):
        found = {k: v if k == "correct" else _correct(v) for k, v in result.items()}
        return {k: v for k, v in found.items() if v is not None} or None
    return None


def outcome_digests(out: Path) -> dict[str, str]:
    """sha256 of each result file's per-sample outcomes (`correct`) and of the report's claims and tables."""
    digests = {}
    for name in OUTCOME_FILES:
        correct = _correct(json.loads((out / name).read_text()))
        assert correct, f"{name}: no per-sample outcomes"
        digests[name] = hashlib.sha256(json.dumps(correct, sort_keys=True).encode()).hexdigest()
    for name in REPORT_FILES:
        digests[name] = hashlib.sha256((out / name).read_bytes()).hexdigest()
    return digests


def test_a_run_killed_four_times_recovers_the_uninterrupted_results(toy_killed):
    """Each kill hit a job before it finished and left Snakemake's lock, which the rerun cleared by
    itself; afterwards every per-sample outcome and the claims equal the uninterrupted run's, and MLflow
    shows the killed runs as KILLED and the stages that resumed."""
    from mlflow.tracking import MlflowClient

    out, kills = toy_killed
    print(json.dumps(kills, indent=1))  # the figures of docs/testing.md
    assert [k["moment"] for k in kills] == [m for m, _, _ in _kill_moments(out)]
    for kill in kills:
        assert kill["pending"] and kill["locked"] and kill["lock_cleared"], kill
    assert outcome_digests(out) == json.loads((GOLDEN_DIR / "toy_pipeline.json").read_text())["outcomes"]

    client = MlflowClient(f"sqlite:///{out.parent}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("longrope2").experiment_id], max_results=1000)
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]
    parents = sorted((r for r in runs if "mlflow.parentRunId" not in r.data.tags), key=lambda r: r.info.start_time)
    assert [p.info.status for p in parents] == ["KILLED"] * len(kills) + ["FINISHED"]
    for killed, rerun in zip(parents, parents[1:]):  # each rerun closed the runs of the one before
        assert killed.info.run_name in rerun.data.tags["recovered_runs"].split(", ")
    killed_stages = {r.data.tags["stage"] for r in runs if r.info.status == "KILLED" and "stage" in r.data.tags}
    assert {"search", "train", "evaluate"} <= {stage.split("-")[0] for stage in killed_stages}
    resumed = {key for p in parents for key in p.data.tags if key.startswith("resumed.")}
    assert {"resumed.search-longrope2-seed0", "resumed.train-longrope2-seed0"} <= resumed

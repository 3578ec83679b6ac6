"""Stage `pretrain` at the smoke size: a loadable Hugging Face base model, the gate report,
recorded (golden) figures, and early, clean failures on bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, smoke_args

GOLDEN_DIR = Path(__file__).parent / "golden"
GOLDEN = json.loads((GOLDEN_DIR / "smoke_pretrain.json").read_text())


def run_stage(*overrides, cwd=REPO):
    return subprocess.run(
        [sys.executable, "-m", "longrope2.pretrain", *smoke_args(), *overrides],
        cwd=cwd, capture_output=True, text=True, timeout=600,
    )


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    proc = run_stage(f"out_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_base_model_is_a_standard_hf_folder(smoke_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smoke_run / "base_model")
    tokenizer = AutoTokenizer.from_pretrained(smoke_run / "base_model")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.rope_parameters["rope_theta"] == 10000.0
    assert model.config.head_dim == 32 and model.config.max_position_embeddings == 128
    digits = tokenizer.tokenize("number 5269013")
    assert digits[-7:] == list("5269013") or [t.lstrip("Ġ▁ ") for t in digits[-7:]] == list("5269013")


def test_gate_report_matches_the_recorded_golden_figures(smoke_run):
    report = json.loads((smoke_run / "pretrain" / "gate.json").read_text())
    assert report["seed"] == 0
    assert report["heldout_documents"] > 0 and report["train_documents"] > report["heldout_documents"]
    metrics = report["metrics"]
    # Same config + seed -> same metrics on the CPU (torchtitan-style golden numbers).
    for key, value in GOLDEN["metrics"].items():
        assert metrics[key] == pytest.approx(value, rel=1e-3, abs=1e-3), key


def test_checkpoints_are_keyed_by_settings_and_corpus():
    from longrope2.core.config import compose_config
    from longrope2.pretrain import checkpoint_dir
    from longrope2.toy.settings import toy_pretrain_settings

    def key(*overrides):
        cfg = compose_config(list(overrides))
        return checkpoint_dir(cfg, toy_pretrain_settings(cfg))

    assert key() == key()
    assert key() != key("model.arch.vocab_size=640")  # never resume with a stale tokenizer
    assert key() != key("data.corpus.heldout_fraction=0.2")
    assert key() != key("model.pretrain.lr=1e-3")
    assert key().parent == Path("results/toy/pretrain/checkpoints")


def test_missing_corpus_folder_fails_before_training(tmp_path):
    proc = run_stage(f"out_dir={tmp_path}", "data.corpus.source=folder", f"data.corpus.path={tmp_path}/none")
    assert proc.returncode == 2
    assert "error: data.corpus:" in proc.stderr and f"{tmp_path}/none" in proc.stderr
    assert not (tmp_path / "base_model").exists() and not (tmp_path / "pretrain").exists()


def test_unknown_pretrain_setting_names_the_accepted_ones(tmp_path):
    proc = run_stage(f"out_dir={tmp_path}", "+model.pretrain.max_stepz=3")
    assert proc.returncode == 2
    assert "model.pretrain.max_stepz: unknown setting; accepted: enabled," in proc.stderr
    assert "max_steps" in proc.stderr

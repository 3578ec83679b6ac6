"""Stage `critical_dim` on a model config, with and without tracking."""

import json
import subprocess
import sys

from conftest import REPO
from transformers import LlamaConfig


def run_stage(*overrides):
    return subprocess.run(
        [sys.executable, "-m", "longrope2.critical_dim", *overrides],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )


def test_llama3_facts_from_a_model_config(tmp_path):
    model = tmp_path / "llama3"
    LlamaConfig(
        hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, num_hidden_layers=1,
        intermediate_size=64, vocab_size=128, max_position_embeddings=8192,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    ).save_pretrained(model)
    out = tmp_path / "out"
    proc = run_stage("experiment=llama3_8b_128k", f"model.path={model}", f"out_dir={out}",
                     "tracking.enabled=false")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "critical_dim/critical_dim.json").read_text())
    assert (summary["d_tcd"], summary["d10_tcd"], summary["search_range"]) == (35, 24, [24, 35])
    assert summary["extension_ratio"] == 16
    assert abs(summary["attention_factor"] - 1.1435) < 1e-4
    # docs/method.md §1: T_34 = 6695 < 8192 < T_35 = 8219
    assert round(summary["periods"][34]) == 6695 and round(summary["periods"][35]) == 8219
    assert len(summary["periods"]) == 64
    assert (out / "critical_dim/periods.png").read_bytes()[:4] == b"\x89PNG"
    assert not (REPO / "outputs").exists()  # Hydra writes no run folders


def test_declared_rope_must_match_the_model(tiny_hf_model_dir, tmp_path):
    proc = run_stage(f"model.path={tiny_hf_model_dir}", f"out_dir={tmp_path}", "tracking.enabled=false",
                     "model.rope_theta=500000")
    assert proc.returncode == 2
    assert "model.rope_theta = 500000.0 but the model at" in proc.stderr
    assert "has 10000.0" in proc.stderr
    assert not (tmp_path / "critical_dim").exists()


def test_missing_model_is_a_clear_error(tmp_path):
    proc = run_stage(f"model.path={tmp_path}/nowhere", f"out_dir={tmp_path}", "tracking.enabled=false")
    assert proc.returncode == 2
    assert f"model.path = '{tmp_path}/nowhere': cannot read a model config there" in proc.stderr


def test_child_run_logged_to_mlflow(tiny_hf_model_dir, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    proc = run_stage(f"model.path={tiny_hf_model_dir}", f"out_dir={tmp_path}/out",
                     f"tracking.uri={uri}", f"tracking.artifact_location={tmp_path}/artifacts")
    assert proc.returncode == 0, proc.stderr
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("longrope2").experiment_id])
    assert run.data.tags["stage"] == "critical_dim"
    assert run.data.metrics["d_tcd"] == 6 and run.data.metrics["d10_tcd"] == 2
    assert run.data.params["model.train_len"] == "128"
    assert run.data.params["target_len"] == "1024"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert artifacts == {"critical_dim.json", "periods.png"}

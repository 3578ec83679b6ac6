"""MLflow runs that a killed pipeline left RUNNING are marked KILLED by the next one, and only those."""

from __future__ import annotations

import subprocess
import sys

from omegaconf import OmegaConf

from longrope2.core import tracking


def _cfg(tmp_path):
    return OmegaConf.create({"experiment_name": "unit", "tracking": {
        "enabled": True, "uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "unit",
        "artifact_location": str(tmp_path / "artifacts")}})


def _dead_process_token() -> str:
    proc = subprocess.run([sys.executable, "-c", "from longrope2.core.tracking import process_token; "
                           "print(process_token())"], capture_output=True, text=True, check=True)
    return proc.stdout.strip()


def test_a_new_pipeline_run_closes_the_runs_whose_process_is_gone(tmp_path, monkeypatch):
    monkeypatch.delenv(tracking.PARENT_RUN_ENV, raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = _cfg(tmp_path)
    client = tracking.connect(str(cfg.tracking.uri))
    experiment = tracking.ensure_experiment(client, cfg)
    host = tracking.owner_tags()[tracking.HOST_TAG]

    def run(name, **tags):
        return client.create_run(experiment, run_name=name, tags=tags).info.run_id

    dead = run("killed-stage", **{tracking.HOST_TAG: host, tracking.PROCESS_TAG: _dead_process_token()})
    alive = run("live-stage", **tracking.owner_tags())  # this very process
    elsewhere = run("slurm-stage", **{tracking.HOST_TAG: "node-017", tracking.PROCESS_TAG: "4242:1"})
    untagged = run("old-stage")
    finished = run("done-stage", **{tracking.HOST_TAG: host, tracking.PROCESS_TAG: _dead_process_token()})
    client.set_terminated(finished, "FINISHED")

    parent = tracking.start_pipeline_run(cfg, [])
    status = {rid: client.get_run(rid).info.status for rid in (dead, alive, elsewhere, untagged, finished)}
    assert status == {dead: "KILLED", alive: "RUNNING", elsewhere: "RUNNING", untagged: "RUNNING",
                      finished: "FINISHED"}
    assert client.get_run(parent).data.tags["recovered_runs"] == "killed-stage"
    assert client.get_run(parent).info.status == "RUNNING"  # its own process is alive


def test_a_resumed_stage_says_so_on_its_run_and_its_parent(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = _cfg(tmp_path)
    parent = tracking.start_pipeline_run(cfg, [])
    monkeypatch.setenv(tracking.PARENT_RUN_ENV, parent)
    with tracking.stage_run(cfg, "search") as stage:
        stage.mark_resumed("3 finished iterations from state/abc.json")
    client = tracking.connect(str(cfg.tracking.uri))
    assert client.get_run(stage.run_id).data.tags["resumed"] == "3 finished iterations from state/abc.json"
    assert client.get_run(parent).data.tags["resumed.search"] == "3 finished iterations from state/abc.json"
    assert "recovered_runs" not in client.get_run(parent).data.tags  # nothing was left RUNNING

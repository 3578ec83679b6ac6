"""MLflow tracking: one parent run per pipeline invocation, one child run per stage.

The Snakefile's `onstart:` creates the store, the experiment and the parent run in the main
process before jobs fan out (two processes creating a fresh sqlite store at once crash), and
exports the parent run id; `sbatch --export=ALL` carries it to cluster jobs.

A run killed by SIGKILL never ends its MLflow runs: every run is tagged with the host and process that
own it, and the next pipeline run marks those still RUNNING whose process is gone as KILLED (tag
`recovered_runs` on its parent). A stage that resumes from a checkpoint says so on its own run and on
the parent (tags `resumed` and `resumed.<stage run>`).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from longrope2.core.config import flatten, run_seed, to_dict

PARENT_RUN_ENV = "LONGROPE2_MLFLOW_PARENT_RUN_ID"


MAX_PARAM_LENGTH = 6000  # MLflow's limit for one param value


HOST_TAG, PROCESS_TAG = "longrope2.host", "longrope2.process"


class TrackingError(RuntimeError):
    """The MLflow tracking store cannot be used."""


def tracking_uri(cfg: DictConfig) -> str:
    """MLFLOW_TRACKING_URI wins over tracking.uri (a server on clusters)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or str(cfg.tracking.uri)


def connect(uri: str):
    """An MlflowClient for a store that answers, or a TrackingError saying what to do."""
    # Fail fast on a dead server instead of MLflow's minutes of retries.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    from mlflow.tracking import MlflowClient

    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    try:
        client = MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)
    except Exception as err:  # MLflow raises many kinds; all mean "unusable"
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TrackingError(
            f"MLflow tracking store {uri!r} is unreachable: {first_line}. Start the server, "
            "point MLFLOW_TRACKING_URI (or tracking.uri) at a reachable store, or run with "
            "tracking.enabled=false."
        ) from None
    return client


def ensure_experiment(client, cfg: DictConfig) -> str:
    """The experiment's id, creating it with an explicit artifact location if needed."""
    name = str(cfg.tracking.experiment)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = Path(str(cfg.tracking.artifact_location)).resolve().as_uri()
    return client.create_experiment(name, artifact_location=location)


def process_token(pid: int | None = None) -> str:
    """pid:start-time of a process (Linux /proc; the pid alone elsewhere): a reused pid is another token."""
    pid = os.getpid() if pid is None else pid
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return str(pid)
    return f"{pid}:{stat.rsplit(')', 1)[1].split()[19]}"  # field 22, after the parenthesised name


def owner_tags() -> dict[str, str]:
    return {HOST_TAG: socket.gethostname(), PROCESS_TAG: process_token()}


def owner_alive(tags: Mapping[str, str]) -> bool | None:
    """Is the process that owns a run alive? None when unknown (another host, or an untagged run)."""
    if tags.get(HOST_TAG) != socket.gethostname() or PROCESS_TAG not in tags:
        return None
    token = tags[PROCESS_TAG]
    pid = int(token.split(":")[0])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return process_token(pid) == token


def close_killed_runs(client, experiment_id: str, keep: str) -> list[str]:
    """Mark KILLED the runs left RUNNING by a process of this host that is gone; their names."""
    closed = []
    for run in client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'",
                                  max_results=10_000):
        if run.info.run_id != keep and owner_alive(run.data.tags) is False:
            client.set_terminated(run.info.run_id, "KILLED")
            closed.append(run.info.run_name)
    return sorted(closed)


def _params(cfg: DictConfig) -> list:
    from mlflow.entities import Param

    flat = flatten(to_dict(cfg))
    return [Param(key, str(value)[:MAX_PARAM_LENGTH]) for key, value in sorted(flat.items())]


def start_pipeline_run(cfg: DictConfig, overrides: list[str]) -> str | None:
    """Create the store, the experiment and the parent run; export its id to the jobs."""
    if not cfg.tracking.enabled:
        return None
    client = connect(tracking_uri(cfg))
    experiment_id = ensure_experiment(client, cfg)
    run = client.create_run(
        experiment_id,
        run_name=f"{cfg.experiment_name}-{time.strftime('%Y%m%d-%H%M%S')}",
        tags={"experiment": str(cfg.experiment_name), "overrides": " ".join(overrides), **owner_tags()},
    )
    client.log_batch(run.info.run_id, params=_params(cfg))
    closed = close_killed_runs(client, experiment_id, keep=run.info.run_id)
    if closed:
        client.set_tag(run.info.run_id, "recovered_runs", ", ".join(closed))
        print(f"MLflow: marked {len(closed)} run(s) of a killed pipeline run KILLED: {', '.join(closed)}")
    os.environ[PARENT_RUN_ENV] = run.info.run_id
    return run.info.run_id


def end_pipeline_run(cfg: DictConfig, status: str) -> None:
    run_id = os.environ.get(PARENT_RUN_ENV)
    if cfg.tracking.enabled and run_id:
        connect(tracking_uri(cfg)).set_terminated(run_id, status)


class StageRun:
    """Logs one stage's metrics and artifacts; does nothing when tracking is off."""

    def __init__(self, client=None, run_id: str | None = None, name: str = "", parent: str | None = None) -> None:
        self.client, self.run_id, self.name, self.parent = client, run_id, name, parent

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.client is None:
            return
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path or path.name)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if self.client is None:
            return
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def mark_resumed(self, detail: str) -> None:
        """This stage picked up a killed run's checkpoint: tag `resumed` here, `resumed.<run name>` on the parent."""
        if self.client is None:
            return
        self.client.set_tag(self.run_id, "resumed", detail)
        if self.parent:
            self.client.set_tag(self.parent, f"resumed.{self.name}", detail)


@contextmanager
def stage_run(cfg: DictConfig, stage: str, per_seed: bool = False) -> Iterator[StageRun]:
    """A child run of the pipeline's parent run (a top-level run when a stage runs alone).

    per_seed: a replicate's stage, named <stage>-seed<k> and tagged with its seed (tag `stage` stays <stage>)."""
    if not cfg.tracking.enabled:
        yield StageRun()
        return
    client = connect(tracking_uri(cfg))
    tags = {"stage": stage, "experiment": str(cfg.experiment_name), **owner_tags()}
    if per_seed:
        tags["seed"] = str(run_seed(cfg))
        stage = f"{stage}-seed{run_seed(cfg)}"
    parent = os.environ.get(PARENT_RUN_ENV)
    if parent:
        tags["mlflow.parentRunId"] = parent
    run = client.create_run(ensure_experiment(client, cfg), run_name=stage, tags=tags)
    client.log_batch(run.info.run_id, params=_params(cfg))
    try:
        yield StageRun(client, run.info.run_id, stage, parent)
    except BaseException:
        client.set_terminated(run.info.run_id, "FAILED")
        raise
    client.set_terminated(run.info.run_id, "FINISHED")

"""The smoke experiment through the real Snakemake slurm executor plugin, on a one-node stand-in cluster:
tests/slurm_standin/ puts sbatch, sacct, squeue, srun, scancel, scontrol, sinfo, sacctmgr and sshare on the
PATH, runs each submitted job as a local background process and records every call."""

import json
import os
import re
import subprocess
from collections import Counter
from pathlib import Path

import pytest
from conftest import REPO, run_snakemake

STANDIN = Path(__file__).parent / "slurm_standin"
PROFILE = REPO / "slurm"  # what `snakemake --profile slurm` finds in the repository root
PLACEMENT = "overrides=[cluster.partition=standin, cluster.account=proj42]"
# One method: every rule still runs; fewer jobs, fewer of the plugin's 10 s status-check waits (CI time).
PLACEMENT_ONE_METHOD = 'overrides=[cluster.partition=standin, cluster.account=proj42, "methods=[longrope2]"]'
# The plugin waits 40 s before its first status check, then 10 s more after each check that saw no job end:
# start at 1 s. Outputs appear at once on a local disk: no 60 s latency wait.
FAST_POLLING = ("--slurm-init-seconds-before-status-checks", "1", "--latency-wait", "5")
SMOKE_RULES = {"pretrain", "critical_dim", "needle_data", "search", "train_data", "train", "eval_data", "evaluate",
               "evaluate_base", "report"}
# evaluate_base takes resources.evaluate: the same stage on the base model.
RESOURCES_OF = {"evaluate_base": "evaluate"}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def job_records(state: Path) -> list[dict]:
    records = [json.loads(p.read_text()) for p in (state / "jobs").glob("*.json")] if state.exists() else []
    return sorted(records, key=lambda r: int(r["jobid"]))


def option(argv: list[str], name: str) -> str | None:
    """Value of `name value` or `name=value` in an argv."""
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def rule_of(comment: str | None) -> str:
    """The plugin's --comment is rule_<name> or rule_<name>_wildcards_<values>."""
    match = re.fullmatch(r"rule_(.+?)(?:_wildcards_.*)?", comment or "")
    return match.group(1) if match else ""


def planned_jobs(log: str) -> Counter:
    """Jobs per rule from the 'Job stats' table Snakemake prints before it starts."""
    table = log.split("Job stats:")[1].split("total")[0]
    rows = [line.split() for line in table.splitlines()[3:] if line.strip()]
    return Counter({row[0]: int(row[1]) for row in rows})


@pytest.fixture
def slurm_cluster(tmp_path, monkeypatch):
    """Environment of the stand-in cluster (partition standin, account proj42, state in tmp_path/slurm);
    afterwards, cancels whatever of its jobs still runs."""
    for name in list(os.environ):
        if name.startswith("SLURM_"):  # the plugin would think it runs inside a Slurm job
            monkeypatch.delenv(name)
    env = {"PATH": f"{STANDIN}{os.pathsep}{os.environ['PATH']}", "STANDIN_SLURM_DIR": str(tmp_path / "slurm"),
           "STANDIN_SLURM_PARTITIONS": "standin", "STANDIN_SLURM_ACCOUNTS": "proj42"}
    yield env
    left = [r["jobid"] for r in job_records(tmp_path / "slurm") if r["state"] in ("PENDING", "RUNNING")]
    if left:
        subprocess.run([str(STANDIN / "scancel"), *left], env={**os.environ, **env}, check=False)


def test_smoke_runs_through_the_slurm_plugin(tmp_path, slurm_cluster):
    """`snakemake --profile slurm` on the smoke experiment, on the stand-in cluster: every job of the DAG but
    `all` is submitted exactly once with sbatch, with the partition and account of the overrides and its rule's
    cpus, memory and time from `resources.<rule>`; the plugin follows the jobs with sacct; each job runs its
    rule under srun (the slurm-jobstep executor) with those cpus and completes, once (none failed and was
    restarted); the pipeline's outputs exist."""
    from longrope2.core.config import compose_config

    resources = compose_config(["experiment=smoke"]).resources
    proc = run_snakemake("--profile", str(PROFILE), "--config", "experiment=smoke", PLACEMENT_ONE_METHOD,
                         *FAST_POLLING, cwd=tmp_path, env=slurm_cluster, timeout=780)  # timeout: a hang guard
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    state = tmp_path / "slurm"
    run_id = re.search(r"SLURM run ID: (\S+)", log).group(1)

    calls = read_jsonl(state / "sbatch.jsonl")
    assert calls and all(c["exit"] == 0 for c in calls), [c for c in calls if c["exit"]]
    planned = planned_jobs(log)
    total = sum(planned.values())
    # Every planned job ran once (`all` locally): none was restarted after a failure.
    assert f"{total} of {total} steps (100%) done" in log and "Trying to restart job" not in log
    assert planned.pop("all") == 1 and set(planned) == SMOKE_RULES
    submitted = Counter(rule_of(option(c["argv"], "--comment")) for c in calls)
    assert submitted == planned
    for call in calls:
        argv = call["argv"]
        rule = rule_of(option(argv, "--comment"))
        spec = resources[RESOURCES_OF.get(rule, rule)]
        assert "--parsable" in argv and option(argv, "--job-name") == run_id, argv
        assert (option(argv, "-p"), option(argv, "-A")) == ("standin", "proj42"), argv
        assert option(argv, "--cpus-per-task") == str(spec.cpus), argv
        assert (option(argv, "--mem"), option(argv, "-t")) == (str(spec.mem_mb), str(spec.runtime)), argv
        assert Path(option(argv, "-D")).resolve() == tmp_path.resolve(), argv
        assert "--executor slurm-jobstep" in option(argv, "--wrap"), argv
    search = next(c["argv"] for c in calls if rule_of(option(c["argv"], "--comment")) == "search")
    assert option(search, "--comment") == "rule_search_wildcards_0_longrope2"  # seed 0, search longrope2
    assert option(search, "--cpus-per-task") == str(resources.search.cpus)
    assert option(search, "--mem") == str(resources.search.mem_mb)

    records = job_records(state)
    assert sorted(r["jobid"] for r in records) == sorted(c["jobid"] for c in calls)
    for record in records:
        assert (record["state"], record["exit_code"]) == ("COMPLETED", 0), record
        steps = [json.loads(p.read_text()) for p in (state / "steps").glob(f"{record['jobid']}.*.json")]
        assert len(steps) == 1, (record["comment"], steps)  # one srun step: the rule's own snakemake
        assert steps[0]["command"][1:3] == ["-m", "snakemake"] and steps[0]["exit_code"] == 0, steps
        assert f"--cpus-per-task={record['cpus_per_task']}" in steps[0]["argv"], steps
    status_queries = [c["argv"] for c in read_jsonl(state / "calls.jsonl") if c["command"] == "sacct"]
    assert any(option(q, "--name") == run_id and "--format=JobIdRaw,State" in q for q in status_queries)

    out = tmp_path / "results" / "smoke"
    assert (out / "report" / "report.md").stat().st_size > 0
    assert (out / "seed0" / "train" / "longrope2" / "model" / "config.json").exists()


def test_a_failed_slurm_job_stops_the_run_and_names_its_rule(tmp_path, slurm_cluster):
    """A job that Slurm reports FAILED (the stand-in makes pretrain's job exit 1): snakemake exits non-zero,
    names the rule and the Slurm state, neither restarts nor resubmits the failed job, and submits nothing that
    depends on it."""
    proc = run_snakemake("--profile", str(PROFILE), "--config", "experiment=smoke", PLACEMENT, *FAST_POLLING,
                         cwd=tmp_path, env={**slurm_cluster, "STANDIN_SLURM_FAIL_RULES": "pretrain"},
                         timeout=300)  # a hang guard only
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0, log[-4000:]
    assert "Error in rule pretrain" in log, log[-4000:]
    assert "SLURM status is: 'FAILED'" in log, log[-4000:]
    assert "Trying to restart job" not in log
    # One sbatch and one job, pretrain's, FAILED: not resubmitted, and nothing after it submitted.
    calls = read_jsonl(tmp_path / "slurm" / "sbatch.jsonl")
    assert [rule_of(option(c["argv"], "--comment")) for c in calls] == ["pretrain"]
    assert [(r["state"], r["exit_code"]) for r in job_records(tmp_path / "slurm")] == [("FAILED", 1)]
    assert not (tmp_path / "results" / "smoke" / "base_model").exists()

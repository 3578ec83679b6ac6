"""The Snakemake DAG: dry-runs of every experiment (locally and with the slurm profile, typed
as users type it), early config errors, and one end-to-end run of the smoke experiment."""

import json
import socket
import threading

import pytest
from conftest import run_snakemake

DAG = {"critical_dim", "needle_data", "search", "train_data", "train", "eval_data", "evaluate_base", "evaluate",
       "report", "all"}
EXPERIMENT_RULES = {  # the toys also evaluate every method training-free (eval.training_free_suites)
    "toy": DAG | {"pretrain", "evaluate_training_free"},
    "toy_ablations": DAG | {"pretrain", "evaluate_training_free"},
    "toy_seeds": DAG | {"pretrain", "evaluate_training_free"},
    "smoke": DAG | {"pretrain"},
    "llama3_8b_128k": DAG,
    "phi3_mini_128k": DAG,
    "phi4_mini_128k": DAG,
    # finetune: false, the training-free half only: no train_data, train, evaluate or report job
    "smollm2_16k": {"critical_dim", "needle_data", "search", "eval_data", "evaluate_training_free", "all"},
}


# Stages run once for every seed (the others once per seed, tagged with it in MLflow).
SHARED_STAGES = {"pretrain", "critical_dim", "eval_data", "evaluate-base-niah", "report"}


def planned_rules(stdout: str) -> set[str]:
    """Rule names of the 'Job stats' table of a dry-run."""
    table = stdout.split("Job stats:")[1].split("total")[0]
    return {line.split()[0] for line in table.splitlines()[3:] if line.strip()}


# Jobs per rule in a dry-run: per seed one search per searched method, one fine-tuning per method and
# one evaluation per (method, suite); the base model's evaluations once.
# The toys run a model's suites in one job (eval.jobs = per_variant); the paper presets a job per suite.
PLANNED_JOBS = {
    "toy": {"needle_data": 1, "search": 2, "train": 6, "evaluate": 6, "evaluate_base": 1, "evaluate_training_free": 6},
    "toy_ablations": {"search": 3, "train": 8, "evaluate": 8, "evaluate_base": 1, "evaluate_training_free": 8},
    "toy_seeds": {"needle_data": 3, "train_data": 3, "search": 3 * 2, "train": 3 * 6, "evaluate": 3 * 6,
                  "evaluate_base": 1, "pretrain": 1, "eval_data": 1, "evaluate_training_free": 3 * 6},
    "smoke": {"search": 1, "train": 2, "evaluate": 2 * 1, "evaluate_base": 1},
    "llama3_8b_128k": {"search": 2, "train": 6, "evaluate": 6 * 5, "evaluate_base": 5},
    "phi3_mini_128k": {"search": 2, "train": 6, "evaluate": 6 * 5, "evaluate_base": 5},
    "phi4_mini_128k": {"search": 2, "train": 6, "evaluate": 6 * 5, "evaluate_base": 5},
    "smollm2_16k": {"search": 1, "evaluate_training_free": 5},
}


def planned_jobs(stdout: str) -> dict[str, int]:
    table = stdout.split("Job stats:")[1].split("total")[0]
    return {line.split()[0]: int(line.split()[1]) for line in table.splitlines()[3:] if line.strip()}


@pytest.mark.parametrize("experiment", sorted(EXPERIMENT_RULES))
def test_dry_run_locally(experiment, tmp_path):
    proc = run_snakemake("-n", "--config", f"experiment={experiment}", f"out_dir={tmp_path}/results")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert planned_rules(proc.stdout) == EXPERIMENT_RULES[experiment]
    jobs = planned_jobs(proc.stdout)
    assert {k: jobs[k] for k in PLANNED_JOBS[experiment]} == PLANNED_JOBS[experiment]


@pytest.mark.parametrize("experiment", ["llama3_8b_128k", "phi3_mini_128k", "phi4_mini_128k", "toy"])
def test_dry_run_with_the_slurm_profile_from_the_repo_root(experiment, tmp_path):
    # Literally `snakemake --profile slurm` in the repository root (./slurm is the profile).
    proc = run_snakemake(
        "-n", "-p", "--profile", "slurm", "--config", f"experiment={experiment}",
        f"out_dir={tmp_path}/results",
        "overrides=[cluster.partition=gpu-long, cluster.account=proj42]",
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout
    # the slurm profile, and the workflow profile (rerun triggers) with it
    assert "Using profiles slurm and workflow specific profile profiles/default" in proc.stdout + proc.stderr
    assert planned_rules(proc.stdout) == EXPERIMENT_RULES[experiment]
    assert "slurm_partition=gpu-long" in proc.stdout and "slurm_account=proj42" in proc.stdout
    # every job gets the same overrides
    assert f"-m longrope2.critical_dim experiment={experiment}" in proc.stdout
    if experiment != "toy":  # the search takes 8 GPUs, one torchrun process each
        assert "gpu=8" in proc.stdout
        assert ("-m torch.distributed.run --standalone --nproc_per_node 8 -m longrope2.search "
                f"experiment={experiment}") in proc.stdout
        if experiment == "llama3_8b_128k":  # the paper's fine-tuning: 8 nodes x 8 GPUs, a torchrun per node
            assert "nodes=8, tasks=8, mpi=srun, gres=gpu:8" in proc.stdout
            assert ("srun --nodes=8 --ntasks-per-node=1 --cpus-per-task=64 --kill-on-bad-exit=1 sh -c 'exec "
                    in proc.stdout)
            assert "-m torch.distributed.run --nnodes 8 --nproc_per_node 8 --rdzv_backend c10d" in proc.stdout
        else:  # and the fine-tuning: 8 GPUs, FSDP
            assert ("-m torch.distributed.run --standalone --nproc_per_node 8 -m longrope2.train "
                    f"experiment={experiment}") in proc.stdout


def test_bad_config_fails_before_any_job(tmp_path):
    proc = run_snakemake("--cores", "1", "--config", "search={population: 0}", "target_len=64",
                         f"out_dir={tmp_path}/results", cwd=tmp_path)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "configuration error (nothing was run)" in out
    assert "search.population = 0: accepted: a value >= 1" in out
    assert not (tmp_path / "results").exists()


def test_run_seed_is_the_workflows_to_set(tmp_path):
    proc = run_snakemake("-n", "--config", "experiment=smoke", "run_seed=1", cwd=tmp_path)
    assert proc.returncode != 0
    assert ("run_seed is set per job from the {seed} wildcard; accepted: seeds=[...]"
            in proc.stderr + proc.stdout)


def test_unknown_experiment_names_the_choices(tmp_path):
    proc = run_snakemake("-n", "--config", "experiment=llama4", cwd=tmp_path)
    assert proc.returncode != 0
    assert ("experiment='llama4' is not a known experiment; accepted: extend, llama3_8b_128k, phi3_mini_128k, "
            "phi4_mini_128k, smoke, smollm2_16k, toy, toy_ablations, toy_seeds") in proc.stderr + proc.stdout


@pytest.fixture
def dead_store():
    """A local port that accepts every connection and closes it unanswered: an MLflow server that is down.
    Yields (url, connections): how many times the pipeline asked it (each retry is one more connection)."""
    server = socket.create_server(("127.0.0.1", 0))
    connections = []

    def serve():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:  # closed at the end of the test
                return
            connections.append(conn.getpeername())
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}", connections
    server.close()
    thread.join(timeout=5)


def test_unreachable_tracking_store_stops_before_compute(tmp_path, dead_store):
    url, connections = dead_store
    proc = run_snakemake("--cores", "1", "--config", "experiment=smoke", cwd=tmp_path,
                         env={"MLFLOW_TRACKING_URI": url})
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"MLflow tracking store '{url}' is unreachable" in log
    assert "tracking.enabled=false" in log
    # Asked once, not retried (MLflow's default is minutes of retries with back-off) ...
    assert len(connections) == 1, connections
    # ... and before any job started: none finished, the first one's log and output were never written.
    assert "Finished jobid" not in log
    assert not (tmp_path / "results" / "smoke" / "logs" / "pretrain.log").exists()
    assert not (tmp_path / "results" / "smoke" / "base_model").exists()


def test_smoke_end_to_end_with_tracking(tmp_path):
    """The existing stages on the smoke experiment, tracked in MLflow, in a scratch folder."""
    from mlflow.tracking import MlflowClient

    proc = run_snakemake("--cores", "2", "--config", "experiment=smoke", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = tmp_path / "results" / "smoke"
    model_dir = out / "base_model"
    assert (model_dir / "config.json").exists() and (model_dir / "tokenizer.json").exists()
    gate = json.loads((out / "pretrain" / "gate.json").read_text())
    assert {"em_1x", "em_8x"} <= set(gate["metrics"])
    assert gate["pretrain_tokens"] == gate["pretrain_steps"] * 8 * 128  # the regime's denominator
    summary = json.loads((out / "critical_dim" / "critical_dim.json").read_text())
    assert (summary["d_tcd"], summary["d10_tcd"], summary["extension_ratio"]) == (6, 2, 8)
    result = json.loads((out / "seed0" / "search" / "longrope2" / "result.json").read_text())
    assert result["evaluations"] == 6 + 2 * 2 and len(result["long_factor"]) == 16
    rope_parameters = json.loads((out / "seed0" / "search" / "longrope2" / "rope_parameters.json").read_text())
    assert rope_parameters["rope_type"] == "longrope"
    assert sorted(p.name for p in (out / "seed0" / "search").iterdir()) == ["longrope2"]  # yarn needs no search
    rows = json.loads((out / "seed0" / "train_data" / "train_data.json").read_text())
    assert [b["rows"] for b in rows["buckets"]] == [2, 2] and rows["shards"] == ["rows-00000"]
    assert (out / "logs" / "pretrain.log").stat().st_size > 0
    assert not (tmp_path / "outputs").exists()

    client = MlflowClient(f"sqlite:///{tmp_path}/results/mlflow.db")
    experiment = client.get_experiment_by_name("longrope2")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = {r.data.tags["stage"]: r for r in runs if "mlflow.parentRunId" in r.data.tags}
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    evaluations = {f"evaluate-{v}-niah" for v in ("base", "yarn", "longrope2")}
    assert set(children) == {"pretrain", "critical_dim", "needle_data", "search-longrope2", "train_data",
                             "train-yarn", "train-longrope2", "eval_data", "report", *evaluations}
    for child in children.values():
        assert child.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert child.info.status == "FINISHED"
        assert child.data.params["experiment_name"] == "smoke"
        assert child.data.tags.get("seed") == (None if child.data.tags["stage"] in SHARED_STAGES else "0")
    assert "em_1x" in children["pretrain"].data.metrics
    assert children["train_data"].data.metrics["rows"] == 4
    assert "train_data.json" in {a.path for a in client.list_artifacts(children["train_data"].info.run_id)}
    pretrain_artifacts = {a.path for a in client.list_artifacts(children["pretrain"].info.run_id)}
    assert {"base_model", "gate.json"} <= pretrain_artifacts
    search_run = children["search-longrope2"].info.run_id
    assert len(client.get_metric_history(search_run, "best_fitness")) == 3 + 1  # 3 iterations, then the final
    assert {"result.json", "rope_parameters.json", "factors.png"} <= {
        a.path for a in client.list_artifacts(search_run)}
    train_run = children["train-longrope2"]
    assert len(client.get_metric_history(train_run.info.run_id, "loss")) == 2  # 2 steps
    assert {"train.json", "loss.csv", "validation.json"} <= {
        a.path for a in client.list_artifacts(train_run.info.run_id)}
    tuned = out / "seed0" / "train" / "longrope2"
    assert json.loads((tuned / "model" / "config.json").read_text())["rope_parameters"]["rope_type"] == "longrope"
    yarn = json.loads((out / "seed0" / "train" / "yarn" / "model" / "config.json").read_text())["rope_parameters"]
    assert (yarn["rope_type"], yarn["factor"], yarn["original_max_position_embeddings"]) == ("yarn", 8.0, 128)
    assert (out / "logs" / "seed0" / "train-longrope2.log").stat().st_size > 0
    # the claims, paired on the samples every model saw
    assert "| Table 2, fine-tuned: LongRoPE2 outperforms | longrope2 > yarn | NIAH 1k |" in (
        out / "report" / "claims_detail.md").read_text()
    niah = json.loads((out / "eval" / "base" / "niah" / "niah.json").read_text())
    assert niah["lengths"] == [128, 1024] and (out / "eval" / "base" / "niah" / "niah.png").exists()
    assert "niah_em_1024" in children["evaluate-longrope2-niah"].data.metrics
    niah_table = (out / "report" / "niah.md").read_text()
    assert "| longrope2 |" in niah_table and "| yarn |" in niah_table
    assert (out / "report" / "niah_longrope2.png").exists() and (out / "report" / "loss_longrope2.png").exists()
    assert (out / "report" / "factors_by_method.png").exists() and (out / "report" / "loss_yarn.png").exists()
    yarn_summary = json.loads((out / "seed0" / "train" / "yarn" / "train.json").read_text())
    assert yarn_summary["long_factor"][-1] == 8.0 and not yarn_summary["mixed_window"]  # YaRN: slow pairs at s
    # Every job of the plan ran once: none failed and was restarted, none ran twice.
    log = proc.stdout + proc.stderr
    total = sum(planned_jobs(log).values())  # the Job stats table Snakemake prints before it starts
    assert log.count("Finished jobid:") == total and f"{total} of {total} steps (100%) done" in log
    assert "Trying to restart job" not in log

    # A second invocation has nothing to do.
    again = run_snakemake("-n", "--config", "experiment=smoke", cwd=tmp_path)
    assert "Nothing to be done" in again.stdout + again.stderr
    # An override only the fine-tuning reads reruns the fine-tuning only (not pretraining or search), and
    # a method added to the list runs alone (Table 7's reuses longrope2's search).
    for override in ("methods=[yarn,longrope2,longrope2_no_mixed]", "train.lr=0.002"):
        # quoted: a list inside the overrides list would otherwise split at its commas
        plan = run_snakemake("-n", "--config", "experiment=smoke", f'overrides=["{override}"]', cwd=tmp_path)
        assert plan.returncode == 0, plan.stderr
        # ... and the evaluations of the fine-tuned variants
        assert planned_rules(plan.stdout) == {"train", "evaluate", "report", "all"}, (override, plan.stdout[-2000:])
        assert "variant=base" not in plan.stdout
        assert ("method=yarn" in plan.stdout) == override.startswith("train.lr")

    # A second seed runs its own jobs only (the base, its data and evaluations, and seed 0 stay), and the
    # report gives every fine-tuned number as mean ± std over the two seeds.
    two = ["--config", "experiment=smoke", 'overrides=["seeds=[0,1]"]']
    plan = run_snakemake("-n", *two, cwd=tmp_path)
    assert planned_rules(plan.stdout) == {"needle_data", "train_data", "search", "train", "evaluate", "report",
                                          "all"}, plan.stdout[-2000:]
    assert "seed=0" not in plan.stdout and "seed=1" in plan.stdout
    proc = run_snakemake("--cores", "2", *two, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    seed1 = json.loads((out / "seed1" / "search" / "longrope2" / "result.json").read_text())
    assert seed1["seed"] == 1 and seed1["long_factor"] != result["long_factor"]
    niah_csv = (out / "report" / "niah.csv").read_text().splitlines()
    assert niah_csv[0] == "model,128,128 std,1k,1k std" and niah_csv[1].startswith("base,")
    assert "| longrope2 | " in niah_table and " ± " in (out / "report" / "niah.md").read_text()
    assert (out / "report" / "loss_yarn_seed1.png").exists()
    names = {r.info.run_name for r in client.search_runs([experiment.experiment_id])}
    assert {"train-longrope2-seed0", "train-longrope2-seed1", "search-longrope2-seed1", "evaluate-base-niah"} <= names
    # One self-contained HTML report of every figure, each seed's search under its own heading.
    html = run_snakemake(*two, "--report", "report.html", cwd=tmp_path)
    assert html.returncode == 0, html.stderr[-3000:]
    text = (tmp_path / "report.html").read_text()
    assert "longrope2, seed 0" in text and "longrope2, seed 1" in text and "factors_by_method.png" in text


def test_tracking_can_be_switched_off(tmp_path, tiny_hf_model_dir):
    proc = run_snakemake("--cores", "1", "critical_dim", "--config", "experiment=llama3_8b_128k",
                         "overrides=[tracking.enabled=false, model.train_len=128, target_len=1024, "
                         f"model.path={tiny_hf_model_dir}, model.rope_theta=10000, model.head_dim=32]",
                         cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "results/llama3_8b_128k/critical_dim/critical_dim.json").exists()
    assert not (tmp_path / "results" / "mlflow.db").exists()

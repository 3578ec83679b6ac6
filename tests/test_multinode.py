"""Search and fine-tuning on several nodes (resources.<rule>.nodes > 1): srun starts one torchrun per node and
the torchruns meet at a c10d rendezvous on the allocation's first node (longrope2.core.launch). The command and the
slurm resources (pure), the config checks, and through the real Snakemake slurm plugin on the stand-in cluster
(tests/slurm_standin, whose nodes are loopback addresses): the sbatch options of a 2-node fine-tuning, what each
node's task receives, and its loss curve and weights over 2 nodes x 2 gloo processes equal to one process's."""

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import REPO
from numerics import FLOAT32_REL, assert_close_to_scale, assert_same_loss_curve
from test_slurm import (
    FAST_POLLING,
    PROFILE,
    STANDIN,
    job_records,
    option,
    read_jsonl,
    rule_of,
)
from test_train import _curve, _loss_csv, _overrides, _prepare

from longrope2 import train
from longrope2.core.config import compose_config
from longrope2.core.errors import ConfigError
from longrope2.core.launch import slurm_resources, stage_command

PYTHON = "/opt/venv/bin/python"
ENDPOINT = '"$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1):$((29400 + SLURM_JOB_ID % 1000))"'


# --------------------------------------------------------------------------- the command and the resources


def test_one_node_keeps_its_commands_and_resources():
    assert stage_command(PYTHON, "train", "experiment=toy") == f"{PYTHON} -m longrope2.train experiment=toy"
    assert stage_command(PYTHON, "search", "a=1", processes=8, cpus=32) == (
        f"{PYTHON} -m torch.distributed.run --standalone --nproc_per_node 8 -m longrope2.search a=1")
    spec = {"gpu": 8, "cpus": 64, "mem_mb": 512000, "runtime": 2880, "nodes": 1}
    assert slurm_resources(spec, "gpu", "proj42") == {"mem_mb": 512000, "runtime": 2880, "cpus_per_task": 64,
                                                      "gpu": 8, "slurm_partition": "gpu", "slurm_account": "proj42"}
    assert slurm_resources({**spec, "gpu": 0}) == {"mem_mb": 512000, "runtime": 2880, "cpus_per_task": 64}


class _Resources(dict):
    __getattr__ = dict.__getitem__  # the plugin reads job.resources.x and job.resources.get("x")


def test_the_papers_eight_nodes_of_eight_gpus():
    """experiment=llama3_8b_128k fine-tunes on 8 nodes x 8 GPUs (64 ranks, FSDP): the command srun runs once per
    node, and the sbatch options the slurm plugin builds from the resources (its own submit-string code)."""
    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    cfg = compose_config(["experiment=llama3_8b_128k", "model.path=/models/llama3-8b"])
    spec = cfg.resources.train
    assert (spec.nodes, spec.gpu, cfg.train.processes, cfg.train.distributed) == (8, 8, 8, "fsdp")
    assert cfg.resources.search.nodes == 1
    command = stage_command(PYTHON, "train", "experiment=llama3_8b_128k", cfg.train.processes, spec.nodes, spec.cpus)
    assert command == (
        "srun --nodes=8 --ntasks-per-node=1 --cpus-per-task=64 --kill-on-bad-exit=1 sh -c "
        + shlex.quote(f"exec {PYTHON} -m torch.distributed.run --nnodes 8 --nproc_per_node 8 --rdzv_backend c10d "
                      f'--rdzv_endpoint {ENDPOINT} --rdzv_id "$SLURM_JOB_ID" -m longrope2.train '
                      "experiment=llama3_8b_128k"))
    assert "{" not in command and "}" not in command  # Snakemake formats shell commands

    res = slurm_resources(spec, "gpu", "proj42")
    assert res == {"mem_mb": 512000, "runtime": 2880, "cpus_per_task": 64, "nodes": 8, "tasks": 8, "mpi": "srun",
                   "gres": "gpu:8", "tasks_per_gpu": 0, "slurm_partition": "gpu", "slurm_account": "proj42"}
    job = SimpleNamespace(resources=_Resources(res), threads=64)
    params = {"run_uuid": "run", "slurm_logfile": "log", "comment_str": "rule_train", "account": "-A proj42",
              "partition": "-p gpu", "workdir": "/work"}
    argv = shlex.split(get_submit_command(job, params) + set_gres_string(job))
    # one task per node with the node's 64 CPUs, 8 GPUs and 512 GB, 48 h
    for flag in ("--nodes=8", "--ntasks=8", "--cpus-per-task=64", "--gres=gpu:8"):
        assert flag in argv, (flag, argv)
    assert (option(argv, "--mem"), option(argv, "-t"), option(argv, "-p")) == ("512000", "2880", "gpu")
    assert not [a for a in argv if a.startswith(("--gpus", "--ntasks-per-gpu"))], argv  # --gpus: per job


# --------------------------------------------------------------------------- config checks


# Per node, the existing checks (train.processes = resources.train.gpu, global batch / processes) stay as they are.
@pytest.mark.parametrize("overrides, message", [
    (["resources.train.nodes=0"], "resources.train.nodes = 0: accepted: a value >= 1"),
    (["resources.search.nodes=1.5"], "resources.search.nodes = 1.5: accepted: a value of type integer"),
    (["+resources.evaluate.nodes=2"], "resources.evaluate.nodes = 2: accepted: 1 (only search and train run "
                                      "across nodes)"),
    (["resources.train.nodes=2", "train.processes=2", "train.global_batch=6"],
     "train.global_batch = 6: accepted: a multiple of resources.train.nodes x train.processes / "
     "train.context_parallel = 2 x 2 / 1 = 4"),
    (["resources.train.nodes=3", "train.processes=4", "train.distributed=fsdp", "train.micro_batch=1",
      "train.context_parallel=2", "target_len=2048", "train.global_batch=4"],
     "train.global_batch = 4: accepted: a multiple of resources.train.nodes x train.processes / "
     "train.context_parallel = 3 x 4 / 2 = 6"),
], ids=["no node", "fractional nodes", "nodes for a one-node rule", "batch over all ranks", "batch over cp groups"])
def test_bad_node_settings_fail_before_any_job(overrides, message):
    with pytest.raises(ConfigError) as err:
        compose_config(["experiment=smoke", *overrides])
    assert f"  {message}" in str(err.value).splitlines(), str(err.value)  # a whole line: nothing else reported


# --------------------------------------------------------------------------- 2 nodes x 2 processes, through slurm

NODES, PROCESSES, CPUS = 2, 2, 2
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")
# world 4: 4 rows a step (18 rows an epoch: 10 short + 8 long), 4 epochs
RUN = ("train.global_batch=4", "train.epochs=4", "model.pretrain.enabled=false")
PLACEMENT = ("cluster.partition=standin", "cluster.account=proj42")


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory, toy_model_dir, books):
    """The fine-tuning of longrope2 by `snakemake --profile slurm` on 2 stand-in nodes x 2 gloo processes (rule
    train only, its inputs made here), and the same run in one process.

    Snakemake is stopped once the job has completed, its outputs copied first: the plugin would notice the end
    only at its next status check, ~30 s later by its back-off (tests/test_slurm.py follows runs to their end)."""
    one = tmp_path_factory.mktemp("one_process")
    _prepare(one, toy_model_dir, books)
    train.run(compose_config([*_overrides(one, toy_model_dir, books, *RUN), "train.method=longrope2"]))

    work = tmp_path_factory.mktemp("two_nodes")
    out, state = work / "results", work / "slurm"
    _prepare(out, toy_model_dir, books)
    overrides = _overrides(out, toy_model_dir, books, *RUN, *PLACEMENT, f"train.processes={PROCESSES}",
                           f"resources.train.nodes={NODES}", f"resources.train.cpus={CPUS}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}  # not inside a Slurm job
    env.update(PATH=f"{STANDIN}{os.pathsep}{env['PATH']}", STANDIN_SLURM_DIR=str(state),
               STANDIN_SLURM_PARTITIONS="standin", STANDIN_SLURM_ACCOUNTS="proj42", TQDM_DISABLE="1")
    target = out / "seed0" / "train" / "longrope2"
    # The target first (--allowed-rules and --config take every word after them).
    cmd = [sys.executable, "-m", "snakemake", str(target), "--allowed-rules", "train",
           "--snakefile", str(REPO / "Snakefile"), "--profile", str(PROFILE), *FAST_POLLING,
           "--config", f"overrides={json.dumps(overrides)}"]
    records, copy = [], work / "copy"  # copy: an out_dir of its own, whatever stopping Snakemake does to outputs
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if any(r["state"] in TERMINAL for r in job_records(state)):
                break
            time.sleep(0.2)
        records = job_records(state)
        if records and records[0]["state"] == "COMPLETED" and target.is_dir():
            shutil.copytree(target, copy / "seed0" / "train" / "longrope2")
    finally:
        proc.kill()  # at once: on SIGTERM it too waits for its next status check
        log = proc.communicate(timeout=60)[0]
        left = [r["jobid"] for r in job_records(state) if r["state"] in ("PENDING", "RUNNING")]
        if left:
            subprocess.run([str(STANDIN / "scancel"), *left], env=env, check=False)
    job_log = Path(records[0]["output"]).read_text() if records and Path(records[0]["output"]).is_file() else ""
    assert [r["state"] for r in records] == ["COMPLETED"], (log + job_log)[-6000:]
    return SimpleNamespace(one=one, out=copy, state=state, overrides=overrides)


def test_a_two_node_job_runs_one_torchrun_per_node(two_nodes):
    """sbatch gets --nodes=2 with one task per node; inside the job the only step is the command's own srun
    (no `srun -n1` around the rule's snakemake: resource mpi), one task per node, each with its node's
    SLURM_NODEID / SLURM_PROCID / SLURMD_NODENAME and the job's node list, running the torchrun command."""
    calls = read_jsonl(two_nodes.state / "sbatch.jsonl")
    assert [rule_of(option(c["argv"], "--comment")) for c in calls] == ["train"] and calls[0]["exit"] == 0
    argv = calls[0]["argv"]
    for flag in (f"--nodes={NODES}", f"--ntasks={NODES}", f"--cpus-per-task={CPUS}"):
        assert flag in argv, (flag, argv)
    assert (option(argv, "--mem"), option(argv, "-p"), option(argv, "-A")) == ("4000", "standin", "proj42")
    assert not [a for a in argv if a.startswith(("--gpus", "--gres", "--ntasks-per-gpu"))], argv

    [job] = job_records(two_nodes.state)
    assert (job["state"], job["nodes"]) == ("COMPLETED", ["127.0.0.1", "127.0.0.2"]), job
    [step] = [json.loads(p.read_text()) for p in (two_nodes.state / "steps").glob(f"{job['jobid']}.*.json")]
    args = " ".join(shlex.quote(o) for o in two_nodes.overrides) + " train.method=longrope2 run_seed=0"
    expected = stage_command(shlex.quote(sys.executable), "train", args, PROCESSES, NODES, CPUS)
    assert step["argv"] == shlex.split(expected)[1:] and step["exit_code"] == 0, step
    assert f"--nnodes {NODES} --nproc_per_node {PROCESSES} --rdzv_backend c10d" in step["command"][-1]
    for rank, task in enumerate(step["tasks"]):
        env = task["env"]
        assert (env["SLURM_NODEID"], env["SLURM_PROCID"], env["SLURM_LOCALID"]) == (str(rank), str(rank), "0")
        assert env["SLURMD_NODENAME"] == task["node"] == f"127.0.0.{rank + 1}"
        assert (env["SLURM_JOB_NODELIST"], env["SLURM_NNODES"], env["SLURM_JOB_ID"]) == (
            "127.0.0.[1-2]", "2", job["jobid"])
        assert env["SLURM_CPUS_PER_TASK"] == str(CPUS)
    assert len(step["tasks"]) == NODES
    # each node's shell found the rendezvous host from the node list
    hostnames = [c for c in read_jsonl(two_nodes.state / "calls.jsonl")
                 if c["command"] == "scontrol" and c["argv"][:2] == ["show", "hostnames"]]
    assert [c["argv"][2:] for c in hostnames] == [["127.0.0.[1-2]"]] * NODES
    summary = json.loads((two_nodes.out / "seed0" / "train" / "longrope2" / "train.json").read_text())
    assert summary["processes"] == NODES * PROCESSES


def test_two_nodes_of_two_processes_give_the_loss_curve_of_one(two_nodes):
    from safetensors.torch import load_file

    assert len(_curve(two_nodes.out)) == 18 * 4 // 4
    # another all-reduce order: float32 round-off of each step's loss, learning rate and gradient norm
    assert_same_loss_curve(_loss_csv(two_nodes.out), _loss_csv(two_nodes.one), rel=FLOAT32_REL)
    weights = [load_file(out / "seed0" / "train" / "longrope2" / "model" / "model.safetensors")
               for out in (two_nodes.out, two_nodes.one)]
    assert sorted(weights[0]) == sorted(weights[1])
    for k, v in weights[0].items():  # another all-reduce order: float32 round-off, relative to the tensor
        assert_close_to_scale(v, weights[1][k], FLOAT32_REL, k)

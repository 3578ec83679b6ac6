"""How a stage's processes start: the shell command of a Snakemake job and its slurm resources.

One node: `python -m longrope2.<stage>`, or torchrun --standalone with `processes` workers. Several nodes
(resources.<rule>.nodes > 1, slurm only): `srun` starts one torchrun per node of the job's allocation, each
with `processes` workers; the torchruns meet at a c10d rendezvous on the allocation's first node and number
the ranks 0 .. nodes x processes - 1 (the rendezvous assigns node ranks: no --node_rank).
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from typing import Any

# The rendezvous port: torchrun's c10d default plus the job id mod 1000, so that two multi-node jobs whose
# allocations share a first node (nodes not exclusive) do not meet at the same port.
RDZV_PORT = 29400


# Evaluated by each node's shell inside the step: the allocation's first node and the job id. (The
# slurm-jobstep executor strips SLURM_JOB_NODELIST from the job's own shell; srun sets it again per task.)
FIRST_NODE = 'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1'


RDZV_ENDPOINT = f'"$({FIRST_NODE}):$(({RDZV_PORT} + SLURM_JOB_ID % 1000))"'


def stage_command(python: str, stage: str, args: str = "", processes: int = 1, nodes: int = 1, cpus: int = 1) -> str:
    """Shell command that runs `longrope2.<stage> args` on nodes x processes workers.

    python: the interpreter, shell-quoted; args: the stage's arguments, shell-quoted (Snakemake placeholders
    and doubled braces pass through untouched: the command adds no braces of its own); cpus: per node.
    """
    processes, nodes = int(processes), int(nodes)
    module = f"-m longrope2.{stage} {args}".rstrip()
    if nodes == 1:
        if processes == 1:
            return f"{python} {module}"
        return f"{python} -m torch.distributed.run --standalone --nproc_per_node {processes} {module}"
    torchrun = (f"exec {python} -m torch.distributed.run --nnodes {nodes} --nproc_per_node {processes} "
                f'--rdzv_backend c10d --rdzv_endpoint {RDZV_ENDPOINT} --rdzv_id "$SLURM_JOB_ID" {module}')
    # srun does not pass sbatch's --cpus-per-task on (Slurm >= 22.05): given again. One task per node; a
    # failed node ends the step instead of leaving the others blocked in a collective.
    return (f"srun --nodes={nodes} --ntasks-per-node=1 --cpus-per-task={int(cpus)} --kill-on-bad-exit=1 "
            f"sh -c {shlex.quote(torchrun)}")


def slurm_resources(spec: Mapping[str, Any], partition: str | None = None, account: str | None = None) -> dict:
    """Snakemake resources of a rule for snakemake-executor-plugin-slurm, from `resources.<rule>` (gpu, cpus and
    mem_mb per node, runtime in minutes, nodes) and the cluster placement."""
    res: dict[str, Any] = {"mem_mb": spec["mem_mb"], "runtime": spec["runtime"], "cpus_per_task": spec["cpus"]}
    nodes = int(spec.get("nodes", 1))
    if nodes > 1:
        # One task per node (its torchrun). `mpi` makes the slurm-jobstep executor run the job's command as it
        # is on the first node, not inside `srun -n1` (one node): the command's own srun spans the allocation.
        res.update(nodes=nodes, tasks=nodes, mpi="srun")
        if spec["gpu"]:
            # --gres counts GPUs per node (--gpus counts them per job); tasks_per_gpu 0 keeps the plugin
            # from turning `tasks` into --ntasks-per-gpu for a GPU job.
            res.update(gres=f"gpu:{spec['gpu']}", tasks_per_gpu=0)
    elif spec["gpu"]:
        res["gpu"] = spec["gpu"]
    if partition:
        res["slurm_partition"] = partition
    if account:
        res["slurm_account"] = account
    return res

# Compose and validate the config once, before any job; shared helpers for the rules.
import json
import shlex
import sys

from snakemake.exceptions import WorkflowError

from longrope2.core import launch, tracking
from longrope2.core.artifacts import BASE as BASE_VARIANT, SHIPPED as SHIPPED_VARIANT
from longrope2.core.checkpoint import maker_rope
from longrope2.core.config import compose_config, overrides_from_snakemake, to_dict
from longrope2.core.errors import ConfigError
from longrope2.rope.methods import searches_for, spec as method_spec

OVERRIDES = overrides_from_snakemake(config)
if any(o.lstrip("+~").startswith("run_seed=") for o in OVERRIDES):
    raise WorkflowError("configuration error (nothing was run): run_seed is set per job from the {seed} "
                        "wildcard; accepted: seeds=[...] (the replicate seeds to run)")
try:
    CFG = compose_config(OVERRIDES)
except ConfigError as err:
    raise WorkflowError(f"configuration error (nothing was run):\n{err}") from None

OUT = CFG.out_dir
# Replicate seeds (wildcard {seed}): needle sets, searches, training rows, fine-tunings and their
# evaluations run once per seed in <out_dir>/seed<k>/; the base model, critical dims and eval data are shared.
SEEDS = [int(k) for k in CFG.seeds]
SEED_OUT = f"{OUT}/seed{{seed}}"
SEED_LOGS = f"{OUT}/logs/seed{{seed}}"
# Braces doubled: Snakemake formats shell commands.
HYDRA_ARGS = " ".join(shlex.quote(o) for o in OVERRIDES).replace("{", "{{").replace("}", "}}")
PRETRAIN = bool(CFG.model.pretrain.enabled)
# Methods (wildcard {method}): each is fine-tuned alike; the searched ones (and the rcd ablations) take
# their factors (critical dim) from a search run (wildcard {search}), e.g. longrope -> search/longrope.
METHODS = list(CFG.methods)
SEARCHES = searches_for(METHODS)
SEARCHES += [s for s in CFG.searches if s not in SEARCHES]  # runs no method needs (config `searches`)
# Evaluated: the original model (BASE_VARIANT, rule evaluate_base), the checkpoint with its maker's own RoPE
# scaling where the experiment has one (SHIPPED_VARIANT, rule evaluate_shipped; eval.shipped = auto) and every
# fine-tuned method, per suite.
EVAL_SUITES = list(CFG.eval.suites)
# The shipped variant's RoPE (core.checkpoint.maker_rope): the checkpoint's own scaling or its maker's
# recommended one; None: no such variant, no rule evaluate_shipped.
MAKER_ROPE = maker_rope(CFG)


# Rule priority of the jobs the rest waits on (pretrain, data, search, train, the base's evaluations):
# on a few cores they go first and the fine-tuned models' evaluations pair up at the end, so no core
# idles between fine-tunings or waits for the base's short-task result (retention) at the end.
EARLY_PRIORITY = 1


def stage_cmd(stage, processes=1, extra=""):
    """Shell command of a stage; output goes to the terminal and to the rule's log.

    processes > 1: torchrun starts that many processes on a node (one per GPU on a cluster); resources.<stage>.nodes
    > 1 (slurm): srun starts one torchrun per node, resources.<stage>.cpus each (longrope2.core.launch).
    """
    spec = CFG.resources[stage]
    # The interpreter that runs Snakemake runs the stages: same environment, no PATH surprises.
    # extra: per-job overrides with Snakemake placeholders ({wildcards.x}), appended after the user's.
    cmd = launch.stage_command(shlex.quote(sys.executable), stage, f"{HYDRA_ARGS} {extra}", processes,
                               spec.get("nodes", 1), spec.cpus)
    return f"{cmd} 2>&1 | tee {{log}}".replace("  ", " ")


def stage_params(*keys, drop=()):
    """The resolved config sections a rule depends on (dotted keys for sub-sections): editing
    them reruns the rule, editing other sections does not. drop: dotted keys inside them the rule
    does not read (editing them reruns nothing)."""
    data = to_dict(CFG)
    for key in drop:
        *parents, last = key.split(".")
        section = data
        for part in parents:
            section = section[part]
        section.pop(last, None)

    def get(key):
        value = data
        for part in key.split("."):
            value = value[part]
        return value

    return json.dumps({key: get(key) for key in keys}, sort_keys=True)


def seed_constraint():
    return "|".join(map(str, SEEDS))


def rule_resources(rule_name):
    """Resources of a rule from `resources.<rule>` and `cluster.*` (slurm profile keys)."""
    return launch.slurm_resources(CFG.resources[rule_name], CFG.cluster.partition, CFG.cluster.account)


onstart:
    # Main process only, before jobs fan out: create the tracking store and the parent run.
    try:
        tracking.start_pipeline_run(CFG, OVERRIDES)
    except tracking.TrackingError as err:
        sys.exit(f"error: {err}")


onsuccess:
    tracking.end_pipeline_run(CFG, "FINISHED")


onerror:
    tracking.end_pipeline_run(CFG, "FAILED")

# Stages `eval_data` (every suite's data, once per tokenizer) and `evaluate` (one suite on one model, or
# all of them under eval.jobs = per_variant): RULER, needle in a haystack, LongBench/InfiniteBench, short
# tasks, perplexity. The base model is evaluated once (evaluate_base), and so is the maker's own setting
# where one exists (evaluate_shipped); each fine-tuned method once per seed, on the same data.

# eval.jobs: a job per suite (wildcard {suite}) or one job per model for all its suites (per_variant).
PER_SUITE = CFG.eval.jobs == "per_suite"
SUITE_LOG = "-{suite}" if PER_SUITE else ""


def suite_outputs(folder):
    """An evaluate job's output folders in ``folder``: its {suite}, or every suite (per_variant)."""
    if PER_SUITE:
        return [directory(f"{folder}/{{suite}}")]
    return [directory(f"{folder}/{suite}") for suite in EVAL_SUITES]


def job_suites(wildcards):
    """The suites an evaluate job runs."""
    return [wildcards.suite] if PER_SUITE else EVAL_SUITES


def suites_arg(wildcards):
    return "[" + ",".join(job_suites(wildcards)) + "]"


# The evaluations' folders: <suite>/ under these, per job or all at once (the targets of `all` and `report`).
BASE_EVAL_DIR = f"{OUT}/eval/{BASE_VARIANT}"
METHOD_EVAL_DIR = f"{SEED_OUT}/eval/{{method}}"
BASE_EVALUATIONS = [f"{BASE_EVAL_DIR}/{suite}" for suite in EVAL_SUITES]
# The evaluate rules' config: eval.shipped only decides whether rule evaluate_shipped exists, so switching it
# reruns no evaluation (and a run from before the key keeps its results).
EVAL_PARAMS = stage_params("eval", "model", "target_len", "seed", drop=("eval.shipped",))
SHIPPED_EVAL_DIR = f"{OUT}/eval/{SHIPPED_VARIANT}"
SHIPPED_EVALUATIONS = [f"{SHIPPED_EVAL_DIR}/{suite}" for suite in EVAL_SUITES] if MAKER_ROPE else []
EVALUATIONS = expand(f"{METHOD_EVAL_DIR}/{{suite}}", method=METHODS, suite=EVAL_SUITES, seed=SEEDS)


rule eval_data:
    input:
        model=rules.pretrain.output.model if PRETRAIN else [],
    output:
        # books.pt, ruler/<task>-<length>.jsonl + ruler.json, short/<task>.jsonl, eval_data.json
        directory(f"{OUT}/eval_data"),
    log:
        f"{OUT}/logs/eval_data.log",
    params:
        cfg=stage_params("eval.ruler", "eval.short", "eval.suites", "data.corpus", "data.needle",
                         "data.search_set.books", "model.path", "seed"),
    priority: EARLY_PRIORITY
    threads: CFG.resources.eval_data.cpus
    resources:
        **rule_resources("eval_data"),
    shell:
        stage_cmd("eval_data")


rule evaluate_base:
    input:
        data=rules.eval_data.output[0],
        model=rules.pretrain.output.model if PRETRAIN else [],
    output:
        # per suite: <suite>.json and the suite's table / figure
        suite_outputs(BASE_EVAL_DIR),
    log:
        f"{OUT}/logs/evaluate-{BASE_VARIANT}{SUITE_LOG}.log",
    wildcard_constraints:
        suite="|".join(EVAL_SUITES) or "none",
    params:
        cfg=EVAL_PARAMS,
        suites=suites_arg,
    priority: EARLY_PRIORITY
    threads: CFG.resources.evaluate.cpus
    resources:
        **rule_resources("evaluate"),
    shell:
        stage_cmd("evaluate", extra=f"eval.variant={BASE_VARIANT} 'eval.suite={{params.suites}}'")


def shipped_inputs(wildcards):
    """The suite data and, for the short tasks, the base's result (retention); the checkpoint is model.path."""
    inputs = {"data": rules.eval_data.output[0]}
    if "short" in job_suites(wildcards):
        inputs["base_short"] = f"{BASE_EVAL_DIR}/short"
    return inputs


if MAKER_ROPE:
    # The base checkpoint, not fine-tuned, with its maker's own RoPE scaling (MAKER_ROPE: the one config.json
    # ships, or the one its maker recommends), evaluated once, shared by every seed. No early priority: no job
    # but the report waits on it.

    rule evaluate_shipped:
        input:
            unpack(shipped_inputs),
        output:
            suite_outputs(SHIPPED_EVAL_DIR),
        log:
            f"{OUT}/logs/evaluate-{SHIPPED_VARIANT}{SUITE_LOG}.log",
        wildcard_constraints:
            suite="|".join(EVAL_SUITES) or "none",
        params:
            cfg=EVAL_PARAMS,
            # the scaling itself (a checkpoint's config.json or the makers' table edited: a rerun)
            maker_rope=json.dumps(MAKER_ROPE.rope_parameters, sort_keys=True),
            suites=suites_arg,
        threads: CFG.resources.evaluate.cpus
        resources:
            **rule_resources("evaluate"),
        shell:
            stage_cmd("evaluate", extra=f"eval.variant={SHIPPED_VARIANT} 'eval.suite={{params.suites}}'")


def evaluate_inputs(wildcards):
    """The method's fine-tuned model, the suite data and, for the short tasks, the base's result (retention)."""
    inputs = {"data": rules.eval_data.output[0],
              "model": expand(rules.train.output[0], method=wildcards.method, seed=wildcards.seed)}
    if "short" in job_suites(wildcards):
        inputs["base_short"] = f"{BASE_EVAL_DIR}/short"
    return inputs


rule evaluate:
    input:
        unpack(evaluate_inputs),
    output:
        suite_outputs(METHOD_EVAL_DIR),
    log:
        f"{SEED_LOGS}/evaluate-{{method}}{SUITE_LOG}.log",
    wildcard_constraints:
        method="|".join(METHODS),
        suite="|".join(EVAL_SUITES) or "none",
        seed=seed_constraint(),
    params:
        cfg=EVAL_PARAMS,
        suites=suites_arg,
    threads: CFG.resources.evaluate.cpus
    resources:
        **rule_resources("evaluate"),
    shell:
        stage_cmd(
            "evaluate",
            extra="eval.variant={wildcards.method} 'eval.suite={params.suites}' run_seed={wildcards.seed}",
        )


# Training-free: each method's factors on the base model, not fine-tuned (eval.training_free_suites; the
# report's Table 2 shows them beside the fine-tuned rows). One job per method runs all those suites.
TRAINING_FREE_SUITES = list(CFG.eval.training_free_suites)
TRAINING_FREE_EVAL_DIR = f"{SEED_OUT}/eval_training_free/{{method}}"
TRAINING_FREE_EVALUATIONS = expand(
    f"{TRAINING_FREE_EVAL_DIR}/{{suite}}", method=METHODS, suite=TRAINING_FREE_SUITES, seed=SEEDS
)


def training_free_inputs(wildcards):
    """The eval data, the base model and the search result the method's factors (or critical dim) come from."""
    inputs = {"data": rules.eval_data.output[0]}
    if PRETRAIN:
        inputs["model"] = rules.pretrain.output.model
    search = method_spec(wildcards.method).search
    if search is not None:
        inputs["search"] = expand(rules.search.output.result, search=search, seed=wildcards.seed)
    if "short" in TRAINING_FREE_SUITES:
        inputs["base_short"] = f"{BASE_EVAL_DIR}/short"
    return inputs


if TRAINING_FREE_SUITES:

    rule evaluate_training_free:
        input:
            unpack(training_free_inputs),
        output:
            [directory(f"{TRAINING_FREE_EVAL_DIR}/{suite}") for suite in TRAINING_FREE_SUITES],
        log:
            f"{SEED_LOGS}/evaluate-{{method}}-training_free.log",
        wildcard_constraints:
            method="|".join(METHODS),
            seed=seed_constraint(),
        params:
            cfg=EVAL_PARAMS,
            suites="[" + ",".join(TRAINING_FREE_SUITES) + "]",
        threads: CFG.resources.evaluate.cpus
        resources:
            **rule_resources("evaluate"),
        shell:
            stage_cmd(
                "evaluate",
                extra="eval.variant={wildcards.method} 'eval.suite={params.suites}' eval.training_free=true "
                "run_seed={wildcards.seed}",
            )

# Stages `eval_data` (every suite's data, once per tokenizer) and `evaluate` (one suite on one model):
# RULER, needle in a haystack, LongBench/InfiniteBench, short tasks, perplexity. The base model is
# evaluated once (evaluate_base); each fine-tuned method once per seed, on the same data.


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
        # <suite>.json and the suite's table / figure
        directory(f"{OUT}/eval/{BASE_VARIANT}/{{suite}}"),
    log:
        f"{OUT}/logs/evaluate-{BASE_VARIANT}-{{suite}}.log",
    wildcard_constraints:
        suite="|".join(EVAL_SUITES) or "none",
    params:
        cfg=stage_params("eval", "model", "target_len", "seed"),
    threads: CFG.resources.evaluate.cpus
    resources:
        **rule_resources("evaluate"),
    shell:
        stage_cmd("evaluate", extra=f"eval.variant={BASE_VARIANT} eval.suite={{wildcards.suite}}")


def evaluate_inputs(wildcards):
    """The method's fine-tuned model, the suite data and, for the short tasks, the base's result (retention)."""
    inputs = {"data": rules.eval_data.output[0],
              "model": expand(rules.train.output[0], method=wildcards.variant, seed=wildcards.seed)}
    if wildcards.suite == "short":
        inputs["base_short"] = expand(rules.evaluate_base.output[0], suite="short")
    return inputs


rule evaluate:
    input:
        unpack(evaluate_inputs),
    output:
        directory(f"{SEED_OUT}/eval/{{variant}}/{{suite}}"),
    log:
        f"{SEED_LOGS}/evaluate-{{variant}}-{{suite}}.log",
    wildcard_constraints:
        variant="|".join(METHODS),
        suite="|".join(EVAL_SUITES) or "none",
        seed=seed_constraint(),
    params:
        cfg=stage_params("eval", "model", "target_len", "seed"),
    threads: CFG.resources.evaluate.cpus
    resources:
        **rule_resources("evaluate"),
    shell:
        stage_cmd(
            "evaluate",
            extra="eval.variant={wildcards.variant} eval.suite={wildcards.suite} run_seed={wildcards.seed}",
        )

# Stages `eval_data` (every suite's data, once per tokenizer) and `evaluate` (one suite on one
# model variant): RULER, needle in a haystack, LongBench/InfiniteBench, short tasks, perplexity.


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


def evaluate_inputs(wildcards):
    """The variant's model, the suite data and, for a fine-tuned variant's short tasks, the base's
    short result (retention)."""
    inputs = {"data": rules.eval_data.output[0]}
    if wildcards.variant == BASE_VARIANT:
        if PRETRAIN:
            inputs["model"] = rules.pretrain.output.model
    else:
        inputs["model"] = expand(rules.train.output[0], method=wildcards.variant)
        if wildcards.suite == "short":
            inputs["base_short"] = f"{OUT}/eval/{BASE_VARIANT}/short"
    return inputs


rule evaluate:
    input:
        unpack(evaluate_inputs),
    output:
        # <suite>.json and the suite's table / figure
        directory(f"{OUT}/eval/{{variant}}/{{suite}}"),
    log:
        f"{OUT}/logs/evaluate-{{variant}}-{{suite}}.log",
    wildcard_constraints:
        variant="|".join(EVAL_VARIANTS),
        suite="|".join(EVAL_SUITES) or "none",
    params:
        cfg=stage_params("eval", "model", "target_len", "seed"),
    threads: CFG.resources.evaluate.cpus
    resources:
        **rule_resources("evaluate"),
    shell:
        stage_cmd("evaluate", extra="eval.variant={wildcards.variant} eval.suite={wildcards.suite}")

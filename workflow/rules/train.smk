# Stage `train`: the same mixed context window fine-tuning for every method ({method}); exports the HF model.


def train_inputs(wildcards):
    """The base model and, of the job's seed, the rows, the needle sets and (searched / rcd methods) the search result."""
    seed = wildcards.seed
    inputs = {
        "rows": expand(rules.train_data.output.rows, seed=seed),
        "needles": expand(rules.needle_data.output, seed=seed),
    }
    if PRETRAIN:
        inputs["model"] = rules.pretrain.output.model
    search = method_spec(wildcards.method).search
    if search is not None:
        inputs["search"] = expand(rules.search.output.result, search=search, seed=seed)
    return inputs


rule train:
    input:
        unpack(train_inputs),
    output:
        # model/ (the Hugging Face checkpoint), loss.csv, loss.png, validation.json, train.json
        directory(f"{SEED_OUT}/train/{{method}}"),
    log:
        f"{SEED_LOGS}/train-{{method}}.log",
    wildcard_constraints:
        method="|".join(METHODS),
        seed=seed_constraint(),
    params:
        cfg=stage_params("model", "train", "target_len", "seed"),
    priority: EARLY_PRIORITY
    threads: CFG.resources.train.cpus
    resources:
        **rule_resources("train"),
    shell:
        stage_cmd("train", processes=CFG.train.processes, extra="train.method={wildcards.method} run_seed={wildcards.seed}")

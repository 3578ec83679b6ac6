# Stage `train`: the same mixed context window fine-tuning for every method ({method}); exports the HF model.


def train_inputs(wildcards):
    """The base model, the rows, the needle sets and, for searched / rcd methods, their search result."""
    inputs = {"rows": rules.train_data.output.rows, "needles": rules.needle_data.output}
    if PRETRAIN:
        inputs["model"] = rules.pretrain.output.model
    search = method_spec(wildcards.method).search
    if search is not None:
        inputs["search"] = expand(rules.search.output.result, search=search)
    return inputs


rule train:
    input:
        unpack(train_inputs),
    output:
        # model/ (the Hugging Face checkpoint), loss.csv, loss.png, validation.json, train.json
        directory(f"{OUT}/train/{{method}}"),
    log:
        f"{OUT}/logs/train-{{method}}.log",
    wildcard_constraints:
        method="|".join(METHODS),
    params:
        cfg=stage_params("model", "train", "target_len", "seed"),
    threads: CFG.resources.train.cpus
    resources:
        **rule_resources("train"),
    shell:
        stage_cmd("train", processes=CFG.train.processes, extra="train.method={wildcards.method}")

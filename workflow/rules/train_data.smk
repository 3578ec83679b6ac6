# Stage `train_data`: rows of exactly target_len tokens for mixed context window fine-tuning, per seed.


rule train_data:
    input:
        model=rules.pretrain.output.model if PRETRAIN else [],
    output:
        rows=directory(f"{SEED_OUT}/train_data"),
    log:
        f"{SEED_LOGS}/train_data.log",
    wildcard_constraints:
        seed=seed_constraint(),
    params:
        cfg=stage_params(
            "model", "data.corpus", "data.needle", "data.train_set", "train.length_mix", "target_len", "seed"
        ),
    priority: EARLY_PRIORITY
    threads: CFG.resources.train_data.cpus
    resources:
        **rule_resources("train_data"),
    shell:
        stage_cmd("train_data", extra="run_seed={wildcards.seed}")

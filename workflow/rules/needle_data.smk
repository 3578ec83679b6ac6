# Stage `needle_data`: needle samples of exactly target_len tokens for the search (and a held-out check), per seed.


rule needle_data:
    input:
        model=rules.pretrain.output.model if PRETRAIN else [],
    output:
        search=f"{SEED_OUT}/needle_data/search.pt",
        validation=(
            [f"{SEED_OUT}/needle_data/validation.pt", f"{SEED_OUT}/needle_data/validation_short.pt"]
            if CFG.data.search_set.validation_samples
            else []
        ),
        meta=f"{SEED_OUT}/needle_data/needle_data.json",
    log:
        f"{SEED_LOGS}/needle_data.log",
    wildcard_constraints:
        seed=seed_constraint(),
    params:
        cfg=stage_params("model", "data.corpus", "data.needle", "data.search_set", "target_len", "seed"),
    priority: EARLY_PRIORITY
    threads: CFG.resources.needle_data.cpus
    resources:
        **rule_resources("needle_data"),
    shell:
        stage_cmd("needle_data", extra="run_seed={wildcards.seed}")

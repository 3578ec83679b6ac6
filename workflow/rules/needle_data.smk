# Stage `needle_data`: needle samples of exactly target_len tokens for the search (and a held-out check).


rule needle_data:
    input:
        model=rules.pretrain.output.model if PRETRAIN else [],
    output:
        search=f"{OUT}/needle_data/search.pt",
        validation=(
            [f"{OUT}/needle_data/validation.pt", f"{OUT}/needle_data/validation_short.pt"]
            if CFG.data.search_set.validation_samples
            else []
        ),
        meta=f"{OUT}/needle_data/needle_data.json",
    log:
        f"{OUT}/logs/needle_data.log",
    params:
        cfg=stage_params("model", "data.corpus", "data.needle", "data.search_set", "target_len", "seed"),
    threads: CFG.resources.needle_data.cpus
    resources:
        **rule_resources("needle_data"),
    shell:
        stage_cmd("needle_data")

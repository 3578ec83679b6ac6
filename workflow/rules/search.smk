# Stage `search`: the evolutionary search of the rescaling factors, one run per searched method
# ({search}: longrope2; longrope = all dims by plain PPL; the Table 6 / 10 ablations).


rule search:
    input:
        model=rules.pretrain.output.model if PRETRAIN else [],
        needles=rules.needle_data.output,
        critical_dim=rules.critical_dim.output.json,
    output:
        result=f"{SEED_OUT}/search/{{search}}/result.json",
        rope_parameters=f"{SEED_OUT}/search/{{search}}/rope_parameters.json",
        history=f"{SEED_OUT}/search/{{search}}/history.csv",
        validation=f"{SEED_OUT}/search/{{search}}/validation.json",
        convergence=report(
            f"{SEED_OUT}/search/{{search}}/convergence.png",
            caption="../report/search_convergence.rst",
            category="Search",
            subcategory="{search}, seed {seed}",
        ),
        factors=report(
            f"{SEED_OUT}/search/{{search}}/factors.png",
            caption="../report/search_factors.rst",
            category="Search",
            subcategory="{search}, seed {seed}",
        ),
    log:
        f"{SEED_LOGS}/search-{{search}}.log",
    wildcard_constraints:
        search="|".join(SEARCHES) or "none",
        seed=seed_constraint(),
    params:
        cfg=stage_params("model", "search", "target_len", "seed"),
    priority: EARLY_PRIORITY
    threads: CFG.resources.search.cpus
    resources:
        **rule_resources("search"),
    shell:
        stage_cmd("search", processes=CFG.search.processes, extra="search.method={wildcards.search} run_seed={wildcards.seed}")

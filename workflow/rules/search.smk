# Stage `search`: the evolutionary search of the rescaling factors (needle-driven perplexity).


rule search:
    input:
        model=rules.pretrain.output.model if PRETRAIN else [],
        needles=rules.needle_data.output,
        critical_dim=rules.critical_dim.output.json,
    output:
        result=f"{OUT}/search/result.json",
        rope_parameters=f"{OUT}/search/rope_parameters.json",
        history=f"{OUT}/search/history.csv",
        validation=f"{OUT}/search/validation.json",
        convergence=report(
            f"{OUT}/search/convergence.png", caption="../report/search_convergence.rst", category="Search"
        ),
        factors=report(f"{OUT}/search/factors.png", caption="../report/search_factors.rst", category="Search"),
    log:
        f"{OUT}/logs/search.log",
    params:
        cfg=stage_params("model", "search", "target_len", "seed"),
    threads: CFG.resources.search.cpus
    resources:
        **rule_resources("search"),
    shell:
        stage_cmd("search", processes=CFG.search.processes)

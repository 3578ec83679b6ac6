# Stage `search`: the evolutionary search of the rescaling factors, one run per searched method
# ({search}: longrope2; longrope = all dims by plain PPL; the Table 6 / 10 ablations).


rule search:
    input:
        model=rules.pretrain.output.model if PRETRAIN else [],
        needles=rules.needle_data.output,
        critical_dim=rules.critical_dim.output.json,
    output:
        result=f"{OUT}/search/{{search}}/result.json",
        rope_parameters=f"{OUT}/search/{{search}}/rope_parameters.json",
        history=f"{OUT}/search/{{search}}/history.csv",
        validation=f"{OUT}/search/{{search}}/validation.json",
        convergence=report(
            f"{OUT}/search/{{search}}/convergence.png",
            caption="../report/search_convergence.rst",
            category="Search",
            subcategory="{search}",
        ),
        factors=report(
            f"{OUT}/search/{{search}}/factors.png",
            caption="../report/search_factors.rst",
            category="Search",
            subcategory="{search}",
        ),
    log:
        f"{OUT}/logs/search-{{search}}.log",
    wildcard_constraints:
        search="|".join(SEARCHES) or "none",
    params:
        cfg=stage_params("model", "search", "target_len", "seed"),
    threads: CFG.resources.search.cpus
    resources:
        **rule_resources("search"),
    shell:
        stage_cmd("search", processes=CFG.search.processes, extra="search.method={wildcards.search}")

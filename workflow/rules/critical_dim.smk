# Stage `critical_dim`: d_tcd, d10_tcd, the search range and every dimension's period.


rule critical_dim:
    input:
        model=rules.pretrain.output.model if PRETRAIN else [],
    output:
        json=f"{OUT}/critical_dim/critical_dim.json",
        figure=report(
            f"{OUT}/critical_dim/periods.png",
            caption="../report/critical_dim.rst",
            category="RoPE",
        ),
    log:
        f"{OUT}/logs/critical_dim.log",
    params:
        cfg=stage_params("model", "target_len"),
    priority: EARLY_PRIORITY
    threads: CFG.resources.critical_dim.cpus
    resources:
        **rule_resources("critical_dim"),
    shell:
        stage_cmd("critical_dim")

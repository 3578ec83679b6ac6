# Stage `report`: the evaluations as the paper's tables (Markdown, CSV, LaTeX) and figures.


rule report:
    input:
        base_evaluations=BASE_EVALUATIONS,
        shipped_evaluations=SHIPPED_EVALUATIONS,
        evaluations=EVALUATIONS,
        training_free=TRAINING_FREE_EVALUATIONS,
        train=expand(rules.train.output, method=METHODS, seed=SEEDS),
        search=expand(rules.search.output.factors, search=SEARCHES, seed=SEEDS),
        critical_dim=rules.critical_dim.output,
    output:
        report(
            directory(f"{OUT}/report"),
            patterns=["{name}.png"],
            caption="../report/report_figures.rst",
            category="Report",
        ),
    log:
        f"{OUT}/logs/report.log",
    params:
        cfg=stage_params("report", "methods", "seeds", "eval.suites", "eval.training_free_suites", "eval.shipped",
                         "model.name", "model.path", "model.train_len", "target_len", "seed", "train.length_mix"),
    threads: 1
    resources:
        **rule_resources("report"),
    shell:
        stage_cmd("report")

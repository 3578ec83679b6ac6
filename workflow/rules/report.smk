# Stage `report`: the evaluations as the paper's tables (Markdown, CSV, LaTeX) and figures.


rule report:
    input:
        evaluations=expand(rules.evaluate.output, variant=EVAL_VARIANTS, suite=EVAL_SUITES),
        train=rules.train.output,
        search=rules.search.output.factors,
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
        cfg=stage_params("report", "eval.suites", "model.name", "model.path", "model.train_len", "target_len",
                         "seed", "train.mixed_window"),
    threads: 1
    resources:
        **rule_resources("report"),
    shell:
        stage_cmd("report")

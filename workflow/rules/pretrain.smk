# Stage `pretrain` (toy only): tokenizer + tiny Llama base model, with its quality gate.
if PRETRAIN:

    rule pretrain:
        output:
            model=directory(CFG.model.path),
            gate=report(
                f"{OUT}/pretrain/gate.json",
                caption="../report/pretrain_gate.rst",
                category="Base model",
            ),
        log:
            f"{OUT}/logs/pretrain.log",
        params:
            cfg=stage_params("model", "data.corpus", "data.needle.number_digits", "seed"),
        priority: EARLY_PRIORITY
        threads: CFG.resources.pretrain.cpus
        resources:
            **rule_resources("pretrain"),
        shell:
            stage_cmd("pretrain")

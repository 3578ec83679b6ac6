# Stage `train`: mixed context window fine-tuning with the searched factors; exports the HF model.


rule train:
    input:
        model=rules.pretrain.output.model if PRETRAIN else [],
        rope_parameters=rules.search.output.rope_parameters,
        rows=rules.train_data.output.rows,
        needles=rules.needle_data.output,
    output:
        # model/ (the Hugging Face checkpoint), loss.csv, loss.png, validation.json, train.json
        directory(f"{OUT}/train/{TRAIN_VARIANT}"),
    log:
        f"{OUT}/logs/train-{TRAIN_VARIANT}.log",
    params:
        cfg=stage_params("model", "train", "target_len", "seed"),
    threads: CFG.resources.train.cpus
    resources:
        **rule_resources("train"),
    shell:
        stage_cmd("train", processes=CFG.train.processes)

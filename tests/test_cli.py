"""`longrope2 critical-dim`: human and JSON output, config.json input, errors."""

import json
import math
import subprocess
import sys

import pytest

from longrope2.cli import main

LLAMA3_ARGS = ["critical-dim", "--head-dim", "128", "--rope-base", "500000", "--train-len", "8192",
               "--target-len", "131072"]


def run(capsys, argv):
    code = main(argv)
    return code, capsys.readouterr().out


def run_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def test_human_output_llama3(capsys):
    code, out = run(capsys, LLAMA3_ARGS)
    assert code == 0
    assert "d_tcd   = 35" in out and "d10_tcd = 24" in out
    assert "search range: [24, 35]" in out
    assert "s = L / L_train = 16" in out and "= 1.1435" in out
    rows = [line.split() for line in out.splitlines() if line[:4].strip().isdigit()]
    assert len(rows) == 64
    assert rows[34][1] == "6695.1" and "L_train" not in " ".join(rows[34])  # T_34 < 8192
    assert rows[35][1] == "8218.7" and rows[35][-1] == "L_train"  # T_35 > 8192: d_tcd


def test_json_output_llama3(capsys):
    code, out = run(capsys, LLAMA3_ARGS + ["--json"])
    assert code == 0
    r = json.loads(out)
    assert (r["d_tcd"], r["d10_tcd"], r["search_range"], r["rotary_dim"]) == (35, 24, [24, 35], 128)
    assert r["extension_ratio"] == 16.0
    assert r["attention_factor"] == pytest.approx(1.1435, abs=1e-4)
    assert len(r["periods"]) == 64 and r["periods"][34] < 8192 < r["periods"][35]


def test_config_json(tmp_path, capsys):
    # Phi-4-mini style config.json: legacy keys, no head_dim, partial rotary, original window at top level
    cfg = {"model_type": "phi3", "hidden_size": 3072, "num_attention_heads": 24, "partial_rotary_factor": 0.75,
           "rope_theta": 10000.0, "max_position_embeddings": 131072, "original_max_position_embeddings": 4096}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    code, out = run(capsys, ["critical-dim", "--config", str(path), "--json"])
    r = json.loads(out)
    assert code == 0
    assert (r["rotary_dim"], r["train_len"], r["target_len"], r["d_tcd"], r["d10_tcd"]) == (96, 4096, 131072, 34, 22)
    assert r["attention_factor"] == pytest.approx(1.1902, abs=1e-4)
    # explicit options win over the config: Phi3-mini's 2k window
    code, out = run(capsys, ["critical-dim", "--config", str(path), "--train-len", "2048", "--json"])
    r = json.loads(out)
    assert (r["d_tcd"], r["d10_tcd"], r["extension_ratio"]) == (31, 19, 64.0)
    assert r["attention_factor"] == pytest.approx(1.2432, abs=1e-4)


def test_config_without_target(tmp_path, capsys):
    # LLaMA3-8B config.json: window 8192 only, so the target must be given
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"hidden_size": 4096, "num_attention_heads": 32, "max_position_embeddings": 8192,
                                "rope_theta": 500000.0}))
    err = run_error(capsys, ["critical-dim", "--config", str(path)])
    assert "--target-len" in err and "max_position_embeddings" in err
    code, out = run(capsys, ["critical-dim", "--config", str(path), "--target-len", "131072", "--json"])
    assert json.loads(out)["d_tcd"] == 35


def test_errors(tmp_path, capsys):
    err = run_error(capsys, LLAMA3_ARGS[:-1] + ["8192"])  # target == train
    assert "--target-len" in err and "greater than" in err
    err = run_error(capsys, ["critical-dim", "--head-dim", "-1", "--rope-base", "1e4", "--train-len", "2048",
                             "--target-len", "4096"])
    assert "--head-dim" in err and "positive integer" in err
    err = run_error(capsys, ["critical-dim", "--rope-base", "1e4", "--train-len", "2048", "--target-len", "4096"])
    assert "--head-dim is required" in err
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"hidden_size": 4096, "max_position_embeddings": 8192}))
    err = run_error(capsys, ["critical-dim", "--config", str(path), "--target-len", "131072"])
    assert "num_attention_heads" in err
    err = run_error(capsys, ["critical-dim", "--config", str(tmp_path / "missing.json")])
    assert "missing.json" in err


def test_module_entry_point():
    proc = subprocess.run([sys.executable, "-m", "longrope2.cli", *LLAMA3_ARGS, "--json"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["d_tcd"] == 35


FACTORS_ARGS = ["factors", "--head-dim", "128", "--rope-base", "500000", "--train-len", "8192", "--target-len", "131072"]


def test_factors_ntk_is_the_papers(capsys):
    """The issue's command: the paper's NTK for LLaMA3-8B 8k -> 128k, against the closed form s^(i / d_tcd)."""
    code, out = run(capsys, FACTORS_ARGS + ["--method", "ntk"])
    assert code == 0
    r = json.loads(out)
    c = 128 * math.log(8192 / (2 * math.pi)) / (2 * math.log(500_000))
    assert r["d_tcd_real"] == pytest.approx(c, rel=1e-12) and r["d_tcd"] == 35
    assert r["long_factor"] == pytest.approx([16.0 ** (i / c) for i in range(64)], rel=1e-12)
    assert r["long_factor"][63] == pytest.approx(147.37, abs=0.01) and r["short_factor"] == r["long_factor"]
    assert r["rope_parameters"]["rope_type"] == "default" and not r["switches"]
    aware = json.loads(run(capsys, FACTORS_ARGS + ["--method", "ntk_aware"])[1])
    assert aware["long_factor"][63] == pytest.approx(16.0, rel=1e-12)


def test_factors_rule_and_searched_methods(tmp_path, capsys):
    rule = json.loads(run(capsys, FACTORS_ARGS + ["--method", "longrope2_dtcd"])[1])
    assert rule["long_factor"][35:] == [16.0] * 29 and rule["short_factor"] == [1.0] * 64 and rule["switches"]
    err = run_error(capsys, FACTORS_ARGS + ["--method", "longrope2"])
    assert "--search-result" in err and "longrope2_dtcd" in err
    result = tmp_path / "result.json"
    tail = [16.0 + 0.1 * j for j in range(29)]
    result.write_text(json.dumps({"critical_dim": 35, "attention_factor": 1.1435,
                                  "long_factor": [tail[0] ** (i / 35) for i in range(35)] + tail}))
    r = json.loads(run(capsys, FACTORS_ARGS + ["--method", "longrope2", "--search-result", str(result)])[1])
    assert r["long_factor"][35:] == pytest.approx(tail) and r["critical_dim"] == 35
    rcd = json.loads(run(capsys, FACTORS_ARGS + ["--method", "ntk_rcd", "--search-result", str(result)])[1])
    assert rcd["long_factor"][35] == pytest.approx(16.0, rel=1e-12)  # NTK at the searched c: λ_c = s
    assert "invalid choice: 'ntk2'" in run_error(capsys, FACTORS_ARGS + ["--method", "ntk2"])

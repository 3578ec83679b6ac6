import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Nothing may reach a model or dataset hub: misses fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def load_reference() -> dict:
    """Released factor arrays (copied from the team's spec/reference_factors.yaml)."""
    import yaml

    return yaml.safe_load((Path(__file__).parent / "data" / "reference_factors.yaml").read_text())


def run_snakemake(*args: str, cwd: Path = REPO, env: dict | None = None, timeout: int = 600):
    """`python -m snakemake ARGS` with the Snakefile of this repository."""
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), *args]
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def tiny_hf_model_dir(tmp_path):
    """A config.json of a Llama with the toy's RoPE (no weights needed for critical_dim)."""
    from transformers import LlamaConfig

    path = tmp_path / "model"
    LlamaConfig(
        hidden_size=128, num_attention_heads=4, head_dim=32, num_hidden_layers=2,
        intermediate_size=256, vocab_size=512, max_position_embeddings=128,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ).save_pretrained(path)
    return path

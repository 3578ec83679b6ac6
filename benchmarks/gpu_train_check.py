"""Device check: the fine-tuning stage's GPU paths (bf16 autocast, document masks, flash varlen).

On a small random Llama with a longrope config (LLaMA3 RoPE, 8k -> 64k factors), on one CUDA
device, under accelerate-style bf16 autocast with fp32 master weights:

- a packed short row (documents <= L_train, positions restarting) through `ChunkedLossLM` with
  SDPA and the per-document mask in bf16 gives the loss of its documents run one by one, and a
  backward pass works;
- the same with `attn_implementation="flash_attention_2"` (varlen from the restarting positions,
  no mask), when the `flash_attn` package is installed;
- a long row (positions 0 ... L-1) uses the long factors: its rotary cos/sin equal our own maths.

Prints one line per check and exits non-zero on any failure. The end-to-end check of the stage
itself is the smoke DAG on the GPU machine (docs/device_checks.md).

    python benchmarks/gpu_train_check.py            # needs a CUDA device
    python benchmarks/gpu_train_check.py --cpu      # dry run of the same checks on the CPU
"""

from __future__ import annotations

import importlib.util
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from longrope2.data import rows
from longrope2.lm import losses
from longrope2.rope.hf_config import RopeFacts
from longrope2.rope.scaling import RopeScaling
from longrope2.training import mixed
from longrope2.training.step import ChunkedLossLM

FAILURES: list[str] = []
DEVICE = "cuda"  # --cpu: the same checks on the CPU (a dry run of this script; sdpa only)
L_TRAIN, L = 8192, 65536
DOCS = [3000, 8192, 1500, 4000, 7000]  # a packed short row: documents of <= L_TRAIN tokens


def check(name: str, value: float, tol: float) -> None:
    ok = value <= tol
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {value:.3g} (tol {tol:g})")
    if not ok:
        FAILURES.append(name)


def model(attn: str) -> tuple[LlamaForCausalLM, RopeScaling]:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_hidden_layers=2,
                      intermediate_size=512, vocab_size=32000, max_position_embeddings=L_TRAIN,
                      rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, attn_implementation=attn)
    lm = LlamaForCausalLM(cfg).to(DEVICE)  # fp32 master weights
    facts = RopeFacts(rope_theta=500000.0, head_dim=64, train_len=L_TRAIN)
    tail = torch.linspace(8.0, 12.0, 32 - 12)
    scaling = RopeScaling.longrope2(facts, L, tail, critical_dim=12)
    scaling.apply_to_model(lm)
    return lm, scaling


def packed_vs_alone(attn: str) -> None:
    lm, _ = model(attn)
    net = ChunkedLossLM(lm, 1024)
    lengths = DOCS
    ids = torch.randint(5, 32000, (1, sum(lengths)), device=DEVICE)
    pos = rows.document_position_ids(lengths)[None].to(DEVICE)
    doc = rows.document_ids(pos)
    labels = losses.causal_lm_labels(ids, doc)
    weights = losses.label_weights(torch.ones_like(ids, dtype=torch.float32), labels)
    mask = mixed.document_causal_mask(doc, torch.bfloat16) if attn == "sdpa" else None
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        total, count = net(ids, pos, mask, labels, weights)
        (total / count).backward()
        alone = 0.0
        with torch.no_grad():
            start = 0
            for n in lengths:
                piece = ids[:, start : start + n]
                lab = losses.causal_lm_labels(piece)
                t, _ = net(piece, torch.arange(n, device=DEVICE)[None], None, lab,
                           losses.label_weights(torch.ones_like(piece, dtype=torch.float32), lab))
                alone += float(t)
                start += n
    packed = float(total.detach())
    check(f"{attn}: packed short row loss vs its documents alone (bf16, relative)", abs(packed - alone) / alone, 2e-2)
    bad = sum(p.grad is None or not bool(torch.isfinite(p.grad).all()) for p in lm.parameters())
    check(f"{attn}: weights without a finite gradient after backward", float(bad), 0)


def long_row_frequencies() -> None:
    lm, scaling = model("sdpa")
    pos = torch.arange(L, device=DEVICE)[None]
    cos, _ = lm.model.rotary_emb(torch.zeros(1, device=DEVICE), pos)
    ours, _ = scaling.cos_sin(pos.cpu())
    check("long row: rotary cos on the GPU vs our long factors (abs)", float((cos[0].cpu() - ours[0]).abs().max()),
          2e-3)  # CUDA pow differs from the CPU's in the last bit; one ulp moves angles near 64k by ~1e-3


def main() -> None:
    global DEVICE, L_TRAIN, L, DOCS
    if "--cpu" in sys.argv:  # 8x shorter: minutes, not hours, on a CPU
        DEVICE, L_TRAIN, L, DOCS = "cpu", L_TRAIN // 8, L // 8, [n // 8 for n in DOCS]
    elif not torch.cuda.is_available():
        sys.exit("needs a CUDA device (or --cpu for a dry run)")
    print(torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", torch.__version__)
    packed_vs_alone("sdpa")
    if DEVICE == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        packed_vs_alone("flash_attention_2")
    else:
        print("skip flash_attention_2: the flash_attn package is not installed")
    long_row_frequencies()
    sys.exit(1 if FAILURES else 0)


if __name__ == "__main__":
    main()

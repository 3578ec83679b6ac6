"""Device check: RopeScaling on a CUDA model (the paper experiments' path), fp32 and bf16.

For every method, a small random Llama (LLaMA3 RoPE: head_dim 128, base 5e5, 8k -> 128k) and
a Phi3 with partial rotary (Phi-4-mini RoPE) are moved to the GPU; the scaling is applied in
place with `RopeScaling.apply_to_model` and the logits are compared with a model built fresh
from the scaled config with the same weights, below and above the original window. Also the
rotary cos/sin on the GPU against our own maths, and needle scores on the GPU against a naive
full-logits loss. Prints one line per check and exits non-zero on any failure.

    python benchmarks/gpu_rope_check.py            # needs a CUDA device
"""

from __future__ import annotations

import copy
import math
import random
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM

from longrope2.data.needles import NeedleTemplate, build_needle_sample
from longrope2.lm.losses import needle_scores
from longrope2.rope import factors as rope
from longrope2.rope.hf_config import RopeFacts
from longrope2.rope.scaling import METHODS, RopeScaling

FAILURES: list[str] = []


def check(name: str, diff: float, tol: float) -> None:
    ok = diff <= tol
    print(f"{'ok  ' if ok else 'FAIL'} {name}: max abs diff {diff:.3g} (tol {tol:g})")
    if not ok:
        FAILURES.append(name)


def scaling_for(method: str, facts: RopeFacts, target: int) -> RopeScaling:
    if method == "longrope2":
        d10, tcd = (rope.d10_critical_dim(facts.rotary_dim, facts.rope_theta, facts.train_len),
                    rope.critical_dim(facts.rotary_dim, facts.rope_theta, facts.train_len))
        c = (d10 + tcd) // 2
        s = target / facts.train_len
        tail = torch.linspace(s, 1.5 * s, facts.rotary_dim // 2 - c)
        return RopeScaling.longrope2(facts, target, tail, c)
    if method == "longrope":
        s = target / facts.train_len
        return RopeScaling.longrope(facts, target, torch.linspace(1.0, 2 * s, facts.rotary_dim // 2))
    return RopeScaling.build(method, facts, target)


def build(model_cls, cfg, dtype: torch.dtype):
    """Parameters in `dtype`, rotary buffers in fp32: what from_pretrained(dtype=...) gives."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return model_cls(cfg).to("cuda").eval()
    finally:
        torch.set_default_dtype(previous)


def model_pair(kind: str, dtype: torch.dtype):
    torch.manual_seed(0)
    if kind == "llama3":
        cfg = LlamaConfig(hidden_size=256, num_attention_heads=2, num_key_value_heads=1, head_dim=128,
                          num_hidden_layers=2, intermediate_size=512, vocab_size=1000,
                          max_position_embeddings=8192,
                          rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
        model = build(LlamaForCausalLM, cfg, dtype)
        facts = RopeFacts(rope_theta=500000.0, head_dim=128, train_len=8192)
    else:
        cfg = Phi3Config(hidden_size=256, num_attention_heads=2, num_key_value_heads=1,
                         num_hidden_layers=2, intermediate_size=512, vocab_size=1000,
                         max_position_embeddings=4096, original_max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "partial_rotary_factor": 0.75}, pad_token_id=0)
        model = build(Phi3ForCausalLM, cfg, dtype)
        facts = RopeFacts(rope_theta=10000.0, head_dim=128, train_len=4096, partial_rotary_factor=0.75)
    return model, facts


def logits_check(kind: str, dtype: torch.dtype, tol: float) -> None:
    model, facts = model_pair(kind, dtype)
    target = 131072
    lengths = (facts.train_len // 2, facts.train_len + 512)
    for method in METHODS:
        scaling = scaling_for(method, facts, target)
        scaling.apply_to_model(model)  # in place, on the GPU; twice-applied models included
        # deepcopy, not from_dict: Phi3Config's constructor refuses non-longrope types
        fresh_cfg = scaling.update_hf_config(copy.deepcopy(model.config))
        fresh = build(type(model), fresh_cfg, dtype)
        fresh.load_state_dict(model.state_dict())
        for length in lengths:
            ids = torch.randint(0, 1000, (1, length), device="cuda")
            with torch.inference_mode():
                a = model(ids).logits.float()
                b = fresh(ids).logits.float()
            check(f"{kind} {str(dtype)[6:]} {method} L={length}", float((a - b).abs().max()), tol)
        # the model's own rotary cos/sin against ours at positions beyond the window
        pos = torch.arange(facts.train_len - 8, facts.train_len + 8, device="cuda")[None]
        x = torch.zeros(1, pos.shape[1], 8, device="cuda", dtype=torch.float32)
        assert model.model.rotary_emb.inv_freq.dtype == torch.float32
        cos, sin = model.model.rotary_emb(x, pos)
        our_cos, our_sin = scaling.cos_sin(pos)
        diff = max(float((cos.float() - our_cos).abs().max()), float((sin.float() - our_sin).abs().max()))
        # transformers computes longrope's long θ lazily on the GPU, where pow may differ from
        # the CPU's by 1 ulp; at position ~8k one ulp of θ moves the angle by up to ~5e-4.
        # (On the CPU the two agree to 0; tests/test_scaling.py holds them to 1e-6.)
        check(f"{kind} cos/sin {method}", diff, 5e-4)
        del fresh


def needle_check() -> None:
    """Answer-only needle scores at 8k tokens on the GPU against a naive full-logits loss."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(300)] + list("0123456789") + ". : ? , special magic number for is One of the What mentioned in provided text A".split()
    vocab = {w: i for i, w in enumerate(dict.fromkeys(["<unk>", "<s>", *words]))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Punctuation(), pre_tokenizers.Digits(True)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", unk_token="<unk>")
    rng = random.Random(0)
    hay = [rng.randrange(2, 300) for _ in range(20000)]
    template = NeedleTemplate().shortened()
    samples = [build_needle_sample(tokenizer, hay, 8192, depth, rng, template) for depth in (0.0, 0.5, 1.0)]
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=256, num_attention_heads=2, num_key_value_heads=1,
                                         head_dim=128, num_hidden_layers=2, intermediate_size=512,
                                         vocab_size=len(tokenizer), max_position_embeddings=8192)).cuda().eval()
    t0 = time.time()
    scores = needle_scores(model, samples, batch_size=1)
    took = time.time() - t0
    nll = []
    with torch.inference_mode():
        for s in samples:
            ids = s.input_ids[None].cuda()
            logits = model(ids).logits[0, :-1].float()
            labels = ids[0, 1:].clone()
            labels[~s.answer_mask[1:].cuda()] = -100
            nll.append(float(torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100)))
    naive = math.exp(sum(nll) / len(nll))
    check(f"needle_ppl at 8192 tokens on GPU (answer-only, {took:.2f} s)", abs(scores["needle_ppl"] - naive) / naive, 1e-4)


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 2
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    for kind in ("llama3", "phi3"):
        logits_check(kind, torch.float32, 1e-4)
        logits_check(kind, torch.bfloat16, 0.0)  # same kernels, same inputs: bit-identical
    needle_check()
    print(f"{len(FAILURES)} failed" if FAILURES else "all checks passed")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())

"""Shrunk random-weight copies of published checkpoints, one per RoPE / attention layout, for conformance tests.

PUBLISHED_ARCHITECTURES holds, per checkpoint, every field of its published config.json that changes what
transformers computes for positions and attention: architecture, RoPE (theta, rotary head dim, the shipped
scaling with its type and keys, per-layer-type thetas), head_dim, the GQA ratio, qkv bias / qk-norm (both
architectural: Qwen2 always has q/k/v bias, Qwen3 always has q_norm/k_norm), windows and the layer-type
pattern, tied embeddings, logit soft-capping, MLA and MoE dims, special-token ids. The values are the
published file's, in its own spelling (e.g. DeepSeek's legacy "rope_scaling": {"type": "yarn", ...}); each
entry cites the public copy it was checked against (model weights cannot be downloaded here, the configs are
facts). Where the maker's reference file could not be read directly, a byte-for-byte duplicate or a direct
derivative whose fields agree was used, as named.

shrunk_architecture_config keeps all of those facts and shrinks layers (2), width (heads, keeping the GQA
ratio; never head_dim or the rotary dim), the FFN (128) and the vocabulary (the given tokenizer's). Every
length field (max_position_embeddings, rope_scaling's original_max_position_embeddings, sliding_window) is
scaled by train_len / PRETRAINED_WINDOW[name], so that each stands to train_len as it stands to the
checkpoint's real pretraining window.

What transformers 5.25 does with these fields (observed on save_pretrained of the shrunk copies; no warning is
logged for any of the nine published layouts): "rope_scaling" and the top-level "rope_theta" are folded into
"rope_parameters" (DeepSeek's legacy "type" is kept next to the added "rope_type"; files without scaling get
{"rope_type": "default", "rope_theta": ...}); Gemma3's "rope_theta" / "rope_local_base_freq" become
rope_parameters["full_attention"] / ["sliding_attention"] and "rope_local_base_freq" is not written back,
"sliding_window_pattern" is written both as given and as "_sliding_window_pattern", "layer_types" is written out;
Qwen2/Qwen3 write "sliding_window": null whenever "use_sliding_window" is false (Qwen2.5's inert 131072 is
dropped) and add "layer_types"; Qwen2Config has no head_dim field (derived hidden_size / heads, not written);
Mistral and Llama write the derived "head_dim"; DeepSeek-V2 writes "head_dim" = qk_rope_head_dim and
"qk_head_dim" = 192, and keeps "moe_layer_freq" / "scoring_func" as unvalidated extra attributes (its gate is
softmax top-k whatever they say). Only the Qwen3 RECOMMENDED_ROPE logs a warning (implicit factor, see there).
"""

from __future__ import annotations

import copy
from fractions import Fraction
from pathlib import Path
from typing import Any

# --- The published config.json fields, per checkpoint ---------------------------------------------------------
# Values not in the published file but derived by transformers from it are NOT listed (e.g. Llama-3.1-8B's file
# has no head_dim: 4096 / 32 = 128); class defaults the file relies on are noted in the comment.
PUBLISHED_ARCHITECTURES: dict[str, dict[str, Any]] = {
    # meta-llama/Llama-3.1-8B. Verified against huggingface.co/mlx-community/Meta-Llama-3.1-8B-bf16 (config.json,
    # a conversion of the base checkpoint, transformers 4.43.0.dev0) and huggingface.co/NbAiLab/nb-llama-3.1-8B
    # (config.json, "_name_or_path": "meta-llama/Llama-3.1-8B"): identical fields. head_dim derived = 128.
    # Pretrained window: original_max_position_embeddings 8192, the window the llama3 scaling refers to (3.1 then
    # continued pretraining to 128K with this scaling applied); max_position_embeddings 131072 is 16x it while
    # factor is 8: the two are independent fields of the file.
    "llama3.1-8b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
        "num_attention_heads": 32, "num_key_value_heads": 8, "rope_theta": 500000.0,
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "max_position_embeddings": 131072, "attention_bias": False, "tie_word_embeddings": False,
        "rms_norm_eps": 1e-05, "vocab_size": 128256, "bos_token_id": 128000, "eos_token_id": 128001,
    },
    # meta-llama/Llama-3.2-1B. Verified against huggingface.co/Emm9625/Llama-3.2-1B-chatml (config.json,
    # "Duplicate from unsloth/Llama-3.2-1B", "_name_or_path": "meta-llama/Llama-3.2-1B") and
    # huggingface.co/ariG23498/layer-skip-v0 (same fields). Ships head_dim 64 (2048 / 32) and tied embeddings.
    "llama3.2-1b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "rope_theta": 500000.0,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "max_position_embeddings": 131072, "attention_bias": False, "tie_word_embeddings": True,
        "rms_norm_eps": 1e-05, "vocab_size": 128256, "bos_token_id": 128000, "eos_token_id": 128001,
    },
    # Qwen/Qwen2.5-7B (base). max_position_embeddings 131072 for the base model (the base files were updated from
    # 32768 to 131072, max_position_embeddings and sliding_window both: e.g. Qwen/Qwen2.5-1.5B commit 8faed76
    # "Update config.json"); Qwen2.5-7B-Instruct ships 32768 (huggingface.co/osllmai-community/Qwen2.5-7B-Instruct,
    # huggingface.co/XelotX/Qwen2.5-72B-Instruct-Original "Duplicate from Qwen/Qwen2.5-72B-Instruct": 32768 with
    # sliding_window 131072). Base fields verified against huggingface.co/ksh1119/qwen2.5_7b_kor_cp_it,
    # huggingface.co/nectec/OpenThaiLLM-Prebuilt-7B ("_name_or_path" .../Qwen2.5-7B) and the Qwen2-7B file it
    # inherits (huggingface.co/Qwen/Qwen2-7B/blob/main/config.json: sliding_window 131072, use_sliding_window false,
    # max_window_layers 28); the derivatives re-saved by transformers show "sliding_window": null (see module doc).
    # No head_dim in the file: 3584 / 28 = 128. q/k/v bias is built into Qwen2Attention (no config field).
    # True pretrained window: 32768 (Qwen2.5 report: final pretraining stage at 32,768 tokens; 128K via YaRN).
    "qwen2.5-7b": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584,
        "num_attention_heads": 28, "num_key_value_heads": 4, "rope_theta": 1000000.0,
        "max_position_embeddings": 131072, "sliding_window": 131072, "use_sliding_window": False,
        "max_window_layers": 28, "num_hidden_layers": 28, "tie_word_embeddings": False, "rms_norm_eps": 1e-06,
        "vocab_size": 152064, "bos_token_id": 151643, "eos_token_id": 151643,
    },
    # Qwen/Qwen3-8B. Verified against huggingface.co/thejaminator/qwen-hook-layer-9 commit 478fb72
    # ("Copy config.json from Qwen/Qwen3-8B", transformers 4.51.0). qk-norm (q_norm/k_norm) is built into
    # Qwen3Attention. True pretrained window 32768 (model card: "Qwen3 natively supports context lengths of up to
    # 32,768 tokens"); max_position_embeddings 40960 = 32768 + 8192 reserved for generation.
    "qwen3-8b": {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 4096,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "rope_theta": 1000000,
        "rope_scaling": None, "max_position_embeddings": 40960, "sliding_window": None,
        "use_sliding_window": False, "max_window_layers": 36, "num_hidden_layers": 36, "attention_bias": False,
        "tie_word_embeddings": False, "rms_norm_eps": 1e-06,
        "vocab_size": 151936, "bos_token_id": 151643, "eos_token_id": 151645,
    },
    # mistralai/Mistral-7B-v0.1. Verified against huggingface.co/bartowski/OpenOrca-Zephyr-7B-exl2 config.json
    # ("_name_or_path": .../models--mistralai--Mistral-7B-v0.1/snapshots/1fb9932...) and
    # huggingface.co/dmayboroda/42_mistral_0.1. No head_dim in the file: 4096 / 32 = 128.
    # True pretrained window: 8192 (arXiv 2310.06825 Table 1: window_size 4096, context_len 8192), not the 32768
    # of max_position_embeddings.
    "mistral-7b-v0.1": {
        "architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 4096,
        "num_attention_heads": 32, "num_key_value_heads": 8, "rope_theta": 10000.0,
        "max_position_embeddings": 32768, "sliding_window": 4096, "tie_word_embeddings": False,
        "rms_norm_eps": 1e-05, "vocab_size": 32000, "bos_token_id": 1, "eos_token_id": 2,
    },
    # mistralai/Mistral-7B-v0.3. Verified against huggingface.co/unsloth/mistral-7b-v0.3 (config.json,
    # "_name_or_path": "mistralai/Mistral-7B-v0.3", transformers 4.41.0) and pathlighter/Mistral-7B-v0.3-EoT.
    # Pretrained window 32768 (Mistral-7B-v0.2 card, which v0.3 extends with a larger vocabulary: "32k context
    # window (vs 8k context in v0.1), Rope-theta = 1e6, No Sliding-Window Attention").
    "mistral-7b-v0.3": {
        "architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 4096,
        "num_attention_heads": 32, "num_key_value_heads": 8, "rope_theta": 1000000.0,
        "max_position_embeddings": 32768, "sliding_window": None, "tie_word_embeddings": False,
        "rms_norm_eps": 1e-05, "vocab_size": 32768, "bos_token_id": 1, "eos_token_id": 2,
    },
    # google/gemma-3-1b-pt. Verified against huggingface.co/MatanBT/mia-target-model (config.json of a gemma-3-1b
    # derivative: 1152 / 26 layers / 4 heads / 1 KV head / head_dim 256, query_pre_attn_scalar 256,
    # rope_local_base_freq 10000, rope_theta 1000000, max_position_embeddings 32768), a TensorRT-LLM unit test's
    # GEMMA3_1B_CONFIG copy (transformers 4.50.0.dev0; the release file's keys incl. "sliding_window_pattern": 6,
    # window shrunk for the test) and a test fixture's "gemma-3-1b-pt" payload (sliding_window 512; the 270m
    # files, e.g. huggingface.co/Codingstark/gemma3-270m-leetcode, also 512). Repository paths of the two code
    # copies were not shown by the index. No tie_word_embeddings in the file: Gemma3TextConfig's default True.
    # Pretrained window 32768 (Gemma 3 report: 32K pretraining; only 4B+ were extended to 128K, with linear
    # RoPE scaling factor 8 on the global layers; the 1B ships no scaling).
    "gemma3-1b": {
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "hidden_size": 1152,
        "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256, "query_pre_attn_scalar": 256,
        "rope_theta": 1000000, "rope_local_base_freq": 10000, "rope_scaling": None,
        "max_position_embeddings": 32768, "sliding_window": 512, "sliding_window_pattern": 6,
        "num_hidden_layers": 26, "attn_logit_softcapping": None, "final_logit_softcapping": None,
        "attention_bias": False, "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-06,
        "vocab_size": 262144, "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0,
    },
    # google/gemma-2-2b. Verified against huggingface.co/kemura/gemma-2b-sql-finetuned (config.json,
    # "_name_or_path": "google/gemma-2-2b") and huggingface.co/sfairXC/gemma-sft-1ep (same fields), plus rinna's
    # litgpt card for gemma-2-2b (sliding_window_layer_placing 2, i.e. every other layer local). One RoPE
    # (theta 10000) for local and global layers; no layer_types in the file: Gemma2Config alternates
    # sliding/full starting with sliding. No tie_word_embeddings in the file: default True.
    # Pretrained window 8192 = max_position_embeddings.
    "gemma2-2b": {
        "architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "hidden_size": 2304,
        "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "query_pre_attn_scalar": 256,
        "rope_theta": 10000.0, "max_position_embeddings": 8192, "sliding_window": 4096,
        "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "attention_bias": False,
        "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-06,
        "vocab_size": 256000, "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0,
    },
    # deepseek-ai/DeepSeek-V2-Lite. Verified against huggingface.co/ModelCloud/DeepSeek-V2-Lite-gptq-4bit
    # (config.json, "_name_or_path": "/model/DeepSeek-V2-Lite/") for the architecture fields and against
    # huggingface.co/deepseek-ai/DeepSeek-Coder-V2-Lite-Base/blame/main/config.json and
    # huggingface.co/TechxGenus/DeepSeek-V2-Lite-Chat-AWQ (same Lite architecture) for the rope_scaling block.
    # Legacy spelling kept: "type" (no "rope_type"). MLA: q_lora_rank null (plain q_proj), kv_lora_rank 512,
    # rotary part of each q/k head 64 (qk_rope_head_dim), non-rotary 128. Pretrained window 4096
    # (original_max_position_embeddings; 163840 = 4096 * 40). The model card lists a 32k context.
    "deepseek-v2-lite": {
        "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "hidden_size": 2048,
        "num_attention_heads": 16, "num_key_value_heads": 16, "q_lora_rank": None, "kv_lora_rank": 512,
        "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "rope_theta": 10000,
        "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                         "original_max_position_embeddings": 4096, "type": "yarn"},
        "max_position_embeddings": 163840, "attention_bias": False, "tie_word_embeddings": False,
        "first_k_dense_replace": 1, "moe_layer_freq": 1, "n_routed_experts": 64, "n_shared_experts": 2,
        "num_experts_per_tok": 6, "moe_intermediate_size": 1408, "n_group": 1, "topk_group": 1,
        "topk_method": "greedy", "norm_topk_prob": False, "routed_scaling_factor": 1.0, "scoring_func": "softmax",
        "num_hidden_layers": 27, "rms_norm_eps": 1e-06,
        "vocab_size": 102400, "bos_token_id": 100000, "eos_token_id": 100001,
    },
}

# The window the checkpoint was pretrained at: every length field is scaled by train_len / this.
PRETRAINED_WINDOW: dict[str, int] = {
    "llama3.1-8b": 8192, "llama3.2-1b": 8192,  # rope_scaling's original_max_position_embeddings
    "qwen2.5-7b": 32768,  # not max_position_embeddings (131072): 32K pretraining, 128K with YaRN
    "qwen3-8b": 32768,  # not max_position_embeddings (40960 = 32768 + 8192 generation budget)
    "mistral-7b-v0.1": 8192,  # not max_position_embeddings (32768): paper Table 1 context_len 8192
    "mistral-7b-v0.3": 32768,
    "gemma3-1b": 32768,  # sliding_window 512 -> train_len / 64: a 1-token window at train_len 64, 32 at 2048
    "gemma2-2b": 8192,
    "deepseek-v2-lite": 4096,  # rope_scaling's original_max_position_embeddings
}

# The maker's recommended long-context setting where the model card gives one and config.json does not ship it:
# fields to merge into the published config (lengths at paper scale; shrunk_architecture_config scales them).
RECOMMENDED_ROPE: dict[str, dict[str, Any]] = {
    # Qwen2.5 model cards, "Processing Long Texts" (Qwen/Qwen2.5-7B-Instruct and the other Qwen2.5 Instruct /
    # Coder cards; the base card only states "Context Length: 131,072 tokens"): "The current config.json is set
    # for context length up to 32,768 tokens. To handle extensive inputs exceeding 32,768 tokens, we utilize YaRN
    # ... add the following to config.json", legacy key "type". Static YaRN: the card advises adding it only
    # when long inputs are needed. With the base file's max_position_embeddings 131072 the factor agrees.
    "qwen2.5-7b": {"rope_scaling": {"factor": 4.0, "original_max_position_embeddings": 32768, "type": "yarn"}},
    # Qwen3-8B model card, "Processing Long Texts": YaRN for up to 131,072 tokens, "rope_type" spelling. The card
    # leaves max_position_embeddings at 40960, so transformers 5.25 warns that the implicit factor
    # 40960 / 32768 = 1.25 differs from factor 4.0 (it uses 4.0).
    "qwen3-8b": {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}},
}

LENGTH_KEYS = ("max_position_embeddings", "sliding_window")
SHRUNK_LAYERS, SHRUNK_FFN = 2, 128


def _scaled(value: int, scale: Fraction) -> int:
    return max(1, int(value * scale))


def rotary_dim(name: str) -> int:
    """The rotated part of each query/key head in the published checkpoint."""
    pub = PUBLISHED_ARCHITECTURES[name]
    if "qk_rope_head_dim" in pub:
        return pub["qk_rope_head_dim"]
    head_dim = pub.get("head_dim") or pub["hidden_size"] // pub["num_attention_heads"]
    return int(head_dim * pub.get("partial_rotary_factor", 1.0))


def shrunk_architecture_fields(name: str, train_len: int, tokenizer: Any, recommended: bool = False) -> dict[str, Any]:
    """The keyword arguments for AutoConfig.for_model: the published fields (with RECOMMENDED_ROPE[name] merged
    in when ``recommended``), shrunk (see module doc)."""
    pub = PUBLISHED_ARCHITECTURES[name]
    model_type = pub["model_type"]
    scale = Fraction(train_len, PRETRAINED_WINDOW[name])
    fields = copy.deepcopy({k: v for k, v in pub.items() if k not in ("architectures", "model_type")})
    if recommended:
        fields.update(copy.deepcopy(RECOMMENDED_ROPE[name]))

    ratio = pub["num_attention_heads"] // pub["num_key_value_heads"]
    heads = max(ratio, 2)
    head_dim = pub.get("head_dim") or pub["hidden_size"] // pub["num_attention_heads"]
    # A file without head_dim derives it from hidden_size / heads: keep that derivation true.
    hidden = 64 if ("head_dim" in pub or "qk_rope_head_dim" in pub) else heads * head_dim
    fields.update(num_hidden_layers=SHRUNK_LAYERS, num_attention_heads=heads, num_key_value_heads=heads // ratio,
                  hidden_size=hidden, intermediate_size=SHRUNK_FFN)

    for key in LENGTH_KEYS:
        if fields.get(key) is not None:
            fields[key] = _scaled(fields[key], scale)
    if fields.get("rope_scaling") and "original_max_position_embeddings" in fields["rope_scaling"]:
        fields["rope_scaling"]["original_max_position_embeddings"] = _scaled(
            fields["rope_scaling"]["original_max_position_embeddings"], scale)
    if "max_window_layers" in fields:  # published == num_hidden_layers: no layer would ever slide
        fields["max_window_layers"] = SHRUNK_LAYERS
    if model_type in ("gemma3_text", "gemma2"):  # both kinds of layer, local first, as published
        fields["layer_types"] = ["sliding_attention", "full_attention"]
        if "sliding_window_pattern" in fields:
            fields["sliding_window_pattern"] = 2  # the BC int agrees with layer_types
    if model_type == "deepseek_v2":  # one dense and one MoE layer
        fields.update(kv_lora_rank=32, first_k_dense_replace=1, n_routed_experts=4, num_experts_per_tok=2,
                      n_shared_experts=1, moe_intermediate_size=32)

    fields.update(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return fields


def shrunk_architecture_config(name: str, train_len: int, tokenizer: Any, recommended: bool = False) -> Any:
    """The checkpoint's config, shrunk, as a transformers config object."""
    from transformers import AutoConfig

    pub = PUBLISHED_ARCHITECTURES[name]
    fields = shrunk_architecture_fields(name, train_len, tokenizer, recommended)
    config = AutoConfig.for_model(pub["model_type"], **fields)
    config.architectures = list(pub["architectures"])
    return config


def write_shrunk_architecture(name: str, folder: Path, train_len: int, tokenizer: Any,
                              recommended: bool = False) -> Path:
    """A random-weight checkpoint of the shrunk architecture, with its tokenizer, as from_pretrained reads it."""
    import torch
    from transformers import AutoModelForCausalLM

    config = shrunk_architecture_config(name, train_len, tokenizer, recommended)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(folder)

"""Phi-3's sliding window (config `sliding_window: 2047`) must not hide a needle at the start of a
sample longer than it: every stage loads the model with the window lifted to cover target_len."""

from __future__ import annotations

import json

import pytest
import torch

from longrope2 import evaluate
from longrope2.core.config import compose_config
from longrope2.lm.loading import lift_attention_window, load_base_model, load_causal_lm

WINDOW, TRAIN_LEN, TARGET_LEN = 48, 64, 256


@pytest.fixture(scope="module")
def phi3_dir(tmp_path_factory, toy_model_dir):
    """A shrunk random-weight Phi-3 (Phi-3-mini-4k's fields that matter here: Phi3ForCausalLM, theta 10 000,
    full rotary, a sliding window below the target length), with the toy tokenizer."""
    from transformers import AutoTokenizer, Phi3Config, Phi3ForCausalLM

    tok = AutoTokenizer.from_pretrained(toy_model_dir)
    config = Phi3Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=TRAIN_LEN,
                        original_max_position_embeddings=TRAIN_LEN, rope_theta=10000.0, sliding_window=WINDOW,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                        tie_word_embeddings=False)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("phi3") / "model"
    Phi3ForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    assert json.loads((path / "config.json").read_text())["sliding_window"] == WINDOW
    return path


def _start_is_visible(model) -> bool:
    """Does the last position's output depend on the first tokens of a TARGET_LEN row?"""
    ids = torch.randint(3, 200, (1, TARGET_LEN), generator=torch.Generator().manual_seed(0))
    other = ids.clone()
    other[0, 1:9] = (other[0, 1:9] + 7) % 200 + 3  # a different "needle" at depth 0
    with torch.no_grad():
        a = model(input_ids=ids).logits[0, -1]
        b = model(input_ids=other).logits[0, -1]
    return not torch.equal(a, b)


def test_lift_attention_window_only_below_target_len():
    from transformers import Phi3Config

    short, long = Phi3Config(sliding_window=2047), Phi3Config(sliding_window=262144)
    assert lift_attention_window(short, 131072) == "sliding_window 2047 -> null (full attention; " \
                                                          "target_len = 131072)"
    assert short.sliding_window is None
    assert lift_attention_window(long, 131072) is None and long.sliding_window == 262144
    assert lift_attention_window(Phi3Config(sliding_window=None), 131072) is None


def test_the_window_hides_the_start_unless_lifted(phi3_dir):
    # what transformers does with the checkpoint as it is: the first tokens are invisible at the end
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(phi3_dir, dtype=torch.float32).eval()
    assert not _start_is_visible(plain)
    lifted = load_causal_lm(str(phi3_dir), TARGET_LEN, dtype=torch.float32).eval()
    assert lifted.config.sliding_window is None and _start_is_visible(lifted)


def test_search_train_and_evaluate_load_the_model_with_the_window_lifted(phi3_dir, tmp_path):
    # model.head_dim=null: read from the tiny checkpoint (the preset declares Phi-3-mini's 96)
    cfg = compose_config(["experiment=phi3_mini_128k", f"model.path={phi3_dir}", f"model.train_len={TRAIN_LEN}",
                          "model.head_dim=null", f"target_len={TARGET_LEN}", f"out_dir={tmp_path}",
                          "tracking.enabled=false"])
    model, facts = load_base_model(cfg, torch.float32, torch.device("cpu"), "sdpa")  # as the search loads it
    assert model.config.sliding_window is None and facts.train_len == TRAIN_LEN
    assert _start_is_visible(model)  # under the search's own (original) RoPE
    model, _ = load_base_model(cfg, torch.float32, attn_implementation="sdpa")  # as train loads it
    assert model.config.sliding_window is None and _start_is_visible(model.eval())
    # the fine-tuned model is exported from this config: the window stays lifted in its config.json
    model.save_pretrained(tmp_path / "exported")
    assert json.loads((tmp_path / "exported" / "config.json").read_text())["sliding_window"] is None
    model, _ = evaluate.load_model(cfg, str(phi3_dir))
    assert model.config.sliding_window is None and _start_is_visible(model)

"""RopeScaling against transformers 5: cos/sin, rope_parameters, configs, in-place re-scaling."""

import dataclasses
import math

import pytest
import torch
from conftest import load_reference
from numerics import FLOAT32_REL, assert_close_to_scale
from transformers import LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

from longrope2.rope import factors as rope
from longrope2.rope.hf_config import RopeConfigError, RopeFacts, rope_facts_from_hf_config
from longrope2.rope.scaling import METHODS, RopeScaling


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: thread hand-offs cost more than the maths (and stall on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


LLAMA3 = RopeFacts(rope_theta=500_000.0, head_dim=128, train_len=8192)
PHI4 = RopeFacts(rope_theta=10_000.0, head_dim=128, partial_rotary_factor=0.75, train_len=4096)
TARGET = 131072


def scaling_for(method: str, facts: RopeFacts, ref_key: str, target: int = TARGET) -> RopeScaling:
    ref = load_reference()[ref_key]
    if method == "longrope":
        return RopeScaling.longrope(facts, target, ref["long_factor"])
    if method == "longrope2":
        c = ref["critical_dim"]
        return RopeScaling.longrope2(facts, target, ref["long_factor"][c:], critical_dim=c)
    return RopeScaling.build(method, facts, target)


def llama_config(facts: RopeFacts, **kw) -> LlamaConfig:
    return LlamaConfig(vocab_size=97, hidden_size=2 * facts.head_dim, head_dim=facts.head_dim, num_attention_heads=2,
                       num_key_value_heads=1, intermediate_size=64, num_hidden_layers=kw.pop("layers", 1),
                       max_position_embeddings=facts.train_len,
                       rope_parameters={"rope_type": "default", "rope_theta": facts.rope_theta}, **kw)


def phi3_config(facts: RopeFacts, **kw) -> Phi3Config:
    # Phi3 has no head_dim field: head_dim = hidden_size // num_attention_heads
    return Phi3Config(vocab_size=97, hidden_size=2 * facts.head_dim, num_attention_heads=2, num_key_value_heads=1,
                      intermediate_size=64, num_hidden_layers=kw.pop("layers", 1),
                      max_position_embeddings=facts.train_len, original_max_position_embeddings=facts.train_len,
                      rope_parameters={"rope_type": "default", "rope_theta": facts.rope_theta,
                                       "partial_rotary_factor": facts.partial_rotary_factor},
                      pad_token_id=0, bos_token_id=1, eos_token_id=2, **kw)


def positions(train_len: int, target_len: int) -> list[torch.Tensor]:
    below = torch.arange(0, train_len, 7)[None]  # max + 1 <= train_len: short path
    above = torch.cat([torch.arange(0, target_len, 97), torch.tensor([train_len, target_len - 1])])[None]
    return [below, above]


# ---- cos/sin equal transformers' own rotary embedding ----

@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ["llama", "phi3"])
@pytest.mark.parametrize("target", [TARGET, 100_000])  # s a power of two, and not: float32 rounding differs
def test_cos_sin_match_transformers(arch, method, target):
    facts, ref_key, make_cfg, emb_cls = {
        "llama": (LLAMA3, "llama3_8b_reference", llama_config, LlamaRotaryEmbedding),
        "phi3": (PHI4, "phi4_mini_instruct", phi3_config, Phi3RotaryEmbedding),
    }[arch]
    scaling = scaling_for(method, facts, ref_key, target)
    cfg = scaling.update_hf_config(make_cfg(facts))
    emb = emb_cls(cfg)
    assert emb.attention_scaling == pytest.approx(scaling.attention_factor, rel=1e-12)
    x = torch.zeros(1)
    for pos in positions(facts.train_len, target):
        cos_t, sin_t = emb(x, pos)  # mutates emb's cache on the long path: fine, compared call by call
        cos, sin = scaling.cos_sin(pos)
        assert cos.shape == cos_t.shape == (1, pos.shape[1], scaling.rotary_dim)
        assert (cos - cos_t).abs().max() <= 1e-6
        assert (sin - sin_t).abs().max() <= 1e-6


def test_phi4_mini_long_path_really_differs_from_short():
    scaling = scaling_for("longrope", PHI4, "phi4_mini_instruct")
    pos = torch.arange(4090, 4097)[None]  # crosses the window: long path
    cos_long, _ = scaling.cos_sin(pos)
    cos_short, _ = scaling.cos_sin(pos[:, :-1])  # max + 1 = 4096: short path
    assert (cos_long[:, :-1] - cos_short).abs().max() > 1e-2
    assert scaling.attention_factor == pytest.approx(1.1902, abs=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_long_factor_describes_the_frequencies(method):
    # whatever arithmetic a method uses, θ / long_factor is what it computes
    scaling = scaling_for(method, LLAMA3, "llama3_8b_reference")
    expected = rope.inv_freq(scaling.rotary_dim, scaling.rope_theta).double() / torch.tensor(scaling.long_factor)
    torch.testing.assert_close(scaling.long_inv_freq().double(), expected, rtol=2e-6, atol=0)
    if not scaling.switches:  # static methods: same frequencies at every length
        assert torch.equal(scaling.short_inv_freq(), scaling.long_inv_freq())
        assert scaling.short_factor == scaling.long_factor
    else:
        assert torch.equal(scaling.short_inv_freq(), rope.inv_freq(scaling.rotary_dim, scaling.rope_theta))


def test_switch_rule_boundary():
    scaling = scaling_for("longrope2", PHI4, "phi4_mini_instruct")
    assert not scaling.uses_long(torch.tensor([[0, 4095]]))
    assert scaling.uses_long(torch.tensor([[0, 4096]]))
    assert torch.equal(scaling.inv_freq_for(torch.arange(4096)), scaling.short_inv_freq())
    assert torch.equal(scaling.inv_freq_for(torch.arange(4097)), scaling.long_inv_freq())


# ---- the representation ----

def test_rope_parameters_per_method():
    s = 16.0
    p = {m: scaling_for(m, LLAMA3, "llama3_8b_reference").to_rope_parameters() for m in METHODS}
    assert p["none"] == {"rope_type": "default", "rope_theta": 500_000.0, "partial_rotary_factor": 1.0}
    assert p["pi"]["rope_type"] == "linear" and p["pi"]["factor"] == s
    assert p["ntk"]["rope_type"] == "default"
    c = 128 * math.log(8192 / (2 * math.pi)) / (2 * math.log(500_000))  # the real d_tcd (the paper's NTK)
    assert p["ntk"]["rope_theta"] == pytest.approx(500_000 * s ** (128 / (2 * c)))
    assert p["ntk_aware"] == {"rope_type": "default", "rope_theta": pytest.approx(500_000 * s ** (128 / 126)),
                              "partial_rotary_factor": 1.0}
    assert p["yarn"]["rope_type"] == "yarn"
    assert (p["yarn"]["factor"], p["yarn"]["beta_fast"], p["yarn"]["beta_slow"]) == (s, 32.0, 1.0)
    assert p["yarn"]["original_max_position_embeddings"] == 8192
    assert p["yarn"]["attention_factor"] == pytest.approx(0.1 * math.log(16) + 1)
    for m in ("longrope", "longrope2"):
        assert p[m]["rope_type"] == "longrope" and p[m]["original_max_position_embeddings"] == 8192
        assert p[m]["short_factor"] == [1.0] * 64 and len(p[m]["long_factor"]) == 64
        assert p[m]["attention_factor"] == pytest.approx(1.1435, abs=1e-4)
    assert p["longrope"]["long_factor"] == pytest.approx(p["longrope2"]["long_factor"], abs=1e-8)


def test_attention_factor_override_and_frozen():
    ref = load_reference()["phi4_mini_instruct"]
    sc = RopeScaling.longrope2(PHI4, TARGET, ref["long_factor"][31:], critical_dim=31, attention_factor=1.0)
    assert sc.attention_factor == 1.0 and sc.critical_dim == 31 and sc.s == 32.0
    cos, _ = sc.cos_sin(torch.tensor([[0]]))
    assert torch.all(cos == 1.0)  # position 0, no temperature
    with pytest.raises(dataclasses.FrozenInstanceError):
        sc.target_len = 2  # type: ignore[misc]


def test_validation():
    with pytest.raises(ValueError):
        RopeScaling.longrope(PHI4, TARGET, [1.0] * 47)  # D = 48
    with pytest.raises(ValueError):
        RopeScaling.pi(PHI4, 2048)  # target < train
    with pytest.raises(ValueError):
        RopeScaling.build("llama3", PHI4, TARGET)  # type: ignore[arg-type]


def test_update_config_dict_drops_legacy_keys():
    d = {"hidden_size": 64, "num_attention_heads": 2, "max_position_embeddings": 32, "rope_theta": 500.0,
         "rope_scaling": {"type": "linear", "factor": 2.0}, "original_max_position_embeddings": 32}
    sc = RopeScaling.ntk(RopeFacts(rope_theta=500.0, head_dim=32, train_len=32), 96)
    sc.update_hf_config(d)
    assert "rope_scaling" not in d and "rope_theta" not in d
    assert d["max_position_embeddings"] == 96 and d["original_max_position_embeddings"] == 32
    assert d["rope_parameters"] == sc.to_rope_parameters()


# ---- reading a config's RoPE facts ----

def test_facts_from_configs():
    f = rope_facts_from_hf_config(llama_config(LLAMA3))
    assert (f.rope_theta, f.head_dim, f.partial_rotary_factor, f.train_len) == (500_000.0, 128, 1.0, 8192)
    f = rope_facts_from_hf_config(phi3_config(PHI4))
    assert (f.rope_theta, f.head_dim, f.partial_rotary_factor, f.train_len, f.rotary_dim) == (1e4, 128, 0.75, 4096, 96)
    # Phi-4-mini's config.json: legacy layout, no head_dim, original window at top level
    phi4_json = {"hidden_size": 3072, "num_attention_heads": 24, "partial_rotary_factor": 0.75, "rope_theta": 10000.0,
                 "max_position_embeddings": 131072, "original_max_position_embeddings": 4096,
                 "rope_scaling": {"type": "longrope", "long_factor": [1.0] * 48, "short_factor": [1.0] * 48}}
    f = rope_facts_from_hf_config(phi4_json)
    assert (f.head_dim, f.rotary_dim, f.train_len, f.max_position_embeddings, f.rope_type) == (
        128, 96, 4096, 131072, "longrope")
    # Llama-3.1 style: original window inside rope_scaling
    f = rope_facts_from_hf_config({"hidden_size": 4096, "num_attention_heads": 32, "max_position_embeddings": 131072,
                                   "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                                   "original_max_position_embeddings": 8192}})
    assert (f.train_len, f.rope_theta, f.rope_type) == (8192, 500000.0, "llama3")
    # v5 layout
    f = rope_facts_from_hf_config({"head_dim": 64, "max_position_embeddings": 2048,
                                   "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}})
    assert (f.head_dim, f.rope_theta, f.train_len) == (64, 1e6, 2048)


def test_facts_missing_keys():
    with pytest.raises(RopeConfigError, match="num_attention_heads"):
        rope_facts_from_hf_config({"hidden_size": 64, "max_position_embeddings": 32})
    with pytest.raises(RopeConfigError, match="max_position_embeddings"):
        rope_facts_from_hf_config({"head_dim": 64})
    with pytest.raises(RopeConfigError, match="head_dim"):
        rope_facts_from_hf_config({"head_dim": 0, "max_position_embeddings": 32})


# ---- re-scaling a loaded model in place ----

TINY = RopeFacts(rope_theta=500.0, head_dim=32, train_len=32)
TINY_PHI = RopeFacts(rope_theta=500.0, head_dim=32, partial_rotary_factor=0.5, train_len=32)
TINY_TARGET = 96  # s = 3


def tiny_scaling(method: str, facts: RopeFacts, tail_scale: float = 1.0) -> RopeScaling:
    n = facts.rotary_dim // 2
    c = rope.critical_dim(facts.rotary_dim, facts.rope_theta, facts.train_len)
    s = TINY_TARGET / facts.train_len
    tail = [min(2 * s, tail_scale * s + 0.05 * j) for j in range(n - c)]  # in [s, 2s], increasing
    if method == "longrope2":
        return RopeScaling.longrope2(facts, TINY_TARGET, tail, critical_dim=c)
    if method == "longrope":
        return RopeScaling.longrope(facts, TINY_TARGET, rope.ntk_aware_factors(facts.rotary_dim, s * 1.5))
    return RopeScaling.build(method, facts, TINY_TARGET)


def tiny_model(arch: str):
    torch.manual_seed(0)
    if arch == "llama":
        cfg = llama_config(TINY, layers=2)
        return LlamaForCausalLM(cfg).eval(), cfg.to_dict()
    cfg = phi3_config(TINY_PHI, layers=2)
    return Phi3ForCausalLM(cfg).eval(), cfg.to_dict()


def fresh_model(model, base_cfg: dict, scaling: RopeScaling):
    """The reference: a model built from the scaled config.json, loaded with the same weights."""
    cfg = type(model.config).from_dict(scaling.update_hf_config(dict(base_cfg)))
    fresh = type(model)(cfg).eval()
    fresh.load_state_dict(model.state_dict())
    return fresh


@torch.no_grad()
def logits(model, n: int) -> torch.Tensor:
    ids = torch.arange(n)[None] % 97
    return model(input_ids=ids).logits


def assert_same_as_fresh(model, base_cfg, scaling, lengths=(24, 32, 90)):
    fresh = fresh_model(model, base_cfg, scaling)
    for n in lengths:  # below, at and above the 32-token window
        assert_close_to_scale(logits(model, n), logits(fresh, n), FLOAT32_REL, f"logits at {n} tokens")


@pytest.mark.parametrize("arch,method", [("llama", m) for m in METHODS]
                         + [("phi3", m) for m in ("none", "ntk", "longrope", "longrope2")])
def test_apply_to_model_equals_fresh_model(arch, method, torch_threads):
    model, base_cfg = tiny_model(arch)
    before = logits(model, 90)
    scaling = tiny_scaling(method, TINY if arch == "llama" else TINY_PHI)
    assert scaling.apply_to_model(model) is model
    assert model.config.max_position_embeddings == TINY_TARGET
    assert_same_as_fresh(model, base_cfg, scaling)
    if method != "none":
        assert (logits(model, 90) - before).abs().max() > 1e-4  # the scaling did change the model


def test_apply_to_model_rotary_matches_own_cos_sin():
    model, _ = tiny_model("phi3")
    scaling = tiny_scaling("longrope2", TINY_PHI)
    scaling.apply_to_model(model)
    for pos in (torch.arange(20)[None], torch.arange(90)[None]):
        cos_t, sin_t = model.model.rotary_emb(torch.zeros(1), pos)
        cos, sin = scaling.cos_sin(pos)
        assert cos.shape[-1] == 16  # partial rotary: 0.5 * 32
        assert (cos - cos_t).abs().max() <= 1e-6 and (sin - sin_t).abs().max() <= 1e-6


def test_phi3_top_level_original_window_is_overridden():
    # Phi3 keeps original_max_position_embeddings at the top of its config, and transformers lets that
    # copy overwrite rope_parameters'. E.g. the paper extends Phi3-mini from 2k, its config says 4k.
    torch.manual_seed(0)
    cfg = phi3_config(dataclasses.replace(TINY_PHI, train_len=64), layers=1)
    model = Phi3ForCausalLM(cfg).eval()
    scaling = tiny_scaling("longrope2", TINY_PHI)  # L_train = 32
    scaling.apply_to_model(model)
    model.config.standardize_rope_params()
    assert model.config.rope_parameters["original_max_position_embeddings"] == 32
    pos = torch.arange(40)[None]  # long for L_train 32, would be short for 64
    cos_t, _ = model.model.rotary_emb(torch.zeros(1), pos)
    assert (scaling.cos_sin(pos)[0] - cos_t).abs().max() <= 1e-6


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_switching_scalings_leaves_no_stale_cache(arch):
    model, base_cfg = tiny_model(arch)
    facts = TINY if arch == "llama" else TINY_PHI
    first, second = tiny_scaling("longrope2", facts, 1.0), tiny_scaling("longrope2", facts, 1.6)
    assert first.long_factor != second.long_factor

    first.apply_to_model(model)
    long_first = logits(model, 90)  # caches transformers' long_inv_freq on the rotary module
    assert getattr(model.model.rotary_emb, "long_inv_freq", None) is not None

    second.apply_to_model(model)
    assert getattr(model.model.rotary_emb, "long_inv_freq", None) is None
    assert (logits(model, 90) - long_first).abs().max() > 1e-4
    assert_same_as_fresh(model, base_cfg, second)

    third = tiny_scaling("ntk", facts)  # and away from longrope altogether
    third.apply_to_model(model)
    assert_same_as_fresh(model, base_cfg, third)


def test_apply_to_model_rejects_wrong_head_dim():
    model, _ = tiny_model("llama")
    wrong = RopeScaling.ntk(RopeFacts(rope_theta=500.0, head_dim=64, train_len=32), TINY_TARGET)
    with pytest.raises(RuntimeError, match="inverse frequencies"):
        wrong.apply_to_model(model)


@pytest.mark.parametrize("head_dim,base,train,target", [
    (128, 500_000.0, 8192, 131072),
    (96, 10_000.0, 4096, 100_000),
    (16, 10.0, 4096, 16384),  # every pair turns > once: the ramp's top is clipped at d-1
    (32, 1e9, 64, 200),  # every pair turns < 32 times: the ramp starts at 0
])
def test_yarn_matches_transformers(head_dim, base, train, target):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    facts = RopeFacts(rope_theta=base, head_dim=head_dim, train_len=train)
    scaling = RopeScaling.yarn(facts, target)
    cfg = scaling.update_hf_config(llama_config(facts))
    inv_t, attn_t = ROPE_INIT_FUNCTIONS["yarn"](cfg)
    assert torch.equal(scaling.long_inv_freq(), inv_t)
    assert scaling.attention_factor == attn_t
    torch.testing.assert_close(rope.inv_freq(head_dim, base).double() / torch.tensor(scaling.long_factor),
                               inv_t.double(), rtol=2e-6, atol=0)

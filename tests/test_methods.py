"""The method registry: which search each method needs, and each method's scaling (Table 5's rcd
variants re-derived at a critical dim), checked against the closed forms and transformers' RoPE."""

from __future__ import annotations

import json
import math

import pytest
import torch

from longrope2.core.config import REPO_ROOT
from longrope2.rope import factors as rope
from longrope2.rope import methods
from longrope2.rope.hf_config import RopeFacts
from longrope2.rope.scaling import RopeScaling

FACTS = RopeFacts(rope_theta=10_000.0, head_dim=32, train_len=128)  # the toy: D = 16, d_tcd = 6
L = 1024


def _result(c=5, tail=None):
    n = FACTS.rotary_dim // 2
    tail = tail or [8.0 + 0.25 * k for k in range(n - c)]
    return {"long_factor": rope.longrope2_factors(tail, c, n).tolist(), "critical_dim": c, "attention_factor": 1.2}


def test_the_registry_matches_the_config_schema_and_the_tables():
    schema = json.loads((REPO_ROOT / "workflow" / "schemas" / "config.schema.json").read_text())
    assert tuple(schema["properties"]["methods"]["items"]["enum"]) == methods.METHOD_NAMES
    assert set(schema["properties"]["search"]["properties"]["method"]["enum"]) == set(methods.SEARCH_NAMES)
    # every method is in one of the paper's tables, except LocalLLaMA's NTK-aware rule (the paper's NTK is `ntk`)
    assert {m for table in methods.TABLES.values() for m in table} == set(methods.METHOD_NAMES) - {"ntk_aware"}


def test_methods_name_the_searches_they_need_once_in_first_use_order():
    assert methods.searches_for(["none", "pi", "ntk", "yarn"]) == []
    assert methods.searches_for(["ntk_rcd", "longrope", "longrope2_no_mixed", "longrope2"]) == ["longrope2", "longrope"]
    assert methods.SEARCH_OVERRIDES["longrope"] == {"all_dims": True, "fitness": "plain_ppl"}
    assert methods.SEARCH_OVERRIDES["longrope2"] == {}
    with pytest.raises(ValueError, match="method 'magic': accepted: none, pi, ntk, yarn, longrope, longrope2, "):
        methods.spec("magic")


@pytest.mark.parametrize("name", ["none", "pi", "ntk", "yarn"])
def test_static_methods_are_the_closed_forms_and_never_switch(name):
    scaling = methods.method_scaling(name, FACTS, L)
    assert scaling == RopeScaling.build(name, FACTS, L) and not scaling.switches
    assert scaling.short_inv_freq().equal(scaling.long_inv_freq())


def test_searched_methods_take_the_result_and_only_no_mixed_drops_the_short_factors():
    result = _result()
    lr2 = methods.method_scaling("longrope2", FACTS, L, result)
    assert lr2.long_factor == pytest.approx(result["long_factor"], abs=0) and set(lr2.short_factor) == {1.0}
    assert (lr2.attention_factor, lr2.critical_dim, lr2.switches) == (1.2, 5, True)
    no_mixed = methods.method_scaling("longrope2_no_mixed", FACTS, L, result)
    assert no_mixed.short_factor == no_mixed.long_factor == lr2.long_factor
    with pytest.raises(ValueError, match="method 'longrope' needs the result of search 'longrope'"):
        methods.method_scaling("longrope", FACTS, L)


def test_ntk_rcd_interpolates_the_critical_dim_by_exactly_s():
    c, s = 5, 8.0
    scaling = methods.method_scaling("ntk_rcd", FACTS, L, _result(c))
    lam = torch.tensor(scaling.long_factor, dtype=torch.float64)
    assert lam[c].item() == pytest.approx(s, rel=1e-12) and lam[0].item() == 1.0
    assert torch.allclose(lam, s ** (torch.arange(16, dtype=torch.float64) / c))
    # the same frequencies as a plain base change (what the exported config says)
    theta = scaling.to_rope_parameters()["rope_theta"]
    assert theta == pytest.approx(10_000.0 * s ** (32 / (2 * c)))
    assert torch.allclose(scaling.long_inv_freq(), rope.inv_freq(32, theta))
    assert torch.allclose(scaling.long_inv_freq(), rope.scaled_inv_freq(32, 10_000.0, lam), rtol=1e-5)


@pytest.mark.parametrize("c", [3, 4, 5, 7])
def test_yarn_rcd_ends_its_ramp_at_the_critical_dim(c):
    scaling = methods.method_scaling("yarn_rcd", FACTS, L, _result(c))
    lam = scaling.long_factor
    assert all(x == pytest.approx(8.0) for x in lam[c:]) and lam[c - 1] < 8.0 - 1e-6
    assert scaling.attention_factor == pytest.approx(0.1 * math.log(8.0) + 1)
    low, high = rope.yarn_correction_range(32, 10_000.0, 128, 32.0, scaling.yarn_alpha)
    assert high == c and low == rope.yarn_correction_range(32, 10_000.0, 128)[0]


def test_re_derived_at_d_tcd_yarn_is_yarn():
    d_tcd = rope.critical_dim(32, 10_000.0, 128)
    assert d_tcd == 6
    ours = methods.method_scaling("yarn_rcd", FACTS, L, _result(d_tcd))
    assert ours.long_factor == pytest.approx(RopeScaling.yarn(FACTS, L).long_factor, rel=1e-12)

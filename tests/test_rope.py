"""Pure RoPE maths: critical dims, periods, temperatures, rescaling rules (docs/method.md §1, §2)."""

import math

import pytest
import torch
from conftest import load_reference

from longrope2.rope import factors as rope

# (name, d, base, L_train, L, d_tcd, d10_tcd, attention temperature) from docs/method.md §1 / §2
MODELS = [
    ("llama3-8b", 128, 500_000, 8192, 131072, 35, 24, 1.1435),
    ("phi3-mini", 96, 10_000, 2048, 131072, 31, 19, 1.2432),
    ("phi4-mini", 96, 10_000, 4096, 131072, 34, 22, 1.1902),
]


@pytest.mark.parametrize("name,d,base,train,target,tcd,tcd10,temp", MODELS)
def test_critical_dims_and_temperature(name, d, base, train, target, tcd, tcd10, temp):
    assert rope.critical_dim(d, base, train) == tcd
    assert rope.d10_critical_dim(d, base, train) == tcd10
    s = rope.extension_ratio(target, train)
    assert rope.longrope_attention_factor(s, train) == pytest.approx(temp, abs=1e-4)


@pytest.mark.parametrize("name,d,base,train,target,tcd,tcd10,temp", MODELS)
def test_critical_dim_is_first_period_beyond_train_len(name, d, base, train, target, tcd, tcd10, temp):
    T = rope.periods(d, base)
    assert T[tcd - 1] < train < T[tcd]
    assert T[tcd10 - 1] < train / 10 < T[tcd10]  # d10_tcd: first pair with fewer than 10 turns


def test_spec_period_checks():
    T = rope.periods(96, 10_000)
    assert round(float(T[30])) == 1987 and round(float(T[31])) == 2407
    T = rope.periods(128, 500_000)
    assert round(float(T[34])) == 6695 and round(float(T[35])) == 8219


def test_periods_and_inv_freq_agree():
    d, base = 96, 10_000
    th = rope.inv_freq(d, base)
    assert th.dtype == torch.float32 and th.shape == (48,)
    assert th[0] == 1.0
    torch.testing.assert_close(2 * math.pi / th.double(), rope.periods(d, base), rtol=1e-6, atol=0)


def test_rotary_dim():
    assert rope.rotary_dim(128, 0.75) == 96
    assert rope.rotary_dim(128) == 128
    with pytest.raises(ValueError):
        rope.rotary_dim(10, 0.5)  # odd


def test_attention_temperature_not_extending():
    assert rope.longrope_attention_factor(1.0, 4096) == 1.0
    assert rope.longrope_attention_factor(0.5, 4096) == 1.0
    assert rope.yarn_attention_factor(1.0) == 1.0
    assert rope.yarn_attention_factor(16) == pytest.approx(0.1 * math.log(16) + 1)


def test_pi_and_ntk_factors():
    assert torch.equal(rope.pi_factors(4, 8.0), torch.full((4,), 8.0, dtype=torch.float64))
    # the paper's NTK (Liu et al.): LLaMA3-8B 8k -> 128k, real d_tcd = 128 ln(8192 / 2π) / (2 ln 500000) = 34.98
    d, base, train, s = 128, 500_000, 8192, 16.0
    c = rope.critical_dim_real(d, base, train)
    assert c == pytest.approx(34.984, abs=1e-3)
    lam = rope.ntk_factors(d, base, train, s)
    assert lam.dtype == torch.float64 and lam.shape == (64,) and lam[0] == 1.0
    assert float(s) ** (34 / c) < s < float(s) ** (35 / c)  # λ = s exactly at the real d_tcd, between pairs 34, 35
    assert lam[63] == pytest.approx(s ** (63 / c), rel=1e-12) and lam[63] == pytest.approx(147.4, abs=0.1)
    assert torch.all(lam[35:] > s) and torch.all(lam[:35] < s)
    # = original RoPE with Liu et al.'s base θ^(ln(L/2π) / ln(L_train/2π)), in float64 (an identity)
    theta_ntk = base ** (math.log(train * s / (2 * math.pi)) / math.log(train / (2 * math.pi)))
    i = torch.arange(64, dtype=torch.float64)
    torch.testing.assert_close(base ** (-2 * i / d) / lam, theta_ntk ** (-2 * i / d), rtol=1e-10, atol=0)
    assert rope.ntk_base_at(d, base, s, c) == pytest.approx(theta_ntk, rel=1e-12)
    # LocalLLaMA's NTK-aware rule (not the paper's): the last pair by exactly s, base' = base * s^(d/(d-2))
    aware = rope.ntk_aware_factors(d, s)
    assert aware[0] == 1.0 and aware[-1] == pytest.approx(16.0, rel=1e-12)
    torch.testing.assert_close(base ** (-2 * i / d) / aware,
                               rope.ntk_aware_base(d, base, s) ** (-2 * i / d), rtol=1e-10, atol=0)


def test_yarn_factors_ramp():
    d, base, train, s = 128, 500_000, 8192, 16.0
    lam = rope.yarn_factors(d, base, train, s)
    low, high = rope.yarn_correction_range(d, base, train)
    T = rope.periods(d, base)
    # pairs turning > 32 times within L_train keep θ; pairs turning < once are divided by s
    assert torch.all(lam[: low + 1] == 1.0) and torch.all(train / T[: low + 1] >= 32)
    assert torch.allclose(lam[high:], torch.full_like(lam[high:], s))
    assert torch.all(lam[1:] >= lam[:-1])  # monotone
    assert rope.yarn_extrapolation_weight(d, base, train).dtype == torch.float32


def test_scaled_inv_freq_is_inv_freq_over_factor():
    lam = rope.ntk_aware_factors(64, 4.0)
    torch.testing.assert_close(rope.scaled_inv_freq(64, 1e4, lam).double(),
                               rope.inv_freq(64, 1e4).double() / lam, rtol=1e-6, atol=0)
    with pytest.raises(ValueError):
        rope.scaled_inv_freq(64, 1e4, lam[:-1])


@pytest.mark.parametrize("key,n", [("phi4_mini_instruct", 31), ("llama3_8b_reference", 33)])
def test_ntk_tie_reproduces_released_factors(key, n):
    ref = load_reference()[key]
    released = torch.tensor(ref["long_factor"], dtype=torch.float64)
    c, D = ref["critical_dim"], len(released)
    assert c == n
    tied = rope.ntk_tied_factors(float(released[c]), c, D)
    assert tied[0] == 1.0 and torch.all(tied[c:] == released[c])
    assert (tied[:n] - released[:n]).abs().max() < 1e-8
    full = rope.longrope2_factors(released[c:], c, D)
    assert (full - released).abs().max() < 1e-8
    # the tie is NTK with base * λ_c^(d/2c): same rule, other view
    d = 2 * D
    base = ref["rope_theta"]
    ntk = rope.inv_freq(d, base * float(released[c]) ** (d / (2 * c))).double()
    torch.testing.assert_close(rope.inv_freq(d, base).double()[:c] / tied[:c], ntk[:c], rtol=1e-6, atol=0)


def test_ntk_tie_breaks_if_tied_to_wrong_dim():
    # the head is geometric, so tying at any c' < c gives the same curve; an off-by-one into
    # the searched tail (c + 1) must not
    ref = load_reference()["phi4_mini_instruct"]
    released = torch.tensor(ref["long_factor"], dtype=torch.float64)
    wrong = rope.ntk_tied_factors(float(released[32]), 32, 48)
    assert (wrong[:31] - released[:31]).abs().max() > 1e-3


def test_longrope2_factors_bad_tail():
    with pytest.raises(ValueError):
        rope.longrope2_factors([2.0, 2.0], 3, 8)
    with pytest.raises(ValueError):
        rope.ntk_tied_factors(2.0, 0, 8)

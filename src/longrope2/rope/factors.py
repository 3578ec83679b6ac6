"""Pure RoPE maths of LongRoPE2: frequencies, periods, critical dimensions, rescaling rules.

Conventions (docs/method.md §1): frequency-pair index i = 0..D-1, D = d/2, d = rotary_dim
= head_dim * partial_rotary_factor. A rescaling rule returns λ (the "long_factor"):
the rescaled frequency is θ̂_i = θ_i / λ_i = 1 / (λ_i · base^(2i/d)).

Inverse frequencies are float32 and computed as base ** (float32 exponent), the way
transformers does it: at 128k positions one float32 ulp of θ moves the angle by ~1e-2,
so our cos/sin only agree with a model's if θ is bit-identical. Factors (λ) are float64.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor


def rotary_dim(head_dim: int, partial_rotary_factor: float = 1.0) -> int:
    """d: number of rotated channels per head (int() like transformers, so Phi's 0.75 -> 96 of 128)."""
    d = int(head_dim * partial_rotary_factor)
    if d <= 0 or d % 2:
        raise ValueError(f"rotary dim head_dim*partial_rotary_factor = {head_dim}*{partial_rotary_factor} "
                         f"= {d}; it must be a positive even integer")
    return d


def _exponents(rotary_dim: int) -> Tensor:
    # 2i/d for i = 0..D-1, float32: (D,)
    return torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim


def inv_freq(rotary_dim: int, base: float) -> Tensor:
    """θ_i = base^(-2i/d), float32 (D,)."""
    return 1.0 / (base ** _exponents(rotary_dim))


def scaled_inv_freq(rotary_dim: int, base: float, factors: Tensor | list[float] | tuple[float, ...]) -> Tensor:
    """θ̂_i = 1 / (λ_i · base^(2i/d)), float32 (D,). λ is rounded to float32 first (as a model config is)."""
    lam = torch.as_tensor(factors, dtype=torch.float32)  # (D,)
    if lam.shape != (rotary_dim // 2,):
        raise ValueError(f"expected {rotary_dim // 2} factors, got shape {tuple(lam.shape)}")
    return 1.0 / (lam * base ** _exponents(rotary_dim))


def periods(rotary_dim: int, base: float) -> Tensor:
    """T_i = 2π · base^(2i/d): tokens per full turn of pair i, float64 (D,)."""
    i = torch.arange(rotary_dim // 2, dtype=torch.float64)
    return 2 * math.pi * base ** (2 * i / rotary_dim)


def critical_dim(rotary_dim: int, base: float, train_len: int) -> int:
    """d_tcd = ceil(D · log_base(L_train / 2π)): first pair whose period exceeds L_train.

    Pairs from here on never completed a turn in pre-training, so their unseen angles are OOD.
    """
    return math.ceil(rotary_dim / 2 * math.log(train_len / (2 * math.pi)) / math.log(base))


def d10_critical_dim(rotary_dim: int, base: float, train_len: int) -> int:
    """d10_tcd = ceil(D · log_base(L_train / 20π)): first pair with fewer than 10 turns in L_train.

    Low end of the search range for the real critical dim (docs/method.md §1).
    """
    return math.ceil(rotary_dim / 2 * math.log(train_len / (20 * math.pi)) / math.log(base))


def extension_ratio(target_len: int, train_len: int) -> float:
    """s = L / L_train."""
    return target_len / train_len


def longrope_attention_factor(s: float, train_len: int) -> float:
    """LongRoPE's attention factor sqrt(1 + ln s / ln L_train) multiplying cos and sin (its code's "mscale";
    1.0 when not extending)."""
    if s <= 1.0:
        return 1.0
    return math.sqrt(1 + math.log(s) / math.log(train_len))


def critical_dim_report(head_dim: int, rope_base: float, train_len: int, target_len: int,
                        partial_rotary_factor: float = 1.0) -> dict[str, Any]:
    """Everything users ask about a model's RoPE before extending it, as JSON-able numbers."""
    d = rotary_dim(head_dim, partial_rotary_factor)
    s = extension_ratio(target_len, train_len)
    tcd, tcd10 = critical_dim(d, rope_base, train_len), d10_critical_dim(d, rope_base, train_len)
    T = periods(d, rope_base).tolist()
    return {
        "head_dim": head_dim, "partial_rotary_factor": partial_rotary_factor, "rotary_dim": d, "n_pairs": d // 2,
        "rope_base": rope_base, "train_len": train_len, "target_len": target_len, "extension_ratio": s,
        "d_tcd": tcd, "d10_tcd": tcd10, "search_range": [tcd10, tcd],
        "attention_factor": longrope_attention_factor(s, train_len),
        "periods": T,
        "turns_in_train_len": [train_len / t for t in T],
        "turns_in_target_len": [target_len / t for t in T],
    }


def pi_factors(n_pairs: int, s: float) -> Tensor:
    """Position interpolation: every frequency divided by s."""
    return torch.full((n_pairs,), float(s), dtype=torch.float64)


def critical_dim_real(rotary_dim: int, base: float, train_len: int) -> float:
    """Real-valued d_tcd = d · ln(L_train / 2π) / (2 ln base): the pair index (not rounded) whose period
    equals L_train. The paper's NTK (§2.3, after Liu et al.) is tied to it."""
    return rotary_dim * math.log(train_len / (2 * math.pi)) / (2 * math.log(base))


def ntk_base_at(rotary_dim: int, base: float, s: float, c: float) -> float:
    """NTK base' = base · s^(d/(2c)) that interpolates pair c by exactly s, so λ_i = s^(i/c).

    c = the real d_tcd: the paper's NTK (θ_ntk = base^(ln(L/2π) / ln(L_train/2π))); c = the searched
    critical dim: NTK-rcd (Table 5)."""
    if not c > 0:
        raise ValueError(f"NTK critical dim c = {c}: it must be positive")
    return base * s ** (rotary_dim / (2 * c))


def ntk_factors_at(n_pairs: int, s: float, c: float) -> Tensor:
    """NTK tied at pair c as factors, float64 (D,): λ_i = s^(i / c) (ntk_base_at's base)."""
    i = torch.arange(n_pairs, dtype=torch.float64)
    return float(s) ** (i / c)


def ntk_factors(rotary_dim: int, base: float, train_len: int, s: float) -> Tensor:
    """The paper's NTK as factors, float64 (D,): λ_i = s^(i / d_tcd) with the real-valued d_tcd, so
    λ = s exactly at d_tcd and λ_i > s above it (LLaMA3-8B 8k -> 128k: λ_63 = 16^(63/34.98) ≈ 147)."""
    return ntk_factors_at(rotary_dim // 2, s, critical_dim_real(rotary_dim, base, train_len))


def ntk_aware_base(rotary_dim: int, base: float, s: float) -> float:
    """LocalLLaMA's NTK-aware base' = base · s^(d/(d-2)): the last pair is interpolated by exactly s."""
    return base * s ** (rotary_dim / (rotary_dim - 2))


def ntk_aware_factors(rotary_dim: int, s: float) -> Tensor:
    """LocalLLaMA's NTK-aware rule as factors, float64 (D,): s^(2i/(d-2)); λ_0 = 1, λ_{D-1} = s.
    Not the paper's NTK (§2.3: "leading to insufficient interpolation")."""
    i = torch.arange(rotary_dim // 2, dtype=torch.float64)
    return float(s) ** (2 * i / (rotary_dim - 2))


def yarn_correction_range(rotary_dim: int, base: float, train_len: int,
                          beta: float = 32.0, alpha: float = 1.0) -> tuple[int, int]:
    """Pair indices (low, high) where a pair turns beta resp. alpha times within L_train.

    Pair i turns L_train / T_i times; solving L_train / T_i = r gives
    i(r) = d · ln(L_train / (2π r)) / (2 ln base). Rounded outwards (floor/ceil) and clipped
    to [0, d-1] (transformers clips to d-1, not D-1; kept so both agree).
    """
    def pair_turning(r: float) -> float:
        return rotary_dim * math.log(train_len / (2 * math.pi * r)) / (2 * math.log(base))

    low = math.floor(pair_turning(beta))
    high = math.ceil(pair_turning(alpha))
    return max(low, 0), min(high, rotary_dim - 1)


def yarn_extrapolation_weight(rotary_dim: int, base: float, train_len: int,
                              beta: float = 32.0, alpha: float = 1.0) -> Tensor:
    """γ_i, float32 (D,): 1 = keep θ_i (fast pairs, > beta turns), 0 = interpolate θ_i / s (slow pairs).

    Linear ramp between the two correction dims; float32 so the blend matches a model bit for bit.
    """
    low, high = yarn_correction_range(rotary_dim, base, train_len, beta, alpha)
    width = (high - low) if high != low else 0.001  # one-pair ramp: avoid 0/0
    ramp = ((torch.arange(rotary_dim // 2, dtype=torch.float32) - low) / width).clamp(0, 1)  # 0 -> 1 over i
    return 1 - ramp


def yarn_inv_freq(rotary_dim: int, base: float, train_len: int, s: float,
                  beta: float = 32.0, alpha: float = 1.0) -> Tensor:
    """YaRN θ'_i = (1 - γ_i) · θ_i / s + γ_i · θ_i, float32 (D,)."""
    gamma = yarn_extrapolation_weight(rotary_dim, base, train_len, beta, alpha)
    theta = inv_freq(rotary_dim, base)
    theta_interp = scaled_inv_freq(rotary_dim, base, torch.full((rotary_dim // 2,), float(s)))
    return theta_interp * (1 - gamma) + theta * gamma


def yarn_factors(rotary_dim: int, base: float, train_len: int, s: float,
                 beta: float = 32.0, alpha: float = 1.0) -> Tensor:
    """YaRN as factors: λ_i = 1 / ((1 - γ_i) / s + γ_i), float64 (D,). 1 for fast pairs, s for slow ones."""
    gamma = yarn_extrapolation_weight(rotary_dim, base, train_len, beta, alpha).double()
    return 1.0 / ((1 - gamma) / s + gamma)


def yarn_attention_factor(s: float) -> float:
    """YaRN's attention factor 0.1 ln s + 1 multiplying cos and sin (its paper's sqrt(1/t) for temperature t;
    1.0 when not extending)."""
    return 1.0 if s <= 1.0 else 0.1 * math.log(s) + 1.0


def ntk_tied_factors(lambda_c: float, c: int, n_pairs: int) -> Tensor:
    """λ_i = λ_c^(i/c) for i < c, λ_c for i >= c, float64 (D,).

    LongRoPE2 does not search the pairs below the critical dim c: they follow NTK scaling
    tied to λ_c (NTK with base · λ_c^(d/2c)), so λ_0 = 1 and the curve is continuous at c.
    With a flat tail this is also the paper's initial candidate for a given c (Alg. 1).
    """
    if not 0 < c <= n_pairs:
        raise ValueError(f"critical dim c={c} must be in [1, {n_pairs}]")
    i = torch.arange(n_pairs, dtype=torch.float64)
    return torch.where(i < c, float(lambda_c) ** (i / c), torch.tensor(float(lambda_c), dtype=torch.float64))


def longrope2_factors(tail: Tensor | list[float] | tuple[float, ...], c: int, n_pairs: int) -> Tensor:
    """Full LongRoPE2 long_factor, float64 (D,): searched tail for i >= c, NTK tie λ_c^(i/c) below."""
    tail = torch.as_tensor(tail, dtype=torch.float64)  # (D-c,)
    if not 0 < c < n_pairs or tail.shape != (n_pairs - c,):
        raise ValueError(f"need 0 < c < D and a tail of D-c = {n_pairs}-{c} factors, got {tuple(tail.shape)}")
    head = ntk_tied_factors(float(tail[0]), c, n_pairs)[:c]  # (c,)
    return torch.cat([head, tail])

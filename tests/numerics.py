"""Tolerances that hold on any CPU.

A mathematical identity (packed rows = their documents alone, chunked loss = full-logits loss) is
compared in float64, where the round-off of any summation order is ~1e-16 of the operands' scale,
so a bound of IDENTITY_REL = 1e-10 of the tensor's largest entry leaves a margin of ~10^4 for
reductions over up to 10^4 terms while a real difference (a mask that lets a document see its
neighbour, a missing weight) moves entries by 1e-3 or more of that scale.

Where a test must stay in float32 (two training runs in different processes, transformers'
float32 RoPE), its bound is FLOAT32_REL of the tensor's scale: float32 has eps = 1.2e-7, and the
reductions in these models (hidden 64, <= 10^3-token sums) lose at most ~1e-5 of the scale
through reordering, never the 1e-2 that a wrong factor or a wrong all-reduce produces.

An element-wise rtol (|a - b| <= atol + rtol |b| per entry) is NOT used: near-zero entries that
are differences of large terms carry the large terms' round-off, so such a bound encodes one
CPU's summation order rather than the property under test.
"""

from __future__ import annotations

import torch

IDENTITY_REL = 1e-10
FLOAT32_REL = 1e-5


def max_abs_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected.double()).abs().max())


def assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor, rel: float, what: str = "") -> None:
    """max |actual - expected| <= rel * max |expected|, the bound relative to the tensor's scale."""
    assert actual.shape == expected.shape, (what, tuple(actual.shape), tuple(expected.shape))
    scale = float(expected.double().abs().max())
    error = max_abs_error(actual, expected)
    assert error <= rel * scale, f"{what}: max |diff| {error:.3g} > {rel:g} x scale {scale:.3g}"

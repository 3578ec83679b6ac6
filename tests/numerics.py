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
CPU's summation order rather than the property under test. The one exception is a loss curve
(assert_same_loss_curve): each value is a step's mean loss (or its learning rate, its gradient
norm), positive and a sum of like-signed terms, never a difference of large ones, so each value
is its own scale.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

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


LOSS_CURVE = ("step", "loss", "short_loss", "long_loss", "lr", "grad_norm")  # the columns of loss.csv


def read_loss_curve(path: Path | str) -> list[dict[str, float | None]]:
    """A fine-tuning's loss.csv, a dict a step; None where the file has NaN (no row of that kind in the step)."""
    with Path(path).open() as fh:
        rows = [{k: float(r[k]) for k in LOSS_CURVE} for r in csv.DictReader(fh)]
    return [{k: (None if math.isnan(v) else v) for k, v in r.items()} for r in rows]


def assert_same_loss_curve(actual: Path | str, expected: Path | str, rel: float) -> None:
    """Two loss.csv files trace the same training: the same steps, a loss of each kind (all rows, short rows,
    long rows) at the same steps, and every value |actual - expected| <= rel x |expected| (rel = 0: bit for
    bit, e.g. a resumed run against an uninterrupted one; FLOAT32_REL: the same run with another reduction
    order, e.g. over several processes)."""
    got, want = read_loss_curve(actual), read_loss_curve(expected)
    assert [r["step"] for r in got] == [r["step"] for r in want], (actual, expected)
    for a, b in zip(got, want, strict=True):
        for key in LOSS_CURVE[1:]:
            assert (a[key] is None) == (b[key] is None), f"step {b['step']:g}, {key}: {a[key]} vs {b[key]}"
            if b[key] is not None:
                assert abs(a[key] - b[key]) <= rel * abs(b[key]), (
                    f"step {b['step']:g}, {key}: {a[key]!r} vs {b[key]!r}, beyond {rel:g} of it")

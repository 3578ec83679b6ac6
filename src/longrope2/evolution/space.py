"""The search space of rescaling factors: individuals, bounds, monotonicity."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from longrope2.rope.factors import longrope2_factors, ntk_tied_factors

OPERATORS = ("plateau", "neighbours")


INITIAL_LAYOUTS = ("alg1", "staircase")


_EPS = 1e-9  # slack when turning float bounds into grid units (8.0 / 0.01 is 799.999...)


def _units_at_least(x: float, grid: float) -> int:
    return math.ceil(x / grid - _EPS)


def _units_at_most(x: float, grid: float) -> int:
    return math.floor(x / grid + _EPS)


def _value(k: int, grid: float) -> float:
    return round(k * grid, 10)  # canonical float of k grid units


@dataclass(frozen=True)
class SearchSpace:
    n_pairs: int  # D
    s: float  # extension ratio
    d_tcd: int  # theoretical critical dim: λ_i >= s for i >= d_tcd
    c_range: tuple[int, int]  # inclusive critical dims searched; (c, c) = fixed c (reference code)
    grid: float = 0.01
    strict: bool = False  # False: non-decreasing (paper); True: strictly increasing (reference code)
    all_dims: bool = False  # Table-10 ablation: every dim searched, no NTK tie
    last_step_max: float | None = None  # reference code: λ[D-1] <= λ[D-2] + 4
    attention_range: tuple[float, float] | None = None  # searched attention factor; None = not searched
    operators: str = "plateau"  # plateau (moves every dim, repairs crossovers) | neighbours (the literal rule)

    def __post_init__(self) -> None:
        # accept lists (Hydra/JSON) but keep the dataclass hashable
        object.__setattr__(self, "c_range", tuple(self.c_range))
        if self.attention_range is not None:
            object.__setattr__(self, "attention_range", tuple(float(a) for a in self.attention_range))

        def bad(field: str, accepted: str, got: Any) -> NoReturn:
            raise ValueError(f"SearchSpace.{field} must be {accepted}, got {got!r}")

        D = self.n_pairs
        if self.operators not in OPERATORS:
            bad("operators", " or ".join(OPERATORS), self.operators)
        if not isinstance(D, int) or D < 2:
            bad("n_pairs", "an int >= 2", D)
        if not (math.isfinite(self.s) and self.s > 1):
            bad("s", "a finite float > 1", self.s)
        if not (math.isfinite(self.grid) and self.grid > 0):
            bad("grid", "a finite float > 0", self.grid)
        if _units_at_least(self.s, self.grid) > _units_at_most(2 * self.s, self.grid):
            bad("grid", f"fine enough to hold a value in [s, 2s] = [{self.s}, {2 * self.s}]", self.grid)
        if len(self.c_range) != 2 or not all(isinstance(c, int) for c in self.c_range):
            bad("c_range", "a pair of ints (c_lo, c_hi)", self.c_range)
        c_lo, c_hi = self.c_range
        if not 0 < c_lo <= c_hi < D:
            bad("c_range", f"(c_lo, c_hi) with 0 < c_lo <= c_hi < n_pairs={D}", self.c_range)
        if not isinstance(self.d_tcd, int) or not c_hi <= self.d_tcd <= D:
            bad("d_tcd", f"an int in [c_range[1], n_pairs] = [{c_hi}, {D}] (OOD bound)", self.d_tcd)
        if self.last_step_max is not None:
            if not self.last_step_max >= (self.grid if self.strict else 0):
                bad("last_step_max", f">= {self.grid if self.strict else 0} (or None)", self.last_step_max)
            if c_hi > D - 2:
                bad("c_range", f"c_hi <= n_pairs-2 = {D - 2} when last_step_max is set (two searched dims)",
                    self.c_range)
        if self.strict:  # the longest strictly increasing searched run must fit its bounds
            top = -math.inf
            for i in self._searched(c_lo):
                lo, hi = self._bounds(i)
                top = max(lo, top + 1)
                if top > hi:
                    bad("strict", f"False for this space: {D - self._searched(c_lo).start} strictly increasing "
                        f"values on the {self.grid} grid do not fit in [s, 2s]", self.strict)
        if self.attention_range is not None:
            a_lo, a_hi = self.attention_range
            if not 0 < a_lo <= a_hi < math.inf or _units_at_least(a_lo, self.grid) > _units_at_most(a_hi, self.grid):
                bad("attention_range", "(lo, hi) with 0 < lo <= hi holding a grid value (or None)",
                    self.attention_range)

    def _searched(self, c: int) -> range:
        return range(0 if self.all_dims else c, self.n_pairs)

    def _bounds(self, i: int) -> tuple[int, int]:
        """Grid-unit bounds of searched dim i: [s, 2s], or [1, 2s] below d_tcd in all_dims mode."""
        floor = 1.0 if self.all_dims and i < self.d_tcd else self.s
        return _units_at_least(floor, self.grid), _units_at_most(2 * self.s, self.grid)

    def _attention_units(self) -> tuple[int, int]:
        a_lo, a_hi = self.attention_range  # type: ignore[misc]
        return _units_at_least(a_lo, self.grid), _units_at_most(a_hi, self.grid)

    def _last_step_units(self) -> int | None:
        return None if self.last_step_max is None else _units_at_most(self.last_step_max, self.grid)


@dataclass(frozen=True)
class Individual:
    c: int  # critical dim (a label only in all_dims mode)
    factors: tuple[float, ...]  # full λ, length D
    attention_factor: float | None = None  # only when the space searches it

    def __post_init__(self) -> None:
        object.__setattr__(self, "factors", tuple(float(f) for f in self.factors))
        # Identity for duplicate rejection, cached (checked on every candidate; not a field, so eq/repr skip it).
        # Grid values are canonical floats, so rounding to 1e-9 is exact for them and absorbs last-ulp noise
        # of the derived NTK head.
        att = None if self.attention_factor is None else round(self.attention_factor, 9)
        object.__setattr__(self, "_key", (self.c, tuple(round(f, 9) for f in self.factors), att))

    def key(self) -> tuple:
        return self._key  # type: ignore[attr-defined]


def _units(ind: Individual, space: SearchSpace) -> list[int]:
    return [round(ind.factors[i] / space.grid) for i in space._searched(ind.c)]


def _build(space: SearchSpace, c: int, units: Sequence[int], att: int | None) -> Individual:
    vals = [_value(k, space.grid) for k in units]
    factors = vals if space.all_dims else longrope2_factors(vals, c, space.n_pairs).tolist()
    return Individual(c, tuple(factors), None if att is None else _value(att, space.grid))


def make_individual(space: SearchSpace, c: int, tail: Sequence[float] | None = None, *,
                    factors: Sequence[float] | None = None, attention_factor: float | None = None) -> Individual:
    """tail = λ[c:] (tied mode): the NTK head is derived. factors = full λ (any mode): taken as is. Not validated."""
    if (tail is None) == (factors is None):
        raise ValueError("make_individual: give exactly one of tail= (λ[c:], tied mode) or factors= (full λ)")
    if tail is not None:
        if space.all_dims:
            raise ValueError("make_individual: all_dims mode has no NTK head, pass the full vector as factors=")
        factors = longrope2_factors([float(x) for x in tail], c, space.n_pairs).tolist()
    elif len(factors) != space.n_pairs:  # type: ignore[arg-type]
        raise ValueError(f"make_individual: factors has {len(factors)} values, n_pairs is {space.n_pairs}")
    att = None if attention_factor is None else float(attention_factor)
    return Individual(int(c), tuple(factors), att)  # type: ignore[arg-type]


def violations(ind: Individual, space: SearchSpace) -> list[str]:
    """Human-readable reasons why ind is not a valid member of space (empty = valid)."""
    D, g, lam = space.n_pairs, space.grid, ind.factors
    if len(lam) != D:
        return [f"length {len(lam)} != n_pairs {D}"]
    if not all(math.isfinite(x) for x in lam):
        return ["non-finite factor"]
    if not space.c_range[0] <= ind.c <= space.c_range[1]:
        return [f"c={ind.c} outside c_range {space.c_range}"]  # searched dims are undefined then
    out = []
    dims = space._searched(ind.c)
    for i in dims:
        k, (lo, hi) = round(lam[i] / g), space._bounds(i)
        if abs(lam[i] / g - k) > 1e-6:
            out.append(f"λ_{i}={lam[i]} is off the {g} grid")
        if not lo <= k <= hi:
            out.append(f"λ_{i}={lam[i]} outside bounds [{_value(lo, g)}, {_value(hi, g)}]")
    if not space.all_dims:
        head = ntk_tied_factors(lam[ind.c], ind.c, D).tolist()
        out += [f"λ_{i}={lam[i]} breaks the NTK tie λ_c^(i/c)={head[i]}"
                for i in range(ind.c) if abs(lam[i] - head[i]) > 1e-9 * abs(head[i])]
    for i in range(D - 1):
        if lam[i + 1] < lam[i]:
            out.append(f"not monotone: λ_{i + 1}={lam[i + 1]} < λ_{i}={lam[i]}")
        elif space.strict and i >= dims.start and lam[i + 1] == lam[i]:
            out.append(f"not strictly increasing: λ_{i + 1} = λ_{i} = {lam[i]}")
    if space.last_step_max is not None and lam[-1] > lam[-2] + space.last_step_max + _EPS:
        out.append(f"last step λ_{D - 1} - λ_{D - 2} = {lam[-1] - lam[-2]:.6g} > last_step_max {space.last_step_max}")
    a = ind.attention_factor
    if space.attention_range is None:
        if a is not None:
            out.append(f"attention_factor={a} set but the space does not search it")
    elif a is None or not math.isfinite(a):
        out.append(f"attention_factor={a} missing (searched in {space.attention_range})")
    else:
        (lo, hi), k = space._attention_units(), round(a / g)
        if abs(a / g - k) > 1e-6 or not lo <= k <= hi:
            out.append(f"attention_factor={a} off the {g} grid or outside {space.attention_range}")
    return out


def is_valid(ind: Individual, space: SearchSpace) -> bool:
    lam = ind.factors
    if any(y < x for x, y in itertools.pairwise(lam)):  # fast path: most crossover children fail here
        return False
    return not violations(ind, space)


def to_dict(ind: Individual) -> dict[str, Any]:
    """JSON-friendly; floats survive json round trips exactly (repr is shortest round-trip)."""
    return {"c": ind.c, "factors": list(ind.factors), "attention_factor": ind.attention_factor}


def from_dict(d: dict[str, Any]) -> Individual:
    att = d.get("attention_factor")
    return Individual(int(d["c"]), tuple(float(x) for x in d["factors"]), None if att is None else float(att))

"""Genetic-algorithm operators of LongRoPE2's factor search (docs/method.md §5). Pure: no I/O, no model.

An individual is a critical dim c plus a full long_factor λ (D floats). Searched values sit on a
grid (0.01) and are handled internally as integer grid units, stored as round(k * grid, 10), so
equal vectors compare equal and hash exactly.
- Tied mode (paper): dims i >= c are searched in [s, 2s]; dims i < c are the NTK tie λ_c^(i/c),
  re-derived after every change (rope.factors.longrope2_factors).
- all_dims mode (Table-10 ablation): every dim searched, [1, 2s] below d_tcd, [s, 2s] from it;
  c is only a label (the seed's c).
Operators (SearchSpace.operators):
- plateau (default): a mutated dim is drawn on the grid between the nearest searched values that
  differ from its own (its neighbours, or the ends of the run of equal values it belongs to, or its
  bounds), and the dims that would then break monotonicity are pushed to the new value. For vectors
  without ties this is the paper's "uniform between the neighbours"; on a flat tail it can move
  every dim (the literal rule pins all inner dims of a flat tail). Crossover takes a parent-2 value
  and pushes the same way, so two valid parents always give a valid child. Strict monotonicity is
  the same rule on u_j = k_j - j (a run of consecutive grid values is a "flat" run there).
- neighbours: the paper's text taken literally (the search before 2026-12): mutation between the
  current neighbours, crossover without repair (invalid children are rejected by the caller).
Lower fitness (needle perplexity) is better. All randomness comes from the caller's
numpy Generator, so a saved bit_generator state replays a search exactly.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import numpy as np

from longrope2.evolution.space import (
    INITIAL_LAYOUTS,
    Individual,
    SearchSpace,
    _build,
    _units,
    _units_at_least,
    _value,
    is_valid,
    violations,
)
from longrope2.rope.factors import ntk_tied_factors


def _seed_from(space: SearchSpace, c: int, k0: int, step: int) -> Individual:
    """The tail k0, k0 + step, ... (grid units) from c, its head (NTK tie; snapped to the grid and kept
    monotone in all_dims mode) and the attention midpoint (deterministic, neutral; mutation explores it)."""
    D, g = space.n_pairs, space.grid
    units = [k0 + step * j for j in range(D - c)]
    if space.all_dims:
        head = [round(x / g) for x in ntk_tied_factors(_value(k0, g), c, D)[:c].tolist()]
        for i in range(c):
            head[i] = max(head[i], space._bounds(i)[0])
            if i:
                head[i] = max(head[i], head[i - 1] + int(space.strict))
        units = head + units
    att = None
    if space.attention_range is not None:
        a_lo, a_hi = space._attention_units()
        att = (a_lo + a_hi) // 2
    ind = _build(space, c, units, att)
    if not is_valid(ind, space):
        raise ValueError(f"seed for c={c} is invalid in this space: {violations(ind, space)}")
    return ind


def _stair_step(space: SearchSpace, n: int) -> int:
    """The reference code's 0.1 staircase step in grid units, or one grid step where 0.1 does not fit."""
    lo, hi = space._bounds(space.n_pairs - 1)
    step, lsm = max(1, round(0.1 / space.grid)), space._last_step_units()
    if lo + step * (n - 1) > hi or (lsm is not None and step > lsm):
        step = 1
    return step


def _seed(space: SearchSpace, c: int, rng: np.random.Generator) -> Individual:
    """Paper Alg. 1 candidate for c: flat tail s' ~ U(grid ∩ [s, 2s]) (strict: the reference code's
    s' + 0.1·j staircase, grid steps if 0.1 does not fit), NTK head below c."""
    lo, hi = space._bounds(space.n_pairs - 1)
    n = space.n_pairs - c
    step = _stair_step(space, n) if space.strict else 0
    k0 = int(rng.integers(lo, hi - step * (n - 1) + 1))  # so the last stair stays <= 2s
    return _seed_from(space, c, k0, step)


def _staircase_seeds(space: SearchSpace, c: int, levels: int) -> list[Individual]:
    """The reference code's initial seeds for c: tails s'_j + 0.1·m with s'_j = s·(1 + j/10), j < levels
    (its script starts at 32 + 3.2·j for Phi-4's s = 32), each lowered where its top would pass 2s."""
    lo, hi = space._bounds(space.n_pairs - 1)
    n = space.n_pairs - c
    step = _stair_step(space, n)
    top = hi - step * (n - 1)
    if top < lo:  # no increasing staircase fits: the flat tail (non-decreasing spaces only)
        step, top = 0, hi
    starts = dict.fromkeys(min(max(_units_at_least(space.s * (1 + j / 10), space.grid), lo), top)
                           for j in range(levels))
    return [_seed_from(space, c, k0, step) for k0 in starts]


def _shifted_bounds(space: SearchSpace, c: int) -> tuple[list[int], list[int]]:
    """Bounds of u_j = k_j - j·strict over the searched dims j (k in grid units) within which every
    non-decreasing u is a valid tail: lo_j = max_{m<=j}(lo_m - m·strict), hi_j = min_{m>=j}(hi_m - m·strict)."""
    step = int(space.strict)
    bounds = [space._bounds(i) for i in space._searched(c)]
    lo = list(itertools.accumulate((b[0] - step * j for j, b in enumerate(bounds)), max))
    hi = list(itertools.accumulate((b[1] - step * j for j, b in reversed(list(enumerate(bounds)))), min))[::-1]
    return lo, hi


def _set_and_push(u: list[int], j: int, v: int, last_gap: int | None) -> None:
    """u[j] = v, then the least change that makes u non-decreasing again: later values below v and
    earlier values above v become v. last_gap (u units) bounds u[-1] - u[-2]: the other of the two moves."""
    n = len(u)
    u[j] = v
    for m in range(j + 1, n):
        if u[m] >= v:
            break
        u[m] = v
    for m in range(j - 1, -1, -1):
        if u[m] <= v:
            break
        u[m] = v
    if last_gap is not None and u[-1] - u[-2] > last_gap:
        if j == n - 1:
            u[-2] = u[-1] - last_gap
        else:
            u[-1] = u[-2] + last_gap


def _plateau_window(u: list[int], j: int, lo: int, hi: int) -> tuple[int, int]:
    """Between the nearest values that differ from u[j] on each side (the ends of its run of equal
    values), or the bounds: for a vector without ties, between its neighbours."""
    a, b = j, j
    while a > 0 and u[a - 1] == u[j]:
        a -= 1
    while b < len(u) - 1 and u[b + 1] == u[j]:
        b += 1
    return max(u[a - 1] if a > 0 else lo, lo), min(u[b + 1] if b < len(u) - 1 else hi, hi)


def mutation_window(ind: Individual, space: SearchSpace, j: int) -> tuple[float, float]:
    """The range (λ values) a plateau mutation of the j-th searched dim draws from, before pushing."""
    step, k = int(space.strict), _units(ind, space)
    lo, hi = _shifted_bounds(space, ind.c)
    w_lo, w_hi = _plateau_window([x - step * m for m, x in enumerate(k)], j, lo[j], hi[j])
    return _value(w_lo + step * j, space.grid), _value(w_hi + step * j, space.grid)


def _last_gap(space: SearchSpace) -> int | None:
    lsm = space._last_step_units()
    return None if lsm is None else lsm - int(space.strict)


def _mutate_plateau(ind: Individual, space: SearchSpace, prob: float, rng: np.random.Generator) -> list[int]:
    step, gap = int(space.strict), _last_gap(space)
    lo, hi = _shifted_bounds(space, ind.c)
    u = [x - step * j for j, x in enumerate(_units(ind, space))]
    for j in range(len(u)):
        if rng.random() >= prob:
            continue
        w_lo, w_hi = _plateau_window(u, j, lo[j], hi[j])
        if w_lo > w_hi:
            raise ValueError(f"mutate: input is not valid at searched dim {j}: {violations(ind, space)}")
        _set_and_push(u, j, int(rng.integers(w_lo, w_hi + 1)), gap)
    return [x + step * j for j, x in enumerate(u)]


def _mutate_neighbours(ind: Individual, space: SearchSpace, prob: float, rng: np.random.Generator) -> list[int]:
    D, step, lsm = space.n_pairs, int(space.strict), space._last_step_units()
    dims = space._searched(ind.c)
    k = _units(ind, space)
    for j, i in enumerate(dims):
        if rng.random() >= prob:
            continue
        lo, hi = space._bounds(i)
        if j > 0:  # tied mode: λ_{c-1} follows λ_c, so dim c only has the [s, 2s] floor
            lo = max(lo, k[j - 1] + step)
        if i < D - 1:
            hi = min(hi, k[j + 1] - step)
        elif lsm is not None:
            hi = min(hi, k[j - 1] + lsm)
        if lsm is not None and i == D - 2:  # don't open a too-large last step from below
            lo = max(lo, k[j + 1] - lsm)
        if lo > hi:
            raise ValueError(f"mutate: input is not valid at dim {i}: {violations(ind, space)}")
        k[j] = int(rng.integers(lo, hi + 1))
    return k


def mutate(ind: Individual, space: SearchSpace, prob: float, rng: np.random.Generator) -> Individual:
    """Redraw each searched dim with probability prob (space.operators: plateau or neighbours, see the
    module docstring); a valid input gives a valid output. Returns ind itself if nothing changed."""
    before = _units(ind, space)
    k = (_mutate_plateau if space.operators == "plateau" else _mutate_neighbours)(ind, space, prob, rng)
    changed = k != before
    att = None if ind.attention_factor is None else round(ind.attention_factor / space.grid)
    if space.attention_range is not None and rng.random() < prob:
        a_lo, a_hi = space._attention_units()
        new = int(rng.integers(a_lo, a_hi + 1))
        changed |= new != att
        att = new
    return _build(space, ind.c, k, att) if changed else ind


def crossover(p1: Individual, p2: Individual, space: SearchSpace, prob: float,
              rng: np.random.Generator) -> Individual:
    """Child = p1 with each searched dim taken from p2 with probability prob (snapped to the grid,
    clipped to the dim's bounds). plateau: each taken value pushes the dims it would disorder, so the
    child is valid; neighbours: no repair, the child may be non-monotone (the caller rejects it)."""
    k = _units(p1, space)
    before = list(k)
    plateau = space.operators == "plateau"
    if plateau:
        step, gap = int(space.strict), _last_gap(space)
        lo, hi = _shifted_bounds(space, p1.c)
        u = [x - step * j for j, x in enumerate(k)]
    for j, i in enumerate(space._searched(p1.c)):
        if rng.random() < prob:
            b_lo, b_hi = space._bounds(i)
            new = min(max(round(p2.factors[i] / space.grid), b_lo), b_hi)
            if plateau:
                _set_and_push(u, j, min(max(new - step * j, lo[j]), hi[j]), gap)
            else:
                k[j] = new
    if plateau:
        k = [x + step * j for j, x in enumerate(u)]
    changed = k != before
    att = None if p1.attention_factor is None else round(p1.attention_factor / space.grid)
    if space.attention_range is not None and rng.random() < prob and p2.attention_factor is not None:
        new = round(p2.attention_factor / space.grid)
        changed |= new != att
        att = new
    return _build(space, p1.c, k, att) if changed else p1


def initial_population(space: SearchSpace, size: int, rng: np.random.Generator, *, mutation_prob: float = 0.3,
                       layout: str = "alg1", staircase_levels: int = 8) -> list[Individual]:
    """The seeds, then new valid mutants up to size.

    alg1 (paper Alg. 1): one seed per c in c_range (in order), mutants of the seeds round robin.
    staircase (reference code): staircase_levels seeds per c (tails s·(1 + j/10) + 0.1·m), then
    chained mutants: individual i is a mutant of individual i - (number of seeds).
    """
    if layout not in INITIAL_LAYOUTS:
        raise ValueError(f"initial_population: layout must be {' or '.join(INITIAL_LAYOUTS)}, got {layout!r}")
    cs = range(space.c_range[0], space.c_range[1] + 1)
    if layout == "alg1":
        seeds = [_seed(space, c, rng) for c in cs]
    else:
        seeds = [ind for c in cs for ind in _staircase_seeds(space, c, staircase_levels)]
    if size < len(seeds):
        per_c = "one seed per c" if layout == "alg1" else f"{staircase_levels} staircase seeds per c"
        raise ValueError(f"population size {size} < {len(seeds)} seeds ({per_c} in c_range {space.c_range}): "
                         "it must hold every seed")
    pop = list(seeds)
    keys = {ind.key() for ind in pop}
    tries, limit = 0, 1000 * size
    while len(pop) < size:
        if tries >= limit:
            raise RuntimeError(f"initial_population: could not find {size} unique valid individuals after "
                               f"{tries} tries (found {len(pop)})")
        parent = pop[tries % len(seeds)] if layout == "alg1" else pop[len(pop) - len(seeds)]
        child = mutate(parent, space, mutation_prob, rng)
        tries += 1
        if child.key() not in keys and is_valid(child, space):
            keys.add(child.key())
            pop.append(child)
    return pop


def _ranked(scored: Sequence[tuple[Individual, float]]) -> list[int]:
    # lower fitness first; stable, so ties keep input order; NaN/inf (failed evaluations) last
    return sorted(range(len(scored)),
                  key=lambda j: (0, float(scored[j][1])) if math.isfinite(scored[j][1]) else (1, 0.0))


def best(scored: Sequence[tuple[Individual, float]]) -> tuple[Individual, float]:
    if not scored:
        raise ValueError("best: no scored individuals")
    ind, fit = scored[_ranked(scored)[0]]
    return ind, float(fit)


def next_generation(scored: Sequence[tuple[Individual, float]], space: SearchSpace, *, parents: int, mutants: int,
                    crossovers: int, mutation_prob: float, crossover_prob: float, rng: np.random.Generator,
                    seen: set[tuple], crossover_tries: int = 100,
                    crossover_base: str = "random") -> tuple[list[Individual], list[Individual]]:
    """(top `parents` by fitness, `mutants` mutants + `crossovers` crossover children).

    Children are valid and new: their keys are in neither `seen`, the scored individuals, nor each other.
    A crossover pair that gives no such child in `crossover_tries` tries is replaced by a mutant of its
    first parent (reference code). crossover_base: random (either parent of the pair is the base) or
    better (the better-ranked parent is, as in the reference code).
    Children keys are added to `seen` once all were found (on RuntimeError `seen` is left untouched).
    """
    if not 1 <= parents <= len(scored):
        raise ValueError(f"next_generation: parents must be in [1, {len(scored)}] (scored individuals), got {parents}")
    if mutants < 0 or crossovers < 0:
        raise ValueError(f"next_generation: mutants and crossovers must be >= 0, got {mutants}, {crossovers}")
    if crossover_base not in ("random", "better"):
        raise ValueError(f"next_generation: crossover_base must be random or better, got {crossover_base!r}")
    if crossovers and parents < 2:
        raise ValueError(f"next_generation: crossovers={crossovers} need 2 distinct parents, got parents={parents}")
    top = [scored[j][0] for j in _ranked(scored)[:parents]]
    taken = {ind.key() for ind, _ in scored}
    children: list[Individual] = []

    def new(ind: Individual) -> bool:
        return ind.key() not in seen and ind.key() not in taken and is_valid(ind, space)

    def fill(n: int, kind: str, make: Callable[[], Individual]) -> None:
        found, tries = 0, 0
        while found < n:
            if tries >= 1000 * n:
                raise RuntimeError(f"next_generation: could not find {n} unique valid {kind} after {tries} tries "
                                   f"(found {found})")
            tries += 1
            child = make()
            if new(child):
                taken.add(child.key())
                children.append(child)
                found += 1

    def cross() -> Individual:
        a = int(rng.integers(parents))
        b = int(rng.integers(parents - 1))
        b += b >= a  # uniform over the other parents
        if crossover_base == "better":
            a, b = min(a, b), max(a, b)  # top is ranked: the lower index is the better parent
        for _ in range(crossover_tries):
            child = crossover(top[a], top[b], space, crossover_prob, rng)
            if new(child):
                return child
        return mutate(top[a], space, mutation_prob, rng)

    fill(mutants, "mutants", lambda: mutate(top[int(rng.integers(parents))], space, mutation_prob, rng))
    fill(crossovers, "crossover children", cross)
    seen.update(ind.key() for ind in children)
    return top, children

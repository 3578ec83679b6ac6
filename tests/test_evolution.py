"""GA operators of the factor search (docs/method.md §5): every operator keeps the search-space invariants."""

import dataclasses
import hashlib
import json
import math

import numpy as np
import pytest
from conftest import load_reference

from longrope2.evolution import operators as evolution
from longrope2.evolution.operators import (
    best,
    crossover,
    initial_population,
    mutate,
    mutation_window,
    next_generation,
)
from longrope2.evolution.space import (
    Individual,
    SearchSpace,
    from_dict,
    is_valid,
    make_individual,
    to_dict,
    violations,
)
from longrope2.rope import factors as rope

SPACES = {
    "toy": SearchSpace(16, 8.0, 6, (2, 6)),
    "llama3": SearchSpace(64, 16.0, 35, (24, 35)),
    "strict": SearchSpace(16, 8.0, 6, (2, 6), strict=True),
    "all_dims": SearchSpace(16, 8.0, 6, (2, 6), all_dims=True),
    "all_dims_strict": SearchSpace(16, 8.0, 6, (2, 6), all_dims=True, strict=True),
    "last_step": SearchSpace(16, 8.0, 6, (2, 6), strict=True, last_step_max=0.5),
    "last_step4": SearchSpace(64, 16.0, 35, (24, 35), strict=True, last_step_max=4),
    "attention": SearchSpace(16, 8.0, 6, (2, 6), attention_range=(1.0, 1.5)),
    "fixed_c": SearchSpace(16, 8.0, 6, (4, 4)),
    "literal": SearchSpace(16, 8.0, 6, (2, 6), operators="neighbours"),
    "literal_strict": SearchSpace(16, 8.0, 6, (2, 6), strict=True, last_step_max=0.5, operators="neighbours"),
}
LLAMA3 = SPACES["llama3"]
SEEDS = [0, 1, 2]


def assert_member(ind: Individual, space: SearchSpace) -> None:
    """The invariants, checked independently of evolution.violations."""
    lam, D, s, g = np.array(ind.factors), space.n_pairs, space.s, space.grid
    assert lam.shape == (D,)
    assert space.c_range[0] <= ind.c <= space.c_range[1]
    assert np.all(np.diff(lam) >= 0), f"not monotone: {lam}"
    first = 0 if space.all_dims else ind.c
    searched = lam[first:]
    units = np.round(searched / g)
    assert np.allclose(searched, units * g, rtol=0, atol=1e-9), f"off grid: {searched}"
    if space.strict:
        assert np.all(np.diff(searched) > 0), f"not strictly increasing: {searched}"
    if space.all_dims:
        lo = np.where(np.arange(D) < space.d_tcd, 1.0, s)
        assert np.all(lam >= lo - 1e-9) and np.all(lam <= 2 * s + 1e-9)
    else:
        assert np.all(searched >= s - 1e-9) and np.all(searched <= 2 * s + 1e-9)
        tied = rope.ntk_tied_factors(lam[ind.c], ind.c, D).numpy()
        np.testing.assert_allclose(lam[: ind.c], tied[: ind.c], rtol=1e-12)
        assert lam[0] == 1.0
    assert np.all(lam[space.d_tcd:] >= s - 1e-9)  # the OOD bound, in every mode
    if space.last_step_max is not None:
        assert lam[-1] - lam[-2] <= space.last_step_max + 1e-9
    if space.attention_range is None:
        assert ind.attention_factor is None
    else:
        a = ind.attention_factor
        assert space.attention_range[0] - 1e-9 <= a <= space.attention_range[1] + 1e-9
        assert abs(a / g - round(a / g)) < 1e-6
    assert is_valid(ind, space), violations(ind, space)


def scored_population(space: SearchSpace, seed: int, size: int = 24) -> list[tuple[Individual, float]]:
    rng = np.random.default_rng(seed)
    pop = initial_population(space, size, rng)
    return [(ind, float(f)) for ind, f in zip(pop, rng.uniform(1, 10, size))]


# ---- initial population ----

@pytest.mark.parametrize("name", SPACES)
@pytest.mark.parametrize("seed", SEEDS)
def test_initial_population_invariants(name, seed):
    space = SPACES[name]
    cs = list(range(space.c_range[0], space.c_range[1] + 1))
    size = max(24, len(cs))
    pop = initial_population(space, size, np.random.default_rng(seed))
    assert len(pop) == size
    for ind in pop:
        assert_member(ind, space)
    assert len({ind.key() for ind in pop}) == size
    # Alg. 1 seeds: one per c, in order, flat tail (strict: the 0.1 staircase)
    assert [ind.c for ind in pop[: len(cs)]] == cs
    for ind in pop[: len(cs)]:
        steps = np.diff(ind.factors[ind.c:])
        expected = 0.1 if space.strict else 0.0
        np.testing.assert_allclose(steps, expected, atol=1e-9)


def test_initial_population_seed_tail_is_spread_over_s_2s():
    space = SPACES["toy"]
    starts = {initial_population(space, 5, np.random.default_rng(seed))[0].factors[2] for seed in range(20)}
    assert len(starts) > 10 and min(starts) >= 8.0 and max(starts) <= 16.0


def test_initial_population_staircase_falls_back_to_grid_steps():
    # 20 searched dims: 0.1 steps would span 1.9 > 2s - s = 1.05; grid steps (0.19) fit
    space = SearchSpace(21, 1.05, 1, (1, 1), strict=True)
    for seed in SEEDS:
        pop = initial_population(space, 3, np.random.default_rng(seed))
        np.testing.assert_allclose(np.diff(pop[0].factors[1:]), 0.01, atol=1e-9)
        for ind in pop:
            assert_member(ind, space)


def test_initial_population_attention_seeds_take_the_midpoint():
    space = SPACES["attention"]
    pop = initial_population(space, 8, np.random.default_rng(0))
    assert [ind.attention_factor for ind in pop[:5]] == [1.25] * 5


def test_initial_population_needs_one_seed_per_c():
    with pytest.raises(ValueError, match="one seed per c"):
        initial_population(SPACES["toy"], 4, np.random.default_rng(0))


def test_initial_population_gives_up_when_space_is_too_small():
    space = SearchSpace(3, 2.0, 2, (2, 2), grid=1.0)  # λ_2 in {2, 3, 4}: 3 individuals exist
    assert len(initial_population(space, 3, np.random.default_rng(0))) == 3
    with pytest.raises(RuntimeError, match="could not find 4 unique valid individuals after 4000 tries"):
        initial_population(space, 4, np.random.default_rng(0))


# ---- mutation ----

@pytest.mark.parametrize("name", SPACES)
@pytest.mark.parametrize("seed", SEEDS)
def test_mutate_preserves_validity(name, seed):
    space = SPACES[name]
    rng = np.random.default_rng(seed)
    pop = initial_population(space, 12, rng)
    for prob in (0.3, 1.0):
        ind = pop[-1]
        for _ in range(30):  # chains of mutants wander far from the seed
            ind = mutate(ind, space, prob, rng)
            assert_member(ind, space)


@pytest.mark.parametrize("name", SPACES)
def test_mutate_prob_zero_is_identity_and_prob_one_changes(name):
    space = SPACES[name]
    changed = 0
    for seed in range(5):
        rng = np.random.default_rng(seed)
        ind = initial_population(space, 12, rng)[-1]
        assert mutate(ind, space, 0.0, rng) == ind
        child = mutate(ind, space, 1.0, rng)
        assert child.c == ind.c
        changed += child.factors != ind.factors
    assert changed == 5


def test_mutate_keeps_the_first_searched_dim_above_s_only():
    # tied mode: λ_c has no searched lower neighbour, so it may go anywhere in [s, λ_{c+1}]
    space = SPACES["toy"]
    ind = make_individual(space, 2, [15.0] * 14)
    values = {mutate(ind, space, 1.0, np.random.default_rng(seed)).factors[2] for seed in range(40)}
    assert min(values) < 10.0 and all(8.0 <= v <= 16.0 for v in values)


def test_mutate_respects_last_step_max_from_both_sides():
    space = SearchSpace(16, 8.0, 6, (2, 6), last_step_max=0.5)
    rng = np.random.default_rng(0)
    ind = make_individual(space, 6, [8.0] * 8 + [8.5, 9.0])
    for _ in range(200):
        ind = mutate(ind, space, 0.5, rng)
        assert ind.factors[-1] - ind.factors[-2] <= 0.5 + 1e-9


# ---- crossover ----

@pytest.mark.parametrize("name", SPACES)
def test_crossover_prob_zero_returns_p1_and_prob_one_takes_p2(name):
    # the literal rule copies p2's values; plateau then pushes them into order (next tests)
    space = dataclasses.replace(SPACES[name], operators="neighbours")
    rng = np.random.default_rng(0)
    pop = initial_population(space, 12, rng)
    for p1, p2 in [(pop[0], pop[-1]), (pop[-1], pop[0]), (pop[3], pop[7])]:
        assert crossover(p1, p2, space, 0.0, rng) == p1
        child = crossover(p1, p2, space, 1.0, rng)
        assert child.c == p1.c
        first = 0 if space.all_dims else p1.c
        for i in range(first, space.n_pairs):
            lo = 1.0 if space.all_dims and i < space.d_tcd else space.s
            expected = min(max(round(p2.factors[i] / space.grid) * space.grid, lo), 2 * space.s)
            assert child.factors[i] == pytest.approx(expected, abs=1e-9)
        if space.attention_range is not None:
            assert child.attention_factor == p2.attention_factor
        if not space.all_dims:  # the head is re-derived from the child's λ_c
            tied = rope.ntk_tied_factors(child.factors[p1.c], p1.c, space.n_pairs).tolist()
            assert child.factors[: p1.c] == pytest.approx(tied[: p1.c], rel=1e-12)


def test_crossover_snaps_a_derived_head_value_to_the_grid():
    space = SPACES["toy"]
    p1 = make_individual(space, 2, [8.0] * 14)  # searches dims 2..15
    p2 = make_individual(space, 6, [12.0] * 10)  # dims 2..5 of p2 are NTK values, off the grid
    child = crossover(p1, p2, space, 1.0, np.random.default_rng(0))
    for i in range(2, 6):
        expected = max(round(p2.factors[i] * 100) / 100, 8.0)
        assert child.factors[i] == pytest.approx(expected, abs=1e-9)
    assert child.factors[6:] == (12.0,) * 10


@pytest.mark.parametrize("name", SPACES)
def test_crossover_children_are_on_grid_and_tied_even_when_invalid(name):
    space = SPACES[name]
    rng = np.random.default_rng(1)
    pop = initial_population(space, 16, rng)
    for k in range(40):
        p1, p2 = pop[k % 16], pop[(7 * k + 3) % 16]
        child = crossover(p1, p2, space, 0.3, rng)
        assert is_valid(child, space) == (not violations(child, space))
        searched = child.factors if space.all_dims else child.factors[child.c:]
        assert all(abs(x * 100 - round(x * 100)) < 1e-6 for x in searched)
        if not space.all_dims:
            tied = rope.ntk_tied_factors(child.factors[child.c], child.c, space.n_pairs).tolist()
            assert child.factors[: child.c] == pytest.approx(tied[: child.c], rel=1e-12)


# ---- next generation / best ----

@pytest.mark.parametrize("name", SPACES)
@pytest.mark.parametrize("seed", SEEDS)
def test_next_generation_invariants(name, seed):
    space = SPACES[name]
    scored = scored_population(space, seed)
    seen = {ind.key() for ind, _ in scored}
    before = set(seen)
    rng = np.random.default_rng(seed + 100)
    parents, children = next_generation(scored, space, parents=12, mutants=6, crossovers=6, mutation_prob=0.3,
                                        crossover_prob=0.15, rng=rng, seen=seen)
    order = sorted(range(len(scored)), key=lambda j: scored[j][1])
    assert parents == [scored[j][0] for j in order[:12]]
    assert len(children) == 12
    keys = [c.key() for c in children]
    assert len(set(keys)) == 12 and not set(keys) & before
    assert seen == before | set(keys)
    for child in children:
        assert_member(child, space)


def test_next_generation_runs_several_generations_strict_llama():
    space = SPACES["last_step4"]
    rng = np.random.default_rng(0)
    pop = initial_population(space, 16, rng)
    scored = [(ind, float(f)) for ind, f in zip(pop, rng.uniform(1, 10, 16))]
    seen = {ind.key() for ind in pop}
    for _ in range(3):
        parents, children = next_generation(scored, space, parents=8, mutants=4, crossovers=4, mutation_prob=0.3,
                                            crossover_prob=0.15, rng=rng, seen=seen)
        scored = [(p, f) for p, f in scored if p in parents] + [(c, float(rng.uniform(1, 10))) for c in children]
        assert len(scored) == 16 and len({ind.key() for ind, _ in scored}) == 16
        for child in children:
            assert_member(child, space)


def test_next_generation_is_deterministic_per_generator_state():
    space = SPACES["strict"]
    scored = scored_population(space, 0)

    def run(seed):
        seen = {ind.key() for ind, _ in scored}
        return next_generation(scored, space, parents=12, mutants=6, crossovers=6, mutation_prob=0.3,
                               crossover_prob=0.15, rng=np.random.default_rng(seed), seen=seen)

    assert run(5) == run(5)
    assert run(5)[1] != run(6)[1]
    # resuming from a saved bit_generator state replays the same children
    rng = np.random.default_rng(5)
    state = rng.bit_generator.state
    first = next_generation(scored, space, parents=12, mutants=6, crossovers=6, mutation_prob=0.3,
                            crossover_prob=0.15, rng=rng, seen={ind.key() for ind, _ in scored})
    rng2 = np.random.default_rng(999)
    rng2.bit_generator.state = state
    again = next_generation(scored, space, parents=12, mutants=6, crossovers=6, mutation_prob=0.3,
                            crossover_prob=0.15, rng=rng2, seen={ind.key() for ind, _ in scored})
    assert first == again


def test_initial_population_is_deterministic_per_seed():
    space = SPACES["strict"]
    a = initial_population(space, 20, np.random.default_rng(3))
    assert a == initial_population(space, 20, np.random.default_rng(3))
    assert a != initial_population(space, 20, np.random.default_rng(4))


def test_ranking_is_stable_and_puts_nan_and_inf_last():
    space = SPACES["toy"]
    pop = initial_population(space, 8, np.random.default_rng(0))
    fits = [3.0, 1.0, math.nan, 1.0, math.inf, 2.0, 1.0, -math.inf]
    scored = list(zip(pop, fits))
    parents, _children = next_generation(scored, space, parents=8, mutants=1, crossovers=1, mutation_prob=0.3,
                                        crossover_prob=0.15, rng=np.random.default_rng(0), seen=set())
    assert parents == [pop[j] for j in [1, 3, 6, 5, 0, 2, 4, 7]]
    assert best(scored) == (pop[1], 1.0)
    assert best([(pop[0], math.nan), (pop[1], 5.0)]) == (pop[1], 5.0)
    with pytest.raises(ValueError):
        best([])


def test_next_generation_argument_errors():
    space = SPACES["toy"]
    scored = scored_population(space, 0, size=8)
    kw = {"mutation_prob": 0.3, "crossover_prob": 0.15, "rng": np.random.default_rng(0), "seen": set()}
    with pytest.raises(ValueError, match="need 2 distinct parents"):
        next_generation(scored, space, parents=1, mutants=2, crossovers=1, **kw)
    with pytest.raises(ValueError, match="parents must be in"):
        next_generation(scored, space, parents=9, mutants=2, crossovers=1, **kw)
    parents, children = next_generation(scored, space, parents=1, mutants=2, crossovers=0, **kw)
    assert len(parents) == 1 and len(children) == 2


def test_next_generation_gives_up_and_leaves_seen_untouched():
    space = SearchSpace(3, 2.0, 2, (2, 2), grid=1.0)  # only 3 individuals exist
    pop = initial_population(space, 3, np.random.default_rng(0))
    seen = {ind.key() for ind in pop[:2]}
    snapshot = set(seen)
    with pytest.raises(RuntimeError, match="could not find 2 unique valid mutants after 2000 tries"):
        next_generation([(pop[0], 1.0)], space, parents=1, mutants=2, crossovers=0, mutation_prob=1.0,
                        crossover_prob=0.15, rng=np.random.default_rng(0), seen=seen)
    assert seen == snapshot


def test_crossover_falls_back_to_a_mutant_when_parents_cannot_cross():
    # the literal rule, two staircases at different levels, strict: almost every swap breaks monotonicity
    space = dataclasses.replace(SPACES["strict"], operators="neighbours")
    p1 = make_individual(space, 2, [8.0 + 0.1 * j for j in range(14)])
    p2 = make_individual(space, 2, [14.0 + 0.1 * j for j in range(14)])
    _parents, children = next_generation([(p1, 1.0), (p2, 2.0)], space, parents=2, mutants=0, crossovers=4,
                                        mutation_prob=0.3, crossover_prob=0.15, rng=np.random.default_rng(0),
                                        seen=set(), crossover_tries=1)
    assert len(children) == 4
    for child in children:
        assert_member(child, space)


# ---- validity checks on hand-made vectors ----

def test_is_valid_rejects_each_broken_invariant():
    space = SPACES["toy"]
    tail = [9.0, 9.5, 10.0, 10.0, 11.0, 11.5, 12.0, 12.25, 13.0, 14.0, 15.0, 15.5]  # c = 4
    good = make_individual(space, 4, tail)
    assert is_valid(good, space), violations(good, space)
    lam = list(good.factors)

    def bad(ind, space, needle):
        assert not is_valid(ind, space)
        assert any(needle in v for v in violations(ind, space)), violations(ind, space)

    bad(make_individual(space, 4, tail[:5] + [10.5] + tail[6:]), space, "not monotone")
    bad(make_individual(space, 4, [7.99] + tail[1:]), space, "outside bounds")
    bad(make_individual(space, 4, tail[:-1] + [16.01]), space, "outside bounds")
    bad(make_individual(space, 4, tail[:2] + [9.505] + tail[3:]), space, "off the 0.01 grid")
    bad(Individual(4, tuple(lam[:1] + [lam[1] * 1.001] + lam[2:])), space, "breaks the NTK tie")
    bad(Individual(4, tuple([1.0] * 4 + lam[4:])), space, "breaks the NTK tie")
    bad(Individual(7, good.factors), space, "outside c_range")
    bad(Individual(4, good.factors[:-1]), space, "length")
    bad(Individual(4, good.factors[:-1] + (math.nan,)), space, "non-finite")
    strict = SPACES["strict"]
    bad(good, strict, "not strictly increasing")  # tail has 10.0, 10.0
    step = SearchSpace(16, 8.0, 6, (2, 6), last_step_max=0.4)
    bad(good, step, "last step")
    assert is_valid(make_individual(step, 4, tail[:-1] + [15.4]), step)
    att = SPACES["attention"]
    bad(good, att, "missing")
    bad(make_individual(att, 4, tail, attention_factor=1.6), att, "attention_factor=1.6")
    bad(make_individual(att, 4, tail, attention_factor=1.205), att, "attention_factor=1.205")
    assert is_valid(make_individual(att, 4, tail, attention_factor=1.2), att)
    bad(make_individual(att, 4, tail, attention_factor=1.2), space, "does not search it")


def test_is_valid_all_dims_bounds():
    space = SPACES["all_dims"]
    lam = [1.0, 1.5, 2.0, 3.0, 4.0, 5.0] + [8.0] * 10  # d_tcd = 6: [1, 16] below, [8, 16] from it
    assert is_valid(make_individual(space, 3, factors=lam), space)
    assert not is_valid(make_individual(space, 3, factors=[0.99] + lam[1:]), space)
    low = make_individual(space, 3, factors=lam[:6] + [7.99] + [8.0] * 9)
    assert any("outside bounds" in v for v in violations(low, space))
    off = make_individual(space, 3, factors=[1.0, 1.505] + lam[2:])
    assert any("grid" in v for v in violations(off, space))


@pytest.mark.parametrize("key", ["phi4_mini_instruct", "llama3_8b_reference"])
def test_released_factors_are_members_of_the_reference_code_space(key):
    # Phi-4-mini: D=48, s=32, d_tcd=34, d10=22; LLaMA3-8B: D=64, s=16, d_tcd=35, d10=24 (docs/method.md §1)
    dims = {"phi4_mini_instruct": (48, 32.0, 34, 22), "llama3_8b_reference": (64, 16.0, 35, 24)}
    D, s, tcd, tcd10 = dims[key]
    ref = load_reference()[key]
    c, released = ref["critical_dim"], ref["long_factor"]
    space = SearchSpace(D, s, tcd, (tcd10, tcd), strict=True, last_step_max=4.0)
    ind = make_individual(space, c, released[c:])
    assert is_valid(ind, space), violations(ind, space)
    np.testing.assert_allclose(ind.factors, released, rtol=1e-8)


# ---- construction and serialisation ----

def test_make_individual_argument_errors():
    space = SPACES["toy"]
    with pytest.raises(ValueError, match="exactly one of"):
        make_individual(space, 4)
    with pytest.raises(ValueError, match="exactly one of"):
        make_individual(space, 4, [8.0] * 12, factors=[8.0] * 16)
    with pytest.raises(ValueError, match="all_dims mode has no NTK head"):
        make_individual(SPACES["all_dims"], 4, [8.0] * 12)
    with pytest.raises(ValueError, match="factors has 15 values"):
        make_individual(space, 4, factors=[8.0] * 15)
    with pytest.raises(ValueError):
        make_individual(space, 4, [8.0] * 11)  # tail must be λ[c:]


@pytest.mark.parametrize("name", ["toy", "attention", "all_dims"])
def test_to_dict_from_dict_round_trip_exact(name):
    space = SPACES[name]
    pop = initial_population(space, 10, np.random.default_rng(0))
    blob = json.dumps([to_dict(ind) for ind in pop])
    back = [from_dict(d) for d in json.loads(blob)]
    assert back == pop
    assert [ind.key() for ind in back] == [ind.key() for ind in pop]


def test_key_identifies_equal_vectors():
    space = SPACES["toy"]
    a = make_individual(space, 4, [8.1] * 12)
    b = make_individual(space, 4, [round(810 * 0.01, 10)] * 12)
    assert a.key() == b.key() and hash(a.key()) == hash(b.key())
    assert a.key() != make_individual(space, 5, [8.1] * 11).key()
    assert a.key() != make_individual(space, 4, [8.1] * 11 + [8.11]).key()


# ---- search-space validation ----

@pytest.mark.parametrize("kwargs,message", [
    ({"n_pairs": 1}, "SearchSpace.n_pairs must be an int >= 2"),
    ({"s": 1.0}, "SearchSpace.s must be a finite float > 1"),
    ({"s": math.inf}, "SearchSpace.s must be a finite float > 1"),
    ({"grid": 0.0}, "SearchSpace.grid must be a finite float > 0"),
    ({"grid": 20.0}, "SearchSpace.grid must be fine enough to hold a value in [s, 2s]"),
    ({"c_range": (0, 6)}, "SearchSpace.c_range must be (c_lo, c_hi) with 0 < c_lo <= c_hi < n_pairs=16"),
    ({"c_range": (5, 4)}, "SearchSpace.c_range must be (c_lo, c_hi)"),
    ({"c_range": (2.0, 6)}, "SearchSpace.c_range must be a pair of ints"),
    ({"c_range": (2, 7)}, "SearchSpace.d_tcd must be an int in [c_range[1], n_pairs] = [7, 16]"),
    ({"d_tcd": 17}, "SearchSpace.d_tcd must be an int in [c_range[1], n_pairs] = [6, 16]"),
    ({"strict": True, "s": 1.05, "grid": 0.1},
     "SearchSpace.strict must be False for this space: 14 strictly increasing"),
    ({"last_step_max": -1.0}, "SearchSpace.last_step_max must be >= 0"),
    ({"strict": True, "last_step_max": 0.0}, "SearchSpace.last_step_max must be >= 0.01"),
    ({"last_step_max": 4.0, "c_range": (2, 15), "d_tcd": 16}, "c_hi <= n_pairs-2 = 14 when last_step_max is set"),
    ({"attention_range": (1.5, 1.0)}, "SearchSpace.attention_range must be (lo, hi) with 0 < lo <= hi"),
    ({"attention_range": (1.001, 1.009)}, "SearchSpace.attention_range must be (lo, hi)"),
    ({"attention_range": (1.0, math.inf)}, "SearchSpace.attention_range must be (lo, hi)"),
    ({"attention_range": (0.0, 1.0)}, "SearchSpace.attention_range must be (lo, hi)"),
])
def test_search_space_validation(kwargs, message):
    base = {"n_pairs": 16, "s": 8.0, "d_tcd": 6, "c_range": (2, 6)}
    with pytest.raises(ValueError) as err:
        SearchSpace(**{**base, **kwargs})
    assert message in str(err.value)


def test_search_space_accepts_lists_and_stays_hashable():
    space = SearchSpace(16, 8.0, 6, [2, 6], attention_range=[1, 1.5])
    assert space.c_range == (2, 6) and space.attention_range == (1.0, 1.5)
    assert hash(space) == hash(SearchSpace(16, 8.0, 6, (2, 6), attention_range=(1.0, 1.5)))


def test_crossover_parents_are_distinct_and_cover_all_pairs(monkeypatch):
    space = SPACES["toy"]
    scored = scored_population(space, 0, size=8)
    pairs = []

    def spy(p1, p2, space, prob, rng):
        pairs.append((p1.key(), p2.key()))
        return crossover(p1, p2, space, prob, rng)

    monkeypatch.setattr(evolution, "crossover", spy)
    parents, _ = next_generation(scored, space, parents=3, mutants=0, crossovers=40, mutation_prob=0.3,
                                 crossover_prob=0.5, rng=np.random.default_rng(0), seen=set(), crossover_tries=1)
    index = {p.key(): j for j, p in enumerate(parents)}
    used = {(index[a], index[b]) for a, b in pairs}
    assert all(a != b for a, b in used)
    assert used == {(a, b) for a in range(3) for b in range(3) if a != b}


# ---- the plateau operators: every searched dim moves, crossovers are repaired (issue: flat tails pin) ----

def flat(space: SearchSpace, c: int, level: float) -> Individual:
    return make_individual(space, c, [level] * (space.n_pairs - c))


@pytest.mark.parametrize("space", [LLAMA3, SPACES["all_dims"], SPACES["last_step4"]], ids=["llama3", "all_dims",
                                                                                         "last_step4"])
def test_plateau_window_of_a_flat_or_tight_tail_spans_the_bounds(space):
    # a flat tail (strict: a staircase of one grid step, "flat" in u = k - j): every dim may go anywhere
    c, n = space.c_range[0], space.n_pairs - space.c_range[0]
    step = 0.01 if space.strict else 0.0
    ind = make_individual(space, c, [20.0 + step * j for j in range(n)]) if not space.all_dims else \
        make_individual(space, c, factors=[8.0 + step * j for j in range(space.n_pairs)])
    assert is_valid(ind, space), violations(ind, space)
    dims = list(space._searched(c))
    for j, i in enumerate(dims):
        lo = 1.0 if space.all_dims and i < space.d_tcd else space.s
        # strict: the tail must still fit above (below) the dim, one grid step per dim
        expected = (round(max(lo, space.s if i >= space.d_tcd else lo) + (step * j if space.strict else 0), 2),
                    round(2 * space.s - step * (len(dims) - 1 - j), 2))
        if space.all_dims:
            expected = (lo, 2 * space.s)
        assert mutation_window(ind, space, j) == pytest.approx(expected), (i, mutation_window(ind, space, j))


def test_plateau_window_between_distinct_neighbours_is_the_papers():
    ind = make_individual(LLAMA3, 30, [17.0 + 0.4 * j for j in range(34)])
    for j in range(1, 33):
        assert mutation_window(ind, LLAMA3, j) == pytest.approx((17.0 + 0.4 * (j - 1), 17.0 + 0.4 * (j + 1)))
    assert mutation_window(ind, LLAMA3, 0) == pytest.approx((16.0, 17.4))  # λ_c: only the floor s below
    assert mutation_window(ind, LLAMA3, 33) == pytest.approx((29.8, 32.0))  # the last: up to 2s


def test_plateau_mutation_moves_every_dim_of_a_flat_seed_to_both_bounds():
    # LLaMA3-8B's space, flat c = 30 tail at 20: within 200 mutants every searched dim has moved (λ_c to both
    # sides of the level), and the moves reach both bounds [s, 2s] to within 3 %
    seed = flat(LLAMA3, 30, 20.0)
    rng = np.random.default_rng(0)
    mutants = [mutate(seed, LLAMA3, 0.3, rng) for _ in range(200)]
    tails = np.array([m.factors[30:] for m in mutants])
    for m in mutants:
        assert_member(m, LLAMA3)
    assert np.all(np.any(tails != 20.0, axis=0))
    assert tails[:, 0].min() < 20.0 < tails[:, 0].max() and tails[:, -1].max() > 20.0
    assert tails.min() <= 16.0 + 0.03 * 16 and tails.max() >= 32.0 - 0.03 * 16
    # chained mutations from the seed reach the bounds exactly at both ends
    lows, highs = set(), set()
    ind = seed
    for _ in range(3000):
        ind = mutate(ind, LLAMA3, 0.3, rng)
        lows.add(min(ind.factors[30:]))
        highs.add(max(ind.factors[30:]))
    assert 16.0 in lows and 32.0 in highs


def test_the_literal_rule_pins_the_inner_dims_of_a_flat_tail():
    # the bug the plateau rule fixes, measured: in 2 000 mutants of a flat tail only dims next to its ends
    # move (a moved end opens its neighbour's window within the same mutation); most inner dims never do
    space = dataclasses.replace(LLAMA3, operators="neighbours")
    seed = flat(space, 30, 20.0)
    rng = np.random.default_rng(0)
    tails = np.array([mutate(seed, space, 0.3, rng).factors[30:] for _ in range(2000)])
    moved = np.flatnonzero(np.any(tails != 20.0, axis=0))
    assert 0 in moved and 33 in moved and len(moved) <= 10  # measured: 8 of 34


def test_plateau_mutation_moves_every_dim_of_a_tight_strict_staircase():
    space = SPACES["last_step4"]
    seed = make_individual(space, 30, [20.0 + 0.01 * j for j in range(34)])
    rng = np.random.default_rng(1)
    mutants = [mutate(seed, space, 0.3, rng) for _ in range(200)]
    for m in mutants:
        assert_member(m, space)
    moved = np.any(np.array([m.factors[30:] for m in mutants]) != np.array(seed.factors[30:]), axis=0)
    assert moved.all()


@pytest.mark.parametrize("name", ["llama3", "strict", "last_step4", "all_dims"])
def test_plateau_crossover_of_flat_parents_at_different_levels_is_valid_and_new(name):
    space = SPACES[name]
    c = space.c_range[0]
    n = space.n_pairs - (0 if space.all_dims else c)
    s = space.s
    step = 0.1 if space.strict else 0.0

    def tail(level: float) -> list[float]:
        return [round(level + step * j, 10) for j in range(n)]

    if space.all_dims:  # the head is searched too: flat at its own level below d_tcd
        p1 = make_individual(space, c, factors=[1.0] * space.d_tcd + [s + 0.5] * (space.n_pairs - space.d_tcd))
        p2 = make_individual(space, c, factors=[2.0] * space.d_tcd + [s + 3.5] * (space.n_pairs - space.d_tcd))
    else:
        p1, p2 = make_individual(space, c, tail(s + 0.2)), make_individual(space, c, tail(s + 0.2 * s))
    assert is_valid(p1, space) and is_valid(p2, space)
    new = 0
    for seed in range(200):
        child = crossover(p1, p2, space, 0.15, np.random.default_rng(seed))
        assert_member(child, space)
        new += child != p1 and child != p2
    assert new >= 150  # nothing taken (0.85^n) or everything taken from p2 are the only repeats


def test_plateau_crossovers_need_no_fallback_between_flat_parents():
    # every crossover child of two flat tails holds only the two parents' values: none is a fallback mutant
    p1, p2 = flat(LLAMA3, 30, 18.0), flat(LLAMA3, 30, 26.0)
    _, children = next_generation([(p1, 1.0), (p2, 2.0)], LLAMA3, parents=2, mutants=0, crossovers=16,
                                  mutation_prob=0.3, crossover_prob=0.15, rng=np.random.default_rng(0), seen=set())
    for child in children:
        assert set(child.factors[30:]) == {18.0, 26.0}
    literal = dataclasses.replace(LLAMA3, operators="neighbours")
    _, children = next_generation([(p1, 1.0), (p2, 2.0)], literal, parents=2, mutants=0, crossovers=16,
                                  mutation_prob=0.3, crossover_prob=0.15, rng=np.random.default_rng(0), seen=set(),
                                  crossover_tries=1)
    assert sum(not set(ch.factors[30:]) <= {18.0, 26.0} for ch in children) >= 8  # mostly fallbacks


def test_crossover_base_better_builds_every_child_on_the_better_parent():
    space = SPACES["toy"]
    better, worse = flat(space, 3, 10.0), flat(space, 5, 12.0)
    kw = dict(parents=2, mutants=0, crossovers=12, mutation_prob=0.3, crossover_prob=0.3)
    _, children = next_generation([(worse, 2.0), (better, 1.0)], space, rng=np.random.default_rng(0), seen=set(),
                                  crossover_base="better", **kw)
    assert {ch.c for ch in children} == {3}
    _, children = next_generation([(worse, 2.0), (better, 1.0)], space, rng=np.random.default_rng(0), seen=set(),
                                  **kw)
    assert {ch.c for ch in children} == {3, 5}
    with pytest.raises(ValueError, match="crossover_base must be random or better, got 'best'"):
        next_generation([(worse, 2.0), (better, 1.0)], space, rng=np.random.default_rng(0), seen=set(),
                        crossover_base="best", **kw)


def test_staircase_initial_population_is_the_reference_codes():
    # reference set-up: strict, last step <= 4, 8 staircase seeds s·(1 + j/10) + 0.1·m, chained mutants to 128
    space = SearchSpace(64, 16.0, 35, (34, 34), strict=True, last_step_max=4.0)
    pop = initial_population(space, 128, np.random.default_rng(0), layout="staircase")
    assert len(pop) == 128 and len({ind.key() for ind in pop}) == 128
    for ind in pop:
        assert_member(ind, space)
    for j, ind in enumerate(pop[:8]):
        np.testing.assert_allclose(ind.factors[34:], [16.0 * (1 + j / 10) + 0.1 * m for m in range(30)], atol=1e-9)
    # a chained mutant differs from the individual 8 places before it in a few dims only
    diffs = [sum(a != b for a, b in zip(pop[i].factors[34:], pop[i - 8].factors[34:])) for i in range(8, 128)]
    assert 0 < np.median(diffs) <= 15


def test_initial_population_layout_errors():
    with pytest.raises(ValueError, match="layout must be alg1 or staircase, got 'grid'"):
        initial_population(SPACES["toy"], 8, np.random.default_rng(0), layout="grid")
    with pytest.raises(ValueError, match=r"population size 16 < 40 seeds \(8 staircase seeds per c"):
        initial_population(SPACES["toy"], 16, np.random.default_rng(0), layout="staircase")


def test_search_space_rejects_unknown_operators():
    with pytest.raises(ValueError, match="SearchSpace.operators must be plateau or neighbours, got 'swap'"):
        SearchSpace(16, 8.0, 6, (2, 6), operators="swap")


@pytest.mark.parametrize("extra, digest", [
    ({}, "fbf2a206eac2243e"),
    ({"strict": True, "last_step_max": 0.5}, "ab3125b5fd52b9db"),
    ({"all_dims": True}, "c8c4b70cbf960cb1"),
])
def test_the_literal_operators_are_the_search_before_the_plateau_rule(extra, digest):
    # 6 generations on a fixed landscape; the digests were recorded with the search of 53cd57f
    space = SearchSpace(16, 8.0, 6, (2, 6), operators="neighbours", **extra)
    star = np.linspace(1.0, 14.0, 16)

    def fit(ind: Individual) -> float:
        return float(np.mean((np.log(ind.factors) - np.log(star)) ** 2))

    rng = np.random.default_rng(7)
    scored = [(ind, fit(ind)) for ind in initial_population(space, 16, rng)]
    seen = {ind.key() for ind, _ in scored}
    for _ in range(6):
        top, kids = next_generation(scored, space, parents=8, mutants=4, crossovers=4, mutation_prob=0.3,
                                    crossover_prob=0.15, rng=rng, seen=seen)
        fitness = {ind.key(): f for ind, f in scored}
        scored = [(p, fitness[p.key()]) for p in top] + [(k, fit(k)) for k in kids]
    searched = [[ind.c] + [round(x * 100) for x in ind.factors[0 if space.all_dims else ind.c:]] for ind, _ in scored]
    assert hashlib.sha256(json.dumps(searched).encode()).hexdigest()[:16] == digest

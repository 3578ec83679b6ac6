"""The methods an experiment compares (paper Tables 2, 5, 6, 7, 10) and how each gets its RoPE scaling.

Every method goes through the same fine-tuning and evaluation; they differ in where the factors come
from and whether training switches between short and long factors:

- static (none, pi, ntk, yarn, ntk_aware): a closed-form scaling used at every length (no switch); ntk is the
  paper's NTK (§2.3: Liu et al.'s base from the real-valued theoretical critical dim), ntk_aware LocalLLaMA's
  rule s^(2i/(d-2)), which the paper names as not its NTK (kept outside the paper's tables);
- searched (longrope, longrope2, longrope2_plain_ppl, longrope2_all_dims): factors from a `search`
  run; LongRoPE-family switch: short factors (ones) up to L_train, long factors beyond;
- derived (ntk_rcd, yarn_rcd, Table 5): NTK / YaRN re-derived at the critical dim c that the
  longrope2 search found, instead of at d_tcd; static like their parents;
- longrope2_no_mixed (Table 7): longrope2's factors on every row (short_factor = long_factor);
- rule (longrope2_dtcd): LongRoPE2's factor rule at the theoretical critical dim, no search: lambda_i = s
  from d_tcd, NTK-tied below (the search's `dtcd_rule` baseline); LongRoPE-family switch.

LongRoPE (v1) here: every dim searched by plain perplexity, no NTK tie, short factors all ones (not
searched): the v1 search space [1, 2s] below d_tcd and [s, 2s] from it, monotone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from longrope2.rope import factors as rope
from longrope2.rope.hf_config import RopeFacts
from longrope2.rope.scaling import RopeScaling


@dataclass(frozen=True)
class MethodSpec:
    name: str
    kind: str  # static | searched | derived | rule
    search: str | None = None  # the search run whose factors (searched) or critical dim (derived) it uses
    search_overrides: Mapping[str, Any] = field(default_factory=dict)  # search.* of that run
    mixed_window: bool = True  # LongRoPE family: short rows on the short factors


_LR2 = "longrope2"


METHOD_SPECS: dict[str, MethodSpec] = {m.name: m for m in (
    MethodSpec("none", "static"),
    MethodSpec("pi", "static"),
    MethodSpec("ntk", "static"),
    MethodSpec("yarn", "static"),
    MethodSpec("longrope", "searched", "longrope", {"all_dims": True, "fitness": "plain_ppl"}),
    MethodSpec(_LR2, "searched", _LR2),
    MethodSpec("ntk_rcd", "derived", _LR2),
    MethodSpec("yarn_rcd", "derived", _LR2),
    MethodSpec("longrope2_plain_ppl", "searched", "longrope2_plain_ppl", {"fitness": "plain_ppl"}),
    MethodSpec("longrope2_no_mixed", "searched", _LR2, mixed_window=False),
    MethodSpec("longrope2_all_dims", "searched", "longrope2_all_dims", {"all_dims": True}),
    MethodSpec("longrope2_dtcd", "rule"),
    MethodSpec("ntk_aware", "static"),  # LocalLLaMA's rule: not the paper's NTK, in none of its tables
)}


METHOD_NAMES: tuple[str, ...] = tuple(METHOD_SPECS)


# The search runs a method can need, and the search.* each one sets (the user's search.* fills the rest).
SEARCH_OVERRIDES: dict[str, Mapping[str, Any]] = {
    m.search: m.search_overrides for m in METHOD_SPECS.values() if m.kind == "searched" and m.name == m.search
}


SEARCH_NAMES: tuple[str, ...] = tuple(SEARCH_OVERRIDES)


# The paper's comparisons: table -> methods in row order (the toy default runs Table 2's).
TABLES: dict[str, tuple[str, ...]] = {
    "2": ("none", "pi", "ntk", "yarn", "longrope", _LR2),
    "5": ("ntk", "yarn", "ntk_rcd", "yarn_rcd", "longrope2_dtcd", _LR2),
    "6": ("longrope2_plain_ppl", _LR2),
    "7": ("longrope2_no_mixed", _LR2),
    "10": ("longrope2_all_dims", _LR2),
}


def spec(name: str) -> MethodSpec:
    if name not in METHOD_SPECS:
        raise ValueError(f"method {name!r}: accepted: {', '.join(METHOD_NAMES)}")
    return METHOD_SPECS[name]


def searches_for(methods: list[str] | tuple[str, ...]) -> list[str]:
    """The search runs these methods need, in first-use order."""
    out: list[str] = []
    for m in methods:
        s = spec(m).search
        if s is not None and s not in out:
            out.append(s)
    return out


def yarn_alpha_at(c: int, rotary_dim: int, base: float, train_len: int) -> float:
    """YaRN's beta_slow that puts its fully interpolated pairs at i >= c (YaRN's own choice, alpha = 1,
    puts them at d_tcd): the pair index where a pair turns alpha times in L_train is c - 1/2, and
    YaRN rounds it up to c."""
    return train_len / (2 * math.pi) * base ** (-2 * (c - 0.5) / rotary_dim)


def dtcd_rule(facts: RopeFacts, target_len: int) -> RopeScaling:
    """LongRoPE2's rule at d_tcd (stage critical_dim): lambda = s from d_tcd, lambda_i = s^(i/d_tcd) below it,
    the default attention factor; short factors ones."""
    s = rope.extension_ratio(target_len, facts.train_len)
    d_tcd = rope.critical_dim(facts.rotary_dim, facts.rope_theta, facts.train_len)
    n = facts.rotary_dim // 2
    return RopeScaling.longrope2(facts, target_len, tail=[s] * (n - d_tcd), critical_dim=d_tcd)


def method_scaling(name: str, facts: RopeFacts, target_len: int,
                   search_result: Mapping[str, Any] | None = None) -> RopeScaling:
    """The RoPE scaling a method fine-tunes and ships with.

    search_result: result.json of the method's search (searched: its factors; derived: its
    critical dim). Static methods need none.
    """
    m = spec(name)
    if m.kind == "static":
        return RopeScaling.build(m.name, facts, target_len)  # type: ignore[arg-type]
    if m.kind == "rule":
        return dtcd_rule(facts, target_len)
    if search_result is None:
        raise ValueError(f"method {name!r} needs the result of search {m.search!r}")
    if m.kind == "derived":
        c = int(search_result["critical_dim"])
        if name == "ntk_rcd":
            return RopeScaling.ntk(facts, target_len, critical_dim=c)
        alpha = yarn_alpha_at(c, facts.rotary_dim, facts.rope_theta, facts.train_len)
        return RopeScaling.yarn(facts, target_len, alpha=alpha, critical_dim=c)
    long = search_result["long_factor"]
    c = search_result.get("critical_dim")
    c = int(c) if c is not None and 0 < int(c) < len(long) else None
    return RopeScaling.longrope(facts, target_len, long, float(search_result["attention_factor"]),
                                short_factor=None if m.mixed_window else long, critical_dim=c)

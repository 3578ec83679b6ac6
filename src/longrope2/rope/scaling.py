"""One representation of a RoPE scaling, and its bridges to Hugging Face transformers (v5).

`RopeScaling` holds the factors λ ("long_factor") of any method. It computes its own
inverse frequencies and cos/sin, writes itself as transformers `rope_parameters`, and
re-scales a loaded model in place. `RopeFacts` are the RoPE facts of a model's config.

transformers 5 facts this module relies on (checked on 5.x):
- `config.rope_parameters` holds rope_type, rope_theta, partial_rotary_factor and the
  type's keys (factor, short_factor, long_factor, original_max_position_embeddings,
  attention_factor, beta_fast, beta_slow). A legacy config.json `rope_scaling` wins over
  `rope_parameters` when both are present.
- Phi3 keeps `original_max_position_embeddings` at the top of the config too, and that
  copy overwrites the one in rope_parameters whenever they are standardised.
- Phi3Config only accepts rope_type default/longrope; Llama's "default" ignores
  partial_rotary_factor (Llama has no partial rotary).
- longrope caches its long inverse frequencies on the rotary module after the first long
  forward (`rotary_emb.long_inv_freq`); we replace the module so no stale cache survives.
"""

from __future__ import annotations

import math
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from longrope2.rope import factors as rope
from longrope2.rope.hf_config import GLOBAL_LAYER, RopeFacts, with_global_rope

Method = Literal["none", "pi", "ntk", "ntk_aware", "yarn", "longrope", "longrope2"]


METHODS: tuple[str, ...] = ("none", "pi", "ntk", "ntk_aware", "yarn", "longrope", "longrope2")


LONGROPE_FAMILY: tuple[str, ...] = ("longrope", "longrope2")


def _floats(x: Tensor | list[float] | tuple[float, ...]) -> tuple[float, ...]:
    return tuple(float(v) for v in torch.as_tensor(x, dtype=torch.float64).tolist())


@dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """A RoPE scaling of a model from train_len to target_len.

    long_factor λ divides the inverse frequencies (θ̂_i = θ_i / λ_i). The LongRoPE family
    switches per forward: short_factor (ones) iff max(position_ids) + 1 <= train_len, else
    long_factor. The static methods (none, pi, ntk, ntk_aware, yarn) use the same frequencies at every
    length, so for them short_factor == long_factor. attention_factor multiplies cos and sin.
    """

    method: Method
    rope_theta: float
    head_dim: int
    train_len: int
    target_len: int
    long_factor: tuple[float, ...]
    short_factor: tuple[float, ...]
    attention_factor: float = 1.0
    partial_rotary_factor: float = 1.0
    critical_dim: int | None = None
    yarn_beta: float = 32.0  # beta_fast: pairs turning more often than this within L_train keep θ
    yarn_alpha: float = 1.0  # beta_slow: pairs turning less often than this are interpolated by s

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.train_len <= 0 or self.target_len < self.train_len:
            raise ValueError(f"need 0 < train_len <= target_len, got {self.train_len}, {self.target_len}")
        n = self.n_pairs  # also validates the rotary dim
        for name in ("long_factor", "short_factor"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} must hold D = {n} factors, got {len(getattr(self, name))}")
        if self.critical_dim is not None and not 0 <= self.critical_dim < n:
            raise ValueError(f"critical_dim must be in [0, {n}), got {self.critical_dim}")
        if not self.attention_factor > 0:
            raise ValueError(f"attention_factor must be positive, got {self.attention_factor}")

    # ---- derived numbers ----

    @property
    def rotary_dim(self) -> int:
        return rope.rotary_dim(self.head_dim, self.partial_rotary_factor)

    @property
    def n_pairs(self) -> int:
        return self.rotary_dim // 2

    @property
    def s(self) -> float:
        return rope.extension_ratio(self.target_len, self.train_len)

    @property
    def switches(self) -> bool:
        """True for the LongRoPE family: short factors up to train_len, long factors beyond."""
        return self.method in LONGROPE_FAMILY

    # ---- constructors ----

    @classmethod
    def _make(cls, method: Method, facts: RopeFacts, target_len: int, long_factor: Any,
              short_factor: Any = None, **kw: Any) -> RopeScaling:
        long = _floats(long_factor)
        short = _floats(short_factor) if short_factor is not None else long
        return cls(method=method, rope_theta=float(facts.rope_theta), head_dim=facts.head_dim,
                   partial_rotary_factor=facts.partial_rotary_factor, train_len=facts.train_len,
                   target_len=int(target_len), long_factor=long, short_factor=short, **kw)

    @classmethod
    def none(cls, facts: RopeFacts, target_len: int | None = None) -> RopeScaling:
        """Original RoPE (extrapolation), window declared as target_len."""
        d = facts.rotary_dim
        return cls._make("none", facts, target_len or facts.train_len, torch.ones(d // 2))

    @classmethod
    def pi(cls, facts: RopeFacts, target_len: int) -> RopeScaling:
        s = rope.extension_ratio(target_len, facts.train_len)
        return cls._make("pi", facts, target_len, rope.pi_factors(facts.rotary_dim // 2, s))

    @classmethod
    def ntk(cls, facts: RopeFacts, target_len: int, critical_dim: int | None = None) -> RopeScaling:
        """The paper's NTK (§2.3, Liu et al.): λ_i = s^(i / d_tcd), d_tcd real-valued; critical_dim c: the
        same at the searched critical dim (NTK-rcd, Table 5), λ_i = s^(i / c)."""
        s = rope.extension_ratio(target_len, facts.train_len)
        if critical_dim is None:
            lam = rope.ntk_factors(facts.rotary_dim, facts.rope_theta, facts.train_len, s)
        else:
            lam = rope.ntk_factors_at(facts.rotary_dim // 2, s, critical_dim)
        return cls._make("ntk", facts, target_len, lam, critical_dim=critical_dim)

    @classmethod
    def ntk_aware(cls, facts: RopeFacts, target_len: int) -> RopeScaling:
        """LocalLLaMA's NTK-aware rule λ_i = s^(2i/(d-2)): not the paper's NTK, outside its tables."""
        s = rope.extension_ratio(target_len, facts.train_len)
        return cls._make("ntk_aware", facts, target_len, rope.ntk_aware_factors(facts.rotary_dim, s))

    @classmethod
    def yarn(cls, facts: RopeFacts, target_len: int, beta: float = 32.0, alpha: float = 1.0,
             attention_factor: float | None = None, critical_dim: int | None = None) -> RopeScaling:
        """YaRN; critical_dim only labels a YaRN whose alpha was chosen to put its ramp's end there."""
        s = rope.extension_ratio(target_len, facts.train_len)
        lam = rope.yarn_factors(facts.rotary_dim, facts.rope_theta, facts.train_len, s, beta, alpha)
        attn = rope.yarn_attention_factor(s) if attention_factor is None else attention_factor
        return cls._make("yarn", facts, target_len, lam, attention_factor=float(attn),
                         yarn_beta=float(beta), yarn_alpha=float(alpha), critical_dim=critical_dim)

    def ntk_theta(self) -> float:
        """The NTK base: at the critical dim when one is set (NTK-rcd), else at the real d_tcd (ntk) or at
        the last pair (ntk_aware)."""
        if self.method == "ntk_aware":
            return rope.ntk_aware_base(self.rotary_dim, self.rope_theta, self.s)
        c = self.critical_dim if self.critical_dim is not None else rope.critical_dim_real(
            self.rotary_dim, self.rope_theta, self.train_len)
        return rope.ntk_base_at(self.rotary_dim, self.rope_theta, self.s, c)

    @classmethod
    def longrope(cls, facts: RopeFacts, target_len: int, long_factor: Any,
                 attention_factor: float | None = None, short_factor: Any = None,
                 critical_dim: int | None = None) -> RopeScaling:
        """LongRoPE with a full long_factor vector (D,); short_factor defaults to ones."""
        s = rope.extension_ratio(target_len, facts.train_len)
        attn = rope.longrope_attention_factor(s, facts.train_len) if attention_factor is None else attention_factor
        short = torch.ones(facts.rotary_dim // 2) if short_factor is None else short_factor
        return cls._make("longrope", facts, target_len, long_factor, short, attention_factor=float(attn),
                         critical_dim=critical_dim)

    @classmethod
    def longrope2(cls, facts: RopeFacts, target_len: int, tail: Any, critical_dim: int,
                  attention_factor: float | None = None) -> RopeScaling:
        """LongRoPE2: searched tail λ[c:] (D-c,) and critical dim c; λ[:c] is the NTK tie to λ_c."""
        n = facts.rotary_dim // 2
        s = rope.extension_ratio(target_len, facts.train_len)
        attn = rope.longrope_attention_factor(s, facts.train_len) if attention_factor is None else attention_factor
        lam = rope.longrope2_factors(tail, critical_dim, n)
        return cls._make("longrope2", facts, target_len, lam, torch.ones(n), attention_factor=float(attn),
                         critical_dim=critical_dim)

    @classmethod
    def build(cls, method: Method, facts: RopeFacts, target_len: int, **kw: Any) -> RopeScaling:
        """Dispatch by method name (for configs): build("yarn", facts, 131072, beta=32)."""
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        return getattr(cls, method)(facts, target_len, **kw)

    # ---- own maths: inverse frequencies and cos/sin ----

    def long_inv_freq(self) -> Tensor:
        """Inverse frequencies beyond train_len (all lengths for static methods), float32 (D,).

        Each method uses the arithmetic of the transformers rope_type it is written as, so
        ours and the model's agree bit for bit (see rope module docstring).
        """
        d, base, s = self.rotary_dim, self.rope_theta, self.s
        if self.method == "none":
            return rope.inv_freq(d, base)
        if self.method == "pi":
            return rope.inv_freq(d, base) / s
        if self.method in ("ntk", "ntk_aware"):
            return rope.inv_freq(d, self.ntk_theta())
        if self.method == "yarn":
            return rope.yarn_inv_freq(d, base, self.train_len, s, self.yarn_beta, self.yarn_alpha)
        return rope.scaled_inv_freq(d, base, self.long_factor)

    def short_inv_freq(self) -> Tensor:
        """Inverse frequencies up to train_len, float32 (D,)."""
        if not self.switches:
            return self.long_inv_freq()
        return rope.scaled_inv_freq(self.rotary_dim, self.rope_theta, self.short_factor)

    def uses_long(self, position_ids: Tensor) -> bool:
        """Switch rule (docs/method.md §6): long factors iff max(position_ids) + 1 > train_len."""
        return int(position_ids.max()) + 1 > self.train_len

    def inv_freq_for(self, position_ids: Tensor) -> Tensor:
        return self.long_inv_freq() if self.uses_long(position_ids) else self.short_inv_freq()

    def cos_sin(self, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        """cos, sin float32 (..., seq, rotary_dim) for position_ids (..., seq), attention factor applied."""
        theta = self.inv_freq_for(position_ids).to(position_ids.device)  # (D,)
        angles = position_ids[..., None].float() * theta  # (..., seq, D)
        angles = torch.cat([angles, angles], dim=-1)  # (..., seq, d): rotate-half layout
        return angles.cos() * self.attention_factor, angles.sin() * self.attention_factor

    # ---- transformers bridge ----

    def to_rope_parameters(self) -> dict[str, Any]:
        """This scaling as transformers v5 `config.rope_parameters`."""
        p: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta,
                             "partial_rotary_factor": self.partial_rotary_factor}
        if self.method == "pi":
            p.update(rope_type="linear", factor=self.s)
        elif self.method in ("ntk", "ntk_aware"):
            p.update(rope_theta=self.ntk_theta())
        elif self.method == "yarn":
            p.update(rope_type="yarn", factor=self.s, original_max_position_embeddings=self.train_len,
                     attention_factor=self.attention_factor, beta_fast=self.yarn_beta, beta_slow=self.yarn_alpha)
        elif self.switches:
            # explicit attention_factor: transformers' default would be derived from `factor` instead
            p.update(rope_type="longrope", factor=self.s, original_max_position_embeddings=self.train_len,
                     attention_factor=self.attention_factor,
                     short_factor=list(self.short_factor), long_factor=list(self.long_factor))
        return p

    def update_hf_config(self, config: Any) -> Any:
        """Write this scaling into a PretrainedConfig or a config.json dict, in place; returns it. A layer-typed
        config (Gemma-3) gets it for its global layers only; the local layers keep their RoPE."""
        params = self.to_rope_parameters()
        mapping = isinstance(config, MutableMapping)
        current = config.get("rope_parameters") if mapping else getattr(config, "rope_parameters", None)
        params = with_global_rope(current or {}, params)
        if mapping:
            config.pop("rope_scaling", None)  # a legacy rope_scaling would win over rope_parameters
            config.pop("rope_theta", None)
            config["rope_parameters"] = params
            config["max_position_embeddings"] = self.target_len
            if "original_max_position_embeddings" in config:  # Phi3: this copy has priority
                config["original_max_position_embeddings"] = self.train_len
            return config
        config.rope_parameters = params  # v5: `rope_scaling` is only a deprecated alias of this
        config.max_position_embeddings = self.target_len
        if hasattr(config, "original_max_position_embeddings"):  # Phi3: this copy has priority
            config.original_max_position_embeddings = self.train_len
        return config

    def apply_to_model(self, model: nn.Module) -> nn.Module:
        """Re-scale a loaded transformers model in place (weights untouched); returns it.

        Updates the config and replaces every rotary-embedding module by a fresh one built
        from it, which also drops longrope's cached `long_inv_freq`. Then checks that the
        model's frequencies and attention factor are ours.
        """
        found = rotary_modules(model)
        self.update_hf_config(model.config)
        for name, old in found:
            if old.config is not model.config:
                self.update_hf_config(old.config)
            device = next(old.buffers()).device
            new = type(old)(config=old.config).to(device)
            parent = model.get_submodule(name.rpartition(".")[0])
            setattr(parent, name.rpartition(".")[2], new)
            self._check(RotarySlot.of(name, new))
        return model

    def _check(self, rotary: RotarySlot) -> None:
        ours = self.short_inv_freq()
        theirs = rotary.inv_freq.detach().float().cpu()
        if theirs.shape != ours.shape or not torch.allclose(theirs, ours, rtol=1e-6, atol=0):
            raise RuntimeError(f"model's inverse frequencies differ from the {self.method} scaling "
                               f"(rotary dim {self.rotary_dim}): is head_dim/partial_rotary_factor right?")
        if not math.isclose(float(rotary.attention_scaling), self.attention_factor, rel_tol=1e-9):
            raise RuntimeError(f"model's attention factor {rotary.attention_scaling} != {self.attention_factor}")


@dataclass(frozen=True)
class RotarySlot:
    """The frequencies a scaling replaces in one rotary module: its own, or in a layer-typed module (Gemma-3)
    those of its global layers (attributes prefixed ``full_attention_``)."""

    name: str
    module: nn.Module
    layer_type: str | None = None

    @classmethod
    def of(cls, name: str, module: nn.Module) -> RotarySlot:
        return cls(name, module, GLOBAL_LAYER if hasattr(module, f"{GLOBAL_LAYER}_inv_freq") else None)

    @property
    def prefix(self) -> str:
        return f"{self.layer_type}_" if self.layer_type else ""

    @property
    def inv_freq(self) -> Tensor:
        return getattr(self.module, f"{self.prefix}inv_freq")

    @property
    def rope_type(self) -> str:
        kinds = self.module.rope_type
        return kinds[self.layer_type] if self.layer_type else kinds

    @property
    def attention_scaling(self) -> float:
        return float(getattr(self.module, f"{self.prefix}attention_scaling"))

    def set_attention_scaling(self, value: float) -> None:
        setattr(self.module, f"{self.prefix}attention_scaling", float(value))


def rotary_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every transformers rotary embedding in a model (ValueError if none)."""
    found = [(name, m) for name, m in model.named_modules()
             if (hasattr(m, "original_inv_freq") and hasattr(m, "attention_scaling"))
             or hasattr(m, f"{GLOBAL_LAYER}_original_inv_freq")]
    if not found:
        raise ValueError(f"no rotary embedding module found in {type(model).__name__}")
    return found


def rotary_slots(model: nn.Module) -> list[RotarySlot]:
    """The frequencies a scaling replaces in a model, one slot per rotary module."""
    return [RotarySlot.of(name, m) for name, m in rotary_modules(model)]


__all__ = ["METHODS", "Method", "RopeScaling", "RotarySlot", "rotary_modules", "rotary_slots"]

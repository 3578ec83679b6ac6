"""`longrope2` console script.

    longrope2 critical-dim --head-dim 128 --rope-base 500000 --train-len 8192 --target-len 131072
    longrope2 critical-dim --config path/to/config.json [--train-len N] [--target-len N] [--json]
    longrope2 critical-dim --model /models/Qwen3-8B --target-len 131072
    longrope2 factors --method ntk --head-dim 128 --rope-base 500000 --train-len 8192 --target-len 131072
    longrope2 factors --method longrope2 --config config.json --search-result search/longrope2/result.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from longrope2.rope import factors as rope
from longrope2.rope import methods
from longrope2.rope.hf_config import RopeConfigError, RopeFacts, rope_facts_from_hf_config


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def _resolve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """RoPE facts from --config and/or the explicit options (options win)."""
    facts: dict[str, Any] = {}
    if getattr(args, "model", None) is not None:
        facts = _model_facts(args.model, parser)
    elif args.config is not None:
        try:
            cfg = json.loads(Path(args.config).read_text())
            if not isinstance(cfg, dict):
                raise RopeConfigError("config.json must hold a JSON object")
            f = rope_facts_from_hf_config(cfg)
        except (OSError, json.JSONDecodeError, RopeConfigError) as e:
            parser.error(f"--config {args.config}: {e}")
        facts = {"head_dim": f.head_dim, "rope_base": f.rope_theta, "partial_rotary_factor": f.partial_rotary_factor,
                 "train_len": f.train_len, "target_len": f.max_position_embeddings}
    for key in ("head_dim", "rope_base", "partial_rotary_factor", "train_len", "target_len"):
        if getattr(args, key) is not None:
            facts[key] = getattr(args, key)
    facts.setdefault("partial_rotary_factor", 1.0)
    for key in ("head_dim", "rope_base", "train_len", "target_len"):
        if facts.get(key) is None:
            parser.error(f"--{key.replace('_', '-')} is required (a positive number), or give --config config.json")
    if facts["target_len"] <= facts["train_len"]:
        where = " (from the config's max_position_embeddings)" if args.target_len is None else ""
        parser.error(f"--target-len{where} must be greater than the train length: "
                     f"got target {facts['target_len']} <= train {facts['train_len']}")
    try:
        facts["rotary_dim"] = rope.rotary_dim(facts["head_dim"], facts["partial_rotary_factor"])
    except ValueError as e:
        parser.error(f"--head-dim/--partial-rotary-factor: {e}")
    return facts


def _model_facts(path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The facts of a checkpoint folder (or a cached hub id), read and refused as experiment=extend does."""
    from longrope2.core.checkpoint import ACCEPTED_PATHS, checkpoint_facts, read_checkpoint_config
    from longrope2.core.errors import ConfigError

    try:
        hf = read_checkpoint_config(path)
        if hf is None:
            raise ConfigError(f"model.path = {path!r}: no config.json found; accepted: {ACCEPTED_PATHS}")
        f = checkpoint_facts(path, hf)
    except ConfigError as e:
        parser.error(f"--model {path}: {e}")
    max_pos = hf.get("max_position_embeddings") or (hf.get("text_config") or {}).get("max_position_embeddings")
    return {"head_dim": f["head_dim"], "rope_base": f["rope_theta"], "partial_rotary_factor": f["partial_rotary_factor"],
            "train_len": f["train_len"], "target_len": max_pos, "window_source": f["window_source"],
            "shipped_rope": f["shipped_rope"]}


def _print_human(r: dict[str, Any]) -> None:
    L_train, L = r["train_len"], r["target_len"]
    print(f"rotary dim d = {r['rotary_dim']} (head_dim {r['head_dim']} x partial_rotary_factor "
          f"{r['partial_rotary_factor']:g}), D = {r['n_pairs']} pairs, base {r['rope_base']:g}")
    print(f"L_train = {L_train}, L = {L}, s = L / L_train = {r['extension_ratio']:g}")
    print(f"d_tcd   = {r['d_tcd']}  (first pair whose period exceeds L_train)")
    print(f"d10_tcd = {r['d10_tcd']}  (first pair with fewer than 10 periods in L_train)")
    print(f"critical-dim search range: [{r['d10_tcd']}, {r['d_tcd']}]")
    print(f"attention factor sqrt(1 + ln s / ln L_train) = {r['attention_factor']:.4f}")
    print()
    print(f"{'i':>4} {'period T_i':>14} {'T_i/L_train':>12} {'T_i/L':>10}  note")
    for i, T in enumerate(r["periods"]):
        note = "d10_tcd" if i == r["d10_tcd"] else "d_tcd" if i == r["d_tcd"] else ""
        note += ("  " if note else "") + ("> L" if T > L else "> L_train" if T > L_train else "")
        print(f"{i:>4} {T:>14.1f} {T / L_train:>12.4f} {T / L:>10.4f}  {note.strip()}")


def _facts_options(p: argparse.ArgumentParser, model: bool = False) -> None:
    p.add_argument("--config", help="a Hugging Face config.json to read the RoPE facts from")
    if model:
        p.add_argument("--model", help="a checkpoint folder (or a hub id in the local cache): its config.json's RoPE "
                                       "facts, shipped scaling and pretrained window, as experiment=extend reads them")
    p.add_argument("--head-dim", type=_positive_int, help="attention head dim (positive integer)")
    p.add_argument("--rope-base", type=_positive_float, help="RoPE base / rope_theta (positive number)")
    p.add_argument("--partial-rotary-factor", type=_positive_float, help="rotated fraction of head_dim (default 1.0)")
    p.add_argument("--train-len", type=_positive_int,
                   help="pre-trained window L_train (default from the config: original_max_position_embeddings, "
                        "else max_position_embeddings)")
    p.add_argument("--target-len", type=_positive_int,
                   help="target window L > L_train (default from the config: max_position_embeddings)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="longrope2", description="LongRoPE2 context-window extension tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("critical-dim", help="critical dimensions, search range and periods of a model's RoPE",
                       description="Theoretical critical dim d_tcd, d10_tcd, search range, s, attention factor "
                                   "and the period of every RoPE dimension against L_train and L.")
    _facts_options(p, model=True)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(handler=_critical_dim, parser=p)
    f = sub.add_parser("factors", help="a method's RoPE rescaling factors for a model's RoPE facts, as JSON",
                       description="The factors λ (long_factor, short_factor), attention factor and transformers "
                                   "rope_parameters that a method fine-tunes and ships with (docs/methods.md).")
    f.add_argument("--method", required=True, choices=methods.METHOD_NAMES, metavar="METHOD",
                   help=f"one of: {', '.join(methods.METHOD_NAMES)}")
    _facts_options(f)
    f.add_argument("--search-result", help="result.json of the method's search (searched and derived methods: "
                                           "longrope, longrope2*, ntk_rcd, yarn_rcd)")
    f.set_defaults(handler=_factors, parser=f)
    return parser


def _factors(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    spec = methods.spec(args.method)
    if spec.kind in ("searched", "derived") and args.search_result is None:
        parser.error(f"--method {args.method} takes its factors from search {spec.search!r}: give "
                     "--search-result path/to/result.json (methods without a search: "
                     f"{', '.join(m for m in methods.METHOD_NAMES if methods.spec(m).kind in ('static', 'rule'))})")
    f = _resolve(args, parser)
    result = None
    if args.search_result is not None:
        try:
            result = json.loads(Path(args.search_result).read_text())
        except (OSError, json.JSONDecodeError) as e:
            parser.error(f"--search-result {args.search_result}: {e}")
    facts = RopeFacts(rope_theta=float(f["rope_base"]), head_dim=int(f["head_dim"]), train_len=int(f["train_len"]),
                      partial_rotary_factor=float(f["partial_rotary_factor"]))
    try:
        scaling = methods.method_scaling(args.method, facts, int(f["target_len"]), result)
    except (KeyError, ValueError) as e:
        parser.error(f"--search-result {args.search_result}: {e}")
    d = scaling.rotary_dim
    print(json.dumps({
        "method": args.method, "rotary_dim": d, "n_pairs": d // 2, "rope_base": facts.rope_theta,
        "train_len": facts.train_len, "target_len": scaling.target_len, "extension_ratio": scaling.s,
        "d_tcd": rope.critical_dim(d, facts.rope_theta, facts.train_len),
        "d_tcd_real": rope.critical_dim_real(d, facts.rope_theta, facts.train_len),
        "critical_dim": scaling.critical_dim, "switches": scaling.switches,
        "long_factor": list(scaling.long_factor), "short_factor": list(scaling.short_factor),
        "attention_factor": scaling.attention_factor, "rope_parameters": scaling.to_rope_parameters(),
    }))
    return 0


def _critical_dim(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    f = _resolve(args, parser)
    report = rope.critical_dim_report(f["head_dim"], f["rope_base"], f["train_len"], f["target_len"],
                                 f["partial_rotary_factor"])
    if "window_source" in f:
        report.update(model=args.model, shipped_rope=f["shipped_rope"], train_len_source=f["window_source"])
    if args.json:
        print(json.dumps(report))
        return 0
    if "window_source" in f:
        print(f"{args.model}: L_train from {f['window_source']}; shipped RoPE scaling: {f['shipped_rope'] or 'none'}"
              + (" (dropped: the analysis is of the original RoPE)" if f["shipped_rope"] else ""))
    _print_human(report)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.handler(args, args.parser)  # errors exit 2 via the subcommand's parser


if __name__ == "__main__":
    sys.exit(main())

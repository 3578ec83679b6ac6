"""Why the toy's short suite and its held-out 1x set disagree on retention (docs/toy_regime.md §6).

The short suite's `toy_short_needle` scores the continuation " " + number (lm-eval splits the space off the
context), the held-out 1x set of stage `needle_data` scores the number's tokens only. This script scores
every fine-tuned model of a run on the short suite's samples both ways, teacher-forced (= lm-eval's greedy
check), and counts the misses whose first token is the needle sentence's ":" ("... is: 12345.") instead of
the question's " " ("... is 12345"). Pooled over seeds: each model minus the base on the same samples, with
the paired bootstrap interval.

    .venv/bin/python benchmarks/toy_short_first_token.py [results/toy_seeds]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from longrope2.reporting.stats import replicated_difference

METHODS = ["none", "pi", "ntk", "yarn", "longrope", "longrope2"]


def outcomes(model_dir: Path, samples: list[tuple[list[int], list[int]]], bos: int | None, tokenizer) -> dict:
    """Per sample: the whole continuation right, the number's tokens right; and the first-token misses by token."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    whole, number, first_misses = [], [], {}
    for context, target in samples:
        ids = ([bos] if bos is not None else []) + context + target
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
        start = len(ids) - len(target) - 1
        pred = logits[start:start + len(target)].argmax(-1).tolist()  # (len(target),)
        whole.append(int(pred == target))
        number.append(int(pred[1:] == target[1:]))
        if pred[0] != target[0]:
            token = tokenizer.convert_ids_to_tokens([pred[0]])[0]
            first_misses[token] = first_misses.get(token, 0) + 1
    return {"whole": whole, "number": number, "first_misses": first_misses}


def main(run: Path) -> None:
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(1)
    rows = [json.loads(line) for line in (run / "eval_data" / "short" / "toy_short_needle.jsonl").open()]
    tokenizer = AutoTokenizer.from_pretrained(run / "base_model")
    samples = [(tokenizer(r["context"], add_special_tokens=False)["input_ids"],
                tokenizer(r["target"], add_special_tokens=False)["input_ids"]) for r in rows]
    seeds = sorted(int(p.name[4:]) for p in run.glob("seed*") if (p / "train").is_dir())
    base = outcomes(run / "base_model", samples, tokenizer.bos_token_id, tokenizer)
    print(f"{len(samples)} samples per model, seeds {seeds}; continuation = ' ' + number")
    print(f"{'model':<10} {'seed':>4} {'whole':>6} {'number':>7}  first-token misses")
    print(f"{'base':<10} {'':>4} {sum(base['whole']) / len(samples):>6.3f} {sum(base['number']) / len(samples):>7.3f}"
          f"  {base['first_misses']}")
    per_seed = {m: {"whole": [], "number": []} for m in METHODS}
    for seed in seeds:
        for method in METHODS:
            o = outcomes(run / f"seed{seed}" / "train" / method / "model", samples, tokenizer.bos_token_id, tokenizer)
            per_seed[method]["whole"].append(o["whole"])
            per_seed[method]["number"].append(o["number"])
            print(f"{method:<10} {seed:>4} {sum(o['whole']) / len(samples):>6.3f} "
                  f"{sum(o['number']) / len(samples):>7.3f}  {o['first_misses']}")
    print("\nover seeds, model - base on the same samples, each sample and seed counted once [95 % interval]:")
    for method in METHODS:
        for kind in ("whole", "number"):
            d = replicated_difference([(o, base[kind]) for o in per_seed[method][kind]], shared_items=True)
            print(f"{method:<10} {kind:<7} {d.diff:+.3f} [{d.low:+.3f}, {d.high:+.3f}] n={d.n} p={d.p_value:.3g}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "results/toy_seeds"))

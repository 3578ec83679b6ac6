"""Wall time of the full evaluation of one model variant: every suite of `eval.suites`, one after the
other, as `snakemake --cores 1` would run them under eval.jobs = per_suite (each a fresh
`python -m longrope2.evaluate`), then all of them in one process (eval.jobs = per_variant).

Needs the outputs of a finished run (eval_data and the variant's model), e.g. after `make run`:

    python benchmarks/eval_cost.py --variant longrope2            # the toy
    python benchmarks/eval_cost.py --variant base -- experiment=toy eval.batch_size=4

Prints one line per suite, the total, and the one-process total; the suites' outputs are rewritten
in place.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from longrope2.core.config import compose_config


def timed_evaluate(overrides: list[str], variant: str, suite: str) -> tuple[float, str]:
    """Wall seconds of one `python -m longrope2.evaluate` job and its last printed line."""
    cmd = [sys.executable, "-m", "longrope2.evaluate", *overrides, "tracking.enabled=false",
           f"eval.variant={variant}", f"eval.suite={suite}"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"{suite} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return seconds, proc.stdout.strip().splitlines()[-1][:150]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="longrope2")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides (after --)")
    args = parser.parse_args()
    cfg = compose_config(args.overrides)
    times = {}
    for suite in cfg.eval.suites:
        times[suite], last_line = timed_evaluate(args.overrides, args.variant, suite)
        print(f"{suite:10s} {times[suite]:6.1f} s   {last_line}", flush=True)
    print(f"{'total':10s} {sum(times.values()):6.1f} s   ({cfg.experiment_name}, variant {args.variant}, "
          "a process per suite)")
    suites = "[" + ",".join(cfg.eval.suites) + "]"
    seconds, _ = timed_evaluate(args.overrides, args.variant, suites)
    print(f"{'one job':10s} {seconds:6.1f} s   (eval.suite={suites}: one process, one model load)")


if __name__ == "__main__":
    main()

"""Write environment.yml's pip pins from requirements.lock (`make lock` runs it after pip-compile).

The conda environment installs the same versions as `make run` / `make test`; conda's pip section cannot
check hashes beside an editable install, so it lists the pins without them. torch is pinned without
the lock's local label (+cpu): on this kind of machine pip finds the CPU build on disk, on a GPU
machine the CUDA build of the same release. tests/test_lock.py checks that the two files agree.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK, ENVIRONMENT = ROOT / "requirements.lock", ROOT / "environment.yml"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+?)(?:\s|$)")

HEADER = """\
# conda env create -f environment.yml && conda activate longrope2
# Generated from requirements.lock by `make lock` (docs/sync_environment.py): the same versions as
# `make run` / `make test`. conda-forge only (the `pytorch` channel stopped at 2.5); torch comes from
# pip, the CPU build on this kind of machine and the CUDA build of the same release on a GPU machine.
name: longrope2
channels:
  - conda-forge
dependencies:
  - python=3.11
  - pip
  - pip:
"""


def lock_pins(text: str) -> dict[str, str]:
    """name -> version of every `name==version` line of a pip-compile lock."""
    return {m[1].lower(): m[2] for line in text.splitlines() if (m := PIN.match(line))}


def conda_pin(name: str, version: str) -> str:
    return f"{name}=={version.split('+')[0] if name == 'torch' else version}"


def environment_yml(pins: dict[str, str]) -> str:
    lines = [f"      - {conda_pin(n, v)}" for n, v in sorted(pins.items()) if n not in ("pip", "setuptools")]
    return HEADER + "\n".join(lines) + "\n      - -e .[dev]\n"


def main() -> int:
    pins = lock_pins(LOCK.read_text())
    if "torch" not in pins:
        sys.exit(f"{LOCK}: no torch pin; regenerate it with `make lock`")
    ENVIRONMENT.write_text(environment_yml(pins))
    print(f"{ENVIRONMENT.name}: {len(pins)} pins from {LOCK.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

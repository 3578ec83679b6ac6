"""Bring the README's headline in step with a default run's report (`make readme`, after `make run`).

Copies <run>/report/claims.md to tests/golden/toy_claims.md and <run>/report/claims.png to
docs/figures/claims.png, and writes the claims table between the README's markers. tests/test_readme.py
checks that the README's block is exactly what this script writes from the golden file.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- claims:begin -->", "<!-- claims:end -->"
GOLDEN = ROOT / "tests" / "golden" / "toy_claims.md"
FIGURE = ROOT / "docs" / "figures" / "claims.png"


def claims_table(claims_md: str) -> str:
    """The table of a report's claims.md (its lines that start with '|')."""
    rows = [line.strip() for line in claims_md.splitlines() if line.strip().startswith("|")]
    if len(rows) < 3:
        raise ValueError("claims.md holds no claims table (expected a header, a rule and at least one row)")
    return "\n".join(rows)


def splice(readme: str, table: str) -> str:
    """The README with `table` between its claims markers (each marker exactly once)."""
    if readme.count(BEGIN) != 1 or readme.count(END) != 1 or readme.index(BEGIN) > readme.index(END):
        raise ValueError(f"README.md needs {BEGIN} and then {END}, once each")
    head, rest = readme.split(BEGIN)
    _, tail = rest.split(END)
    return f"{head}{BEGIN}\n{table}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=str(ROOT / "results" / "toy"), help="the default run's out_dir")
    args = parser.parse_args(argv)
    report = Path(args.run) / "report"
    if not (report / "claims.md").is_file():
        print(f"error: {report / 'claims.md'} does not exist: run `make run` first", file=sys.stderr)
        return 1
    claims = (report / "claims.md").read_text()
    readme = ROOT / "README.md"
    readme.write_text(splice(readme.read_text(), claims_table(claims)))
    GOLDEN.write_text(claims)
    if (report / "claims.png").is_file():
        shutil.copyfile(report / "claims.png", FIGURE)
    print(f"README.md, {GOLDEN.relative_to(ROOT)} and {FIGURE.relative_to(ROOT)} now quote {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

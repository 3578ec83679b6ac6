"""The README's headline table is the default run's report, not hand-typed numbers."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _table(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip().startswith("|")]


def test_readme_claims_table_is_the_recorded_report():
    """tests/golden/toy_claims.md is results/toy/report/claims.md of `make run` (seed 0). After a change that
    moves the default run's numbers: copy that file there and its table into the README between the markers."""
    readme = (ROOT / "README.md").read_text()
    assert readme.count("<!-- claims:begin -->") == 1 and readme.count("<!-- claims:end -->") == 1
    block = readme.split("<!-- claims:begin -->")[1].split("<!-- claims:end -->")[0]
    golden = (ROOT / "tests" / "golden" / "toy_claims.md").read_text()
    assert golden.startswith("**The paper's claims in this run**")
    assert _table(block) == _table(golden) and len(_table(golden)) >= 2 + 10

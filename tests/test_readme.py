"""The README: its headline table is the default run's report (generated, not hand-typed), it stays a short
newcomer's page, and every link in it and in docs/ points at a file of the repository."""

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("sync_readme", ROOT / "docs" / "sync_readme.py")
sync_readme = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sync_readme)


def test_readme_claims_block_is_what_make_readme_writes_from_the_recorded_report():
    """tests/golden/toy_claims.md is results/toy/report/claims.md of `make run` (seed 0). After a change that
    moves the default run's numbers: `make run && make readme`."""
    readme = (ROOT / "README.md").read_text()
    golden = (ROOT / "tests" / "golden" / "toy_claims.md").read_text()
    assert golden.startswith("**The paper's claims in this run**")
    table = sync_readme.claims_table(golden)
    assert len(table.splitlines()) >= 2 + 10
    assert sync_readme.splice(readme, table) == readme


def test_splice_replaces_only_the_block_and_refuses_missing_markers():
    text = "intro\n<!-- claims:begin -->\n| old |\n<!-- claims:end -->\nrest\n"
    assert sync_readme.splice(text, "| a |\n|---|\n| 1 |") == (
        "intro\n<!-- claims:begin -->\n| a |\n|---|\n| 1 |\n<!-- claims:end -->\nrest\n")
    with pytest.raises(ValueError, match="README.md needs <!-- claims:begin --> and then <!-- claims:end -->"):
        sync_readme.splice("no markers", "| a |")
    with pytest.raises(ValueError, match="holds no claims table"):
        sync_readme.claims_table("**The paper's claims in this run**\n\nnothing ran\n")


def test_readme_is_a_short_page_and_points_inside_the_repository():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 400
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = page.read_text()
        assert "../shared" not in text and "LONGROPE2.md" not in text, page
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            assert (page.parent / target).exists(), f"{page.relative_to(ROOT)} links to a missing {target}"


def test_nothing_in_the_repository_cites_a_document_outside_it():
    """Docstrings and comments cite docs/method.md or the paper, never the team's notes outside the repository."""
    outside = ("../shared", "LONGROPE2.md", "spec §")
    files = [ROOT / "README.md", ROOT / "Makefile", ROOT / "pyproject.toml", ROOT / "Snakefile"]
    searched = {"src": ["*.py", "*.yaml"], "conf": ["*.yaml"], "workflow": ["*.smk", "*.json", "*.rst", "*.yaml"],
                "tests": ["*.py"], "docs": ["*.md", "*.py"], "benchmarks": ["*.py"]}
    for folder, patterns in searched.items():
        for pattern in patterns:
            files += sorted((ROOT / folder).rglob(pattern))
    cited = [(f.relative_to(ROOT), s) for f in files if f.name != "test_readme.py"
             for s in outside if s in f.read_text(errors="replace")]
    assert len(files) > 100 and not cited, cited

"""Atomic outputs: a failed stage leaves neither the output nor its scratch folder."""

import pytest

from longrope2.core.outputs import atomic_dir


def test_atomic_dir_replaces_only_on_success_and_cleans_up_on_failure(tmp_path):
    out = tmp_path / "stage"
    with atomic_dir(out) as scratch:
        (scratch / "a.txt").write_text("first")
    assert (out / "a.txt").read_text() == "first"
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_dir(out) as scratch:
            (scratch / "a.txt").write_text("second")
            raise RuntimeError("killed")
    assert (out / "a.txt").read_text() == "first"  # the last good output stays
    assert not (tmp_path / "stage.partial").exists()

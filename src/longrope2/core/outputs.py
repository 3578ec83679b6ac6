"""Write stage outputs atomically: a killed stage never leaves a file Snakemake takes as done."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a scratch folder that replaces `path` only when the block finishes."""
    path = Path(path)
    scratch = path.with_name(path.name + ".partial")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        yield scratch
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)  # a failed stage leaves nothing behind
        raise
    shutil.rmtree(path, ignore_errors=True)
    scratch.rename(path)


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a scratch file path that is renamed onto `path` when the block finishes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(f".{path.name}.partial{path.suffix}")
    yield scratch
    os.replace(scratch, path)


def write_json(path: str | Path, data: Any) -> None:
    with atomic_file(path) as scratch:
        scratch.write_text(json.dumps(data, indent=2) + "\n")

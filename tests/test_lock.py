"""The locked CPU environment: requirements.lock pins every package with hashes, satisfies
pyproject.toml's ranges, environment.yml carries the same pins, and this very environment (made by
`make test` / `make run`) is the locked one."""

from __future__ import annotations

import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

import pytest
from conftest import REPO
from packaging.requirements import Requirement
from packaging.version import Version

sys.path.insert(0, str(REPO / "docs"))
import sync_environment  # noqa: E402  (docs/ is not a package)

LOCK = (REPO / "requirements.lock").read_text()
PINS = sync_environment.lock_pins(LOCK)


def _requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]]


def test_every_locked_package_has_hashes():
    blocks = re.split(r"\n(?=[A-Za-z0-9])", LOCK)  # a pin line starts a block, its hash lines follow
    pinned = [b for b in blocks if sync_environment.PIN.match(b)]
    assert len(pinned) == len(PINS) > 100
    for block in pinned:
        assert "--hash=sha256:" in block, block.splitlines()[0]


def test_the_lock_satisfies_the_package_ranges():
    for req in _requirements():
        name = req.name.lower()
        assert name in PINS, f"{req} is not in requirements.lock: run `make lock`"
        assert req.specifier.contains(Version(PINS[name]), prereleases=True), (str(req), PINS[name])
    assert PINS["torch"].endswith("+cpu")  # never a CUDA build on a CPU machine


def test_environment_yml_carries_the_locks_pins():
    expected = sync_environment.environment_yml(PINS)
    assert (REPO / "environment.yml").read_text() == expected, "environment.yml is stale: run `make lock`"


@pytest.mark.skipif(not (REPO / ".venv").exists() or Path(sys.prefix).resolve() != (REPO / ".venv").resolve(),
                    reason="runs in the environment that `make test` installs from the lock")
def test_this_environment_is_the_locked_one():
    installed = {d.metadata["Name"].lower().replace("_", "-"): d.version for d in importlib.metadata.distributions()}
    drift = {name: (version, installed.get(name)) for name, version in PINS.items()
             if name not in ("pip", "setuptools") and installed.get(name) != version}
    assert not drift, f"installed versions differ from requirements.lock (pin, installed): {drift}"

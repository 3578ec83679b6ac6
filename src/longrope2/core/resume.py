"""One resume scheme for the long stages (pretrain, search, train).

A stage's resumable state lives in ``<parent>/checkpoints/<name>-<fingerprint>/``: the fingerprint
hashes everything that shapes the result (settings, seed, input files), never what only monitors it
(threads, logging). A rerun with the same fingerprint resumes from the folder; a changed one starts
fresh in a new folder, and the stale folders of that name are removed with a line saying so. A state
file whose version or fingerprint disagrees with the folder's (written by another release) is ignored
the same way: fresh start, never a crash and never a silent mix. Each stage deletes its folder once its
outputs are written.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from longrope2.core.outputs import atomic_file

STATE_VERSION = 1
KEY_CHARS = 16  # hex digits of the fingerprint


def fingerprint(data: Any, files: Iterable[Path] = ()) -> str:
    """sha256 of ``data`` as canonical JSON, then of each file's bytes: 16 hex digits."""
    digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode())
    for path in files:
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()[:KEY_CHARS]


def state_path(parent: Path, name: str, key: str) -> Path:
    """``<parent>/checkpoints/<name>-<key>``: where the state of fingerprint ``key`` lives (nothing created)."""
    return Path(parent) / "checkpoints" / f"{name}-{key}"


def open_state_dir(folder: Path) -> Path:
    """Create ``folder`` (a :func:`state_path`), removing the folders of the same name with another fingerprint."""
    name, _, key = folder.name.rpartition("-")
    for stale in folder.parent.glob(f"{name}-*"):
        suffix = stale.name[len(name) + 1 :]
        if stale != folder and stale.is_dir() and len(suffix) == KEY_CHARS and "-" not in suffix:
            print(f"{stale}: state of another configuration (fingerprint {suffix}, now {key}): removed, starting fresh")
            shutil.rmtree(stale, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def load_json_state(path: Path, key: str) -> dict[str, Any] | None:
    """The state saved at ``path`` for fingerprint ``key``; None (start fresh) when absent or not of ``key``."""
    if not path.is_file():
        return None
    state = json.loads(path.read_text())
    if not matches(state, key):
        print(f"{path}: state of another version or configuration: ignored, starting fresh")
        return None
    return state


def save_json_state(path: Path, state: dict[str, Any]) -> None:
    """Written whole or not at all (a kill mid-write keeps the previous state)."""
    with atomic_file(path) as scratch:
        scratch.write_text(json.dumps(state))


def matches(saved: dict[str, Any], key: str) -> bool:
    """Whether a state saved in another format (e.g. a torch checkpoint) holds this version and fingerprint."""
    return saved.get("version") == STATE_VERSION and saved.get("fingerprint") == key

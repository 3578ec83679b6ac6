"""Corpora read through Hugging Face ``datasets``: a hub id or a local dataset folder.

One spec for ``data.corpus`` (``source: datasets``) and every ``data.train_set.corpora`` entry:

- ``path``: a hub dataset id (``emozilla/pg19``) or a local folder: written by ``save_to_disk``
  (``state.json`` / ``dataset_dict.json``), or of parquet / arrow / json(l) shards (split from the file
  names, as ``load_dataset(folder)`` reads them);
- ``config``, ``split`` (default ``train``), ``data_dir``, ``revision``: as ``load_dataset`` takes them;
- ``text_field`` (default ``text``): the column holding a document;
- ``streaming`` (default false): read the split as a stream (nothing copied into the cache first).

Offline (``HF_HUB_OFFLINE`` set, or the hub endpoint unreachable) a hub id loads from the Hugging Face
cache only and fails at once, naming the override that points at a local copy (no network retries).
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from longrope2.core.errors import ConfigError

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


SHARD_SUFFIXES = (".parquet", ".arrow", ".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst")


SAVED_MARKERS = ("state.json", "dataset_dict.json")


LOCAL_FORMS = "a local copy: a folder of parquet / arrow / jsonl shards or one written by save_to_disk"


@dataclass(frozen=True)
class DatasetSpec:
    """Where a corpus comes from; ``key`` is its config key (``data.train_set.corpora[2]``) for messages."""

    path: str
    key: str
    config: str | None = None
    split: str = "train"
    data_dir: str | None = None
    revision: str | None = None
    text_field: str = "text"
    streaming: bool = False

    @property
    def label(self) -> str:
        """``emozilla/pg19 (split validation)``: the dataset as messages name it."""
        parts = [f"config {self.config}"] if self.config else []
        parts += [f"data_dir {self.data_dir}"] if self.data_dir else []
        parts += [f"split {self.split}"] + (["streaming"] if self.streaming else [])
        return f"{self.path} ({', '.join(parts)})"

    def override(self, name: str, value: str) -> str:
        """The Hydra override that sets key ``name`` (list items by dotted index: corpora.2.path=...)."""
        key = re.sub(r"\[(\d+)\]", r".\1", self.key)
        return f"{key}.{name}={value}"

    @property
    def is_hub_id(self) -> bool:
        return not Path(self.path).exists() and HUB_ID.fullmatch(self.path) is not None \
            and not self.path.startswith(".")


def spec_from(node: Mapping[str, Any], key: str) -> DatasetSpec:
    """The spec of a config node (data.corpus or one corpora entry); absent keys take their defaults."""
    if node.get("path") is None:
        raise ConfigError(f"{key}.path = null: accepted: a hub dataset id (e.g. HuggingFaceFW/fineweb-edu) or "
                          f"{LOCAL_FORMS}")

    def opt(name: str) -> str | None:
        value = node.get(name)
        return None if value is None else str(value)

    return DatasetSpec(str(node["path"]), key, opt("config"), str(node.get("split") or "train"), opt("data_dir"),
                       opt("revision"), str(node.get("text_field") or "text"), bool(node.get("streaming", False)))


def is_dataset_folder(folder: Path) -> bool:
    """A folder ``datasets`` reads (save_to_disk, or parquet / arrow shards at any depth)."""
    if any((folder / m).is_file() for m in SAVED_MARKERS):
        return True
    return any(f.name.endswith((".parquet", ".arrow")) for f in folder.rglob("*") if f.is_file())


def document_files(folder: Path, patterns: tuple[str, ...]) -> list[Path]:
    """The files of a folder of documents (docs/data.md, kind 1): ``patterns`` at its top, in order; [] when
    there are none or ``datasets`` reads the folder (is_dataset_folder)."""
    found = [f for pattern in patterns for f in sorted(folder.glob(pattern))]
    return [] if not found or is_dataset_folder(folder) else found


def has_shards(folder: Path) -> bool:
    return any(f.name.endswith(SHARD_SUFFIXES) for f in folder.rglob("*") if f.is_file())


def hub_reachable(timeout: float = 3.0) -> bool:
    """False offline (HF_HUB_OFFLINE) or when the hub endpoint does not answer within ``timeout`` seconds."""
    import datasets
    from huggingface_hub import constants

    if datasets.config.HF_HUB_OFFLINE or constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=timeout).close()
    except OSError:
        return False
    return True


@contextmanager
def _offline() -> Iterator[None]:
    # Without a network `datasets` retries for ~25 s before failing; offline mode reads the cache only.
    import datasets
    from huggingface_hub import constants

    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


def open_dataset(spec: DatasetSpec) -> Any:
    """The split as a ``datasets.Dataset`` (an ``IterableDataset`` when streaming); ConfigError when it
    cannot be opened, naming the dataset and what to set."""
    import datasets

    local = Path(spec.path)
    if local.exists() and not local.is_dir():
        raise ConfigError(f"{spec.key}.path = {spec.path!r} is not a folder; accepted: a hub dataset id or "
                          f"{LOCAL_FORMS}")
    if not local.exists() and not spec.is_hub_id:
        raise ConfigError(f"{spec.key}.path = {spec.path!r}: no such folder and not a hub dataset id; accepted: a "
                          f"hub dataset id (owner/name) or {LOCAL_FORMS}")
    if local.is_dir() and any((local / m).is_file() for m in SAVED_MARKERS):
        saved = datasets.load_from_disk(str(local))
        if isinstance(saved, datasets.DatasetDict):
            if spec.split not in saved:
                raise ConfigError(f"{spec.key}.split = {spec.split!r}: dataset {spec.path} has no such split; "
                                  f"accepted: {', '.join(saved)}")
            saved = saved[spec.split]
        return saved.to_iterable_dataset() if spec.streaming else saved
    if local.is_dir() and not has_shards(local):
        raise ConfigError(f"{spec.key}.path = {spec.path!r}: no parquet / arrow / json(l) shards in the folder; "
                          f"accepted: {LOCAL_FORMS}")
    kwargs = {"split": spec.split, "data_dir": spec.data_dir, "revision": spec.revision, "streaming": spec.streaming}
    offline = spec.is_hub_id and not hub_reachable()
    try:
        if offline:
            with _offline():
                return datasets.load_dataset(spec.path, spec.config, **kwargs)
        return datasets.load_dataset(spec.path, spec.config, **kwargs)
    except (ConnectionError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as err:
        if not spec.is_hub_id:
            raise ConfigError(f"{spec.key}.path = {spec.path!r}: {err}") from None
        name = spec.path.rsplit("/", 1)[-1].lower()
        why = ("the hub is not reachable (offline) and the Hugging Face cache holds no copy" if offline
               else f"the hub refused it ({err})")
        raise ConfigError(f"{spec.key}.path = {spec.path!r}: dataset {spec.label}: {why}; accepted: {LOCAL_FORMS}, "
                          f"with the override {spec.override('path', f'/path/to/local/{name}')} (docs/data.md: "
                          "local copies)") from None
    except RuntimeError as err:  # datasets >= 4 refuses repositories that are loading scripts
        revision = spec.override("revision", "refs/convert/parquet")
        raise ConfigError(f"{spec.key}.path = {spec.path!r}: {err}; accepted: {LOCAL_FORMS} (docs/data.md: local "
                          f"copies), or +{revision} where the hub converted it") from None
    except ValueError as err:  # an unknown split or config, or a split without rows
        if "corresponds to no data" in str(err):
            raise _empty(spec) from None
        raise ConfigError(f"{spec.key}: dataset {spec.label}: {err}") from None


def _empty(spec: DatasetSpec) -> ConfigError:
    return ConfigError(f"{spec.key}.split = {spec.split!r}: dataset {spec.label} has 0 documents; accepted: a "
                       "non-empty split")


def check_text_field(ds: Any, spec: DatasetSpec) -> None:
    """The split is not empty and has ``text_field`` (checked on the schema, or the first document of a stream)."""
    fields = ds.column_names
    if not spec.streaming and len(ds) == 0:
        raise _empty(spec)
    if fields is None or spec.streaming:
        first = next(iter(ds), None)
        if first is None:
            raise _empty(spec)
        fields = list(first)
    if spec.text_field not in fields:
        raise ConfigError(f"{spec.key}.text_field = {spec.text_field!r}: dataset {spec.label} has no such field; "
                          f"accepted: one of its fields: {', '.join(fields)}")


def open_checked(spec: DatasetSpec) -> Any:
    ds = open_dataset(spec)
    check_text_field(ds, spec)
    return ds


def texts(ds: Any, spec: DatasetSpec) -> Iterator[str]:
    """Every document of the split in its order (stripped; empty ones included, for the caller to count)."""
    column = ds.select_columns([spec.text_field])
    if spec.streaming:
        for row in column:
            yield str(row[spec.text_field] or "").strip()
        return
    for batch in column.iter(batch_size=256):
        for text in batch[spec.text_field]:
            yield str(text or "").strip()


def named_documents(spec: DatasetSpec) -> list[tuple[str, str]]:
    """data.corpus from a dataset: (``path:split[i]``, text) for every non-empty document, in dataset order."""
    ds = open_checked(spec)
    docs = [(f"{spec.path}:{spec.split}[{i}]", t) for i, t in enumerate(texts(ds, spec)) if t]
    if not docs:
        raise ConfigError(f"{spec.key}.split = {spec.split!r}: dataset {spec.label} has only empty "
                          f"{spec.text_field!r} fields; accepted: a split with text")
    return docs

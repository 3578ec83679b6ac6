"""Tokenizing corpora in worker processes (one tokenizer per worker, batches submitted ahead)."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
from collections.abc import Callable, Iterator
from typing import Any

from omegaconf import DictConfig


def encode_texts(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, no special tokens: the fast tokenizer's batch encoding (Rust, on every core),
    the same ids as ``tokenizer(text, add_special_tokens=False)`` text by text."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)  # _fast: no offsets computed
    return [e.ids for e in encode(texts, add_special_tokens=False)]


_WORKER_TOKENIZER: Any = None


def _init_worker(tokenizer: Any) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tokenizer


def _encode_in_worker(texts: list[str]) -> list[list[int]]:
    return encode_texts(_WORKER_TOKENIZER, texts)


@contextlib.contextmanager
def tokenizer_pool(tokenizer: Any, num_proc: int) -> Iterator[Any]:
    """num_proc > 1: a pool of that many tokenizer processes, one Rust thread each; else None (encode here)."""
    if num_proc <= 1:
        yield None
        return
    methods = mp.get_all_start_methods()
    ctx = mp.get_context("fork" if "fork" in methods else "spawn")
    # One Rust thread per worker: num_proc processes already use the cores (and fork after the parent's
    # tokenizer threads ran would make tokenizers warn and switch them off anyway).
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        pool = ctx.Pool(num_proc, initializer=_init_worker, initargs=(tokenizer,))
    finally:
        if saved is None:
            os.environ.pop("TOKENIZERS_PARALLELISM")
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved
    with pool:
        yield pool


def submit_texts(tokenizer: Any, pool: Any, texts: list[str]) -> Callable[[], list[list[int]]]:
    """The token ids of ``texts``, to fetch with the returned call: in the pool (started now), or here (pool None)."""
    if pool is None:
        ids = encode_texts(tokenizer, texts)
        return lambda: ids
    return pool.apply_async(_encode_in_worker, (texts,)).get


def _specials(tokenizer: Any) -> int:
    return int(tokenizer.bos_token_id is not None) + int(tokenizer.eos_token_id is not None)


def num_processes(cfg: DictConfig) -> int:
    """data.train_set.num_proc, or the rule's cpus (resources.train_data.cpus) when null or absent."""
    n = cfg.data.train_set.get("num_proc")
    return int(n if n is not None else cfg.resources.train_data.cpus)

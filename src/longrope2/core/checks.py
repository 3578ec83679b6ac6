"""Config checks that relate several keys (the schema checks keys one by one)."""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping, Sequence
from typing import Any


def semantic_errors(data: Mapping[str, Any]) -> list[str]:
    """Checks that relate several keys (the schema checks keys one by one)."""
    lines = []
    model = data["model"]
    if data["target_len"] <= model["train_len"]:
        lines.append(
            f"target_len = {data['target_len']}: accepted: a length > model.train_len "
            f"= {model['train_len']} (the extended window must exceed the pretrained one)"
        )
    if not model["pretrain"]["enabled"] and not model.get("path"):
        lines.append(
            f"model.path = {json.dumps(model.get('path'))}: experiment "
            f"'{data['experiment_name']}' needs a model location: a local folder or a hub id "
            "(e.g. model.path=meta-llama/Meta-Llama-3-8B)"
        )
    rotary = model["head_dim"] * model["partial_rotary_factor"]
    if abs(rotary - round(rotary)) > 1e-9 or round(rotary) % 2:
        lines.append(
            f"model.partial_rotary_factor = {model['partial_rotary_factor']}: accepted: a factor "
            f"that makes head_dim x factor (= {rotary:g}) an even integer"
        )
    if data["run_seed"] is not None and data["run_seed"] not in data["seeds"]:
        lines.append(f"run_seed = {data['run_seed']}: accepted: null or one of seeds = {json.dumps(data['seeds'])}")
    free = [x for x in data["eval"]["training_free_suites"] if x not in data["eval"]["suites"]]
    if free:
        lines.append(f"eval.training_free_suites = {json.dumps(data['eval']['training_free_suites'])}: accepted: "
                     f"suites of eval.suites ({', '.join(data['eval']['suites'])})")
    if not data["finetune"] and not data["eval"]["training_free_suites"]:
        lines.append("finetune = false: accepted with eval.training_free_suites set (e.g. [niah]): without "
                     "fine-tuning the training-free evaluations are the experiment's results")
    lines += _search_errors(data)
    lines += _length_mix_errors(data)
    if data["data"]["train_set"]["source"] == "corpora":
        lines += corpus_bucket_errors(data["data"]["train_set"]["corpora"], len(data["train"]["length_mix"]))
    lines += _train_errors(data)
    lines += _nodes_errors(data)
    lines += _regime_errors(data)
    lines += _backend_errors(data)
    return lines


def finetune_tokens(data: Mapping[str, Any]) -> int:
    """Tokens the fine-tuning trains on: train.length_mix's budgets x train.epochs."""
    return int(sum(b["tokens"] for b in data["train"]["length_mix"]) * data["train"]["epochs"])


def min_pretrain_tokens(data: Mapping[str, Any]) -> int | None:
    """The fewest tokens the base was pretrained on: model.pretrain_tokens (a real model's published figure), or
    for the toy the earliest stop of its pretraining (the first held-out check at or after the copy warm-up,
    longrope2.toy) x batch_size x model.train_len; None when neither is known."""
    model = data["model"]
    if model.get("pretrain_tokens") is not None:
        return int(model["pretrain_tokens"])
    p = model["pretrain"]
    if not p["enabled"]:
        return None
    first_check = max(-(-p["warmup_copy_steps"] // p["eval_every"]), 1) * p["eval_every"]
    return min(first_check, p["max_steps"]) * p["batch_size"] * model["train_len"]


def _backend_errors(data: Mapping[str, Any]) -> list[str]:
    """eval.backend = vllm: GPUs for the evaluate rule, and jobs of one lm-eval suite (job_error)."""
    e = data["eval"]
    if e.get("backend", "hf") != "vllm":
        return []
    gpus = data["resources"]["evaluate"]["gpu"]
    lines = [] if gpus >= 1 else [f"resources.evaluate.gpu = {gpus} with eval.backend = vllm: accepted: >= 1"]
    jobs = [("eval.suites", list(e["suites"]))] if e["jobs"] == "per_variant" else []
    for key, suites in [*jobs, ("eval.training_free_suites", list(e["training_free_suites"]))]:
        error = job_error("vllm", suites, key)
        lines += [error] if error else []
    return lines


def _regime_errors(data: Mapping[str, Any]) -> list[str]:
    """The paper's regime: fine-tuning is a small share of pretraining (10B of 15T tokens, ~0.07 %), so the
    starting factors, not a retraining, decide the outcome."""
    share = data["train"].get("max_pretrain_share")
    if share is None:
        return []
    base = min_pretrain_tokens(data)
    if base is None:
        return [f"train.max_pretrain_share = {share}: accepted: null, or a share with model.pretrain_tokens set "
                "(the base's pretraining tokens, to check the fine-tuning budget against)"]
    tokens = finetune_tokens(data)
    if tokens > share * base:
        return [f"train.length_mix = {tokens} fine-tuning tokens: accepted: at most train.max_pretrain_share = "
                f"{share} x {base} pretraining tokens = {int(share * base)} (the paper's regime: fine-tuning is a "
                "small share of pretraining)"]
    return []


def _length_mix_errors(data: Mapping[str, Any]) -> list[str]:
    mix, train_len = data["train"]["length_mix"], data["model"]["train_len"]
    bounds = [b["max_len"] for b in mix]
    if bounds[0] != train_len:
        return [(f"train.length_mix = {json.dumps(mix)}: accepted: a first bucket with max_len = "
                 f"model.train_len = {train_len} (it makes the short rows), then increasing max_len")]
    if any(b <= a for a, b in itertools.pairwise(bounds)):
        return [f"train.length_mix = {json.dumps(mix)}: accepted: strictly increasing max_len (got {bounds})"]
    return []


def corpus_bucket_errors(corpora: Sequence[Mapping[str, Any]], buckets: int) -> list[str]:
    """data.train_set.corpora[i].buckets: indices of train.length_mix's buckets (absent or null: every bucket),
    and every bucket fed by some corpus (train_data draws a bucket's documents from the corpora that feed it)."""
    lines, fed = [], set()
    accepted = (f"accepted: null (every bucket) or a non-empty list of bucket indices of train.length_mix, "
                f"0 ... {buckets - 1} ({buckets} buckets; 0 is the short one, max_len = model.train_len)")
    for i, c in enumerate(corpora):
        chosen = c.get("buckets")
        if chosen is None:
            fed.update(range(buckets))
        elif not chosen or any(not 0 <= b < buckets for b in chosen):
            lines.append(f"data.train_set.corpora.{i}.buckets = {json.dumps(list(chosen))} (corpus "
                         f"{c.get('name')!r}): {accepted}")
        else:
            fed.update(chosen)
    unfed = [b for b in range(buckets) if b not in fed]
    if corpora and unfed and not lines:
        given = ", ".join(f"{c.get('name')}: {json.dumps(None if c.get('buckets') is None else list(c['buckets']))}"
                          for c in corpora)
        lines.append(f"data.train_set.corpora.<i>.buckets = {{{given}}}: no corpus feeds bucket"
                     f"{'s' if len(unfed) > 1 else ''} {', '.join(map(str, unfed))} of train.length_mix; accepted: "
                     f"lists that together cover every bucket 0 ... {buckets - 1} (null or absent: every bucket)")
    return lines


def _search_errors(data: Mapping[str, Any]) -> list[str]:
    s, lines = data["search"], []
    if s["parents"] + s["mutants"] + s["crossovers"] != s["population"]:
        lines.append(f"search.population = {s['population']}: accepted: parents + mutants + crossovers "
                     f"= {s['parents']} + {s['mutants']} + {s['crossovers']}")
    if s["crossovers"] and s["parents"] < 2:
        lines.append(f"search.parents = {s['parents']}: accepted: >= 2 when search.crossovers > 0")
    first = s["initial_population"]
    if first is not None and first < s["parents"]:
        lines.append(f"search.initial_population = {first}: accepted: null or >= search.parents = {s['parents']}")
    if s["c_range"] is not None and s["c_range"][0] > s["c_range"][1]:
        lines.append(f"search.c_range = {s['c_range']}: accepted: null or [lo, hi] with lo <= hi")
    lo, hi = s["attention_range"]
    if not lo < hi:
        lines.append(f"search.attention_range = {[lo, hi]}: accepted: [low, high] with low < high")
    gpus = data["resources"].get("search", {}).get("gpu", 0)
    if gpus and s["processes"] != gpus:
        lines.append(f"search.processes = {s['processes']}: accepted: resources.search.gpu = {gpus} "
                     "(one search process per GPU)")
    return lines + _first_population_errors(data)


STAIRCASE_SEEDS = 8  # evolution.initial_population's staircase_levels: seeds per c of the reference layout


def _first_population_errors(data: Mapping[str, Any]) -> list[str]:
    """The first population holds every seed (one per c, or 8 staircase seeds per c, over the c range the
    model's critical dims give): known from the declared RoPE facts, so it fails here, not after the data."""
    from longrope2.rope import factors as rope
    from longrope2.rope.methods import searches_for

    s, model = data["search"], data["model"]
    rotary = model["head_dim"] * model["partial_rotary_factor"]
    if (not searches_for(data["methods"]) or (s["c_range"] is not None and s["c_range"][0] > s["c_range"][1])
            or abs(rotary - round(rotary)) > 1e-9 or round(rotary) % 2 or data["target_len"] <= model["train_len"]):
        return []  # nothing to search, or the keys it rests on are reported on their own
    dims = rope.critical_dim_report(int(model["head_dim"]), float(model["rope_theta"]), int(model["train_len"]),
                                    int(data["target_len"]), float(model["partial_rotary_factor"]))
    if s["c_range"] is not None:
        lo, hi = (int(c) for c in s["c_range"])
    elif s["preset"] == "reference":
        lo = hi = dims["d_tcd"] - 1
    else:
        lo, hi = dims["d10_tcd"], dims["d_tcd"]
    per_range = 1 if s["critical_dim_mode"] == "per_c" else hi - lo + 1
    seeds = per_range * (1 if s["initial"] == "alg1" else STAIRCASE_SEEDS)
    first = s["population"] if s["initial_population"] is None else s["initial_population"]
    if first >= seeds:
        return []
    key = "search.population" if s["initial_population"] is None else "search.initial_population"
    per_c = "one seed per c" if s["initial"] == "alg1" else f"{STAIRCASE_SEEDS} staircase seeds per c"
    return [f"{key} = {first}: accepted: >= {seeds}, the first population holds every seed ({per_c} in c = "
            f"[{lo}, {hi}]: d10_tcd = {dims['d10_tcd']}, d_tcd = {dims['d_tcd']} of model.head_dim "
            f"{model['head_dim']}, model.rope_theta {model['rope_theta']:g}, L_train {model['train_len']} -> "
            f"L {data['target_len']})"]


def _train_errors(data: Mapping[str, Any]) -> list[str]:
    t, lines = data["train"], []
    gpus = data["resources"].get("train", {}).get("gpu", 0)
    if gpus and t["processes"] != gpus:
        lines.append(f"train.processes = {t['processes']}: accepted: resources.train.gpu = {gpus} "
                     "(one training process per GPU)")
    cp = t["context_parallel"]
    if t["processes"] % cp:
        lines.append(f"train.context_parallel = {cp}: accepted: a divisor of train.processes = {t['processes']}")
    elif t["global_batch"] % (t["processes"] // cp):
        lines.append(f"train.global_batch = {t['global_batch']}: accepted: a multiple of train.processes / "
                     f"train.context_parallel = {t['processes'] // cp}")
    if cp > 1:
        wanted = {"distributed": "fsdp", "attn_implementation": "sdpa", "long_row_attention": "full"}
        for key, value in wanted.items():
            if t[key] != value:
                lines.append(f"train.{key} = {t[key]}: accepted: {value} with train.context_parallel = {cp} "
                             "(PyTorch's context parallelism: FSDP2, ring attention over SDPA, causal only)")
        # Any length above L_train: the short/long factors are decided on the whole row before it is
        # sharded (training.parallel.whole_row_regime), not on each shard's positions.
        length = data["target_len"]
        if length % (2 * cp):
            lines.append(f"target_len = {length}: accepted with train.context_parallel = {cp}: a multiple of "
                         f"2 x {cp} (head-tail shards)")
    if t["distributed"] == "fsdp" and t["micro_batch"] != 1:
        lines.append(f"train.micro_batch = {t['micro_batch']}: accepted: 1 with train.distributed = fsdp (FSDP "
                     "gathers weights in every forward pass, so every process must run as many passes; with one "
                     "row per pass each runs global_batch / processes)")
    if t["attn_implementation"] != "sdpa" and t["long_row_attention"] == "per_document":
        lines.append(f"train.long_row_attention = per_document: accepted with train.attn_implementation = sdpa "
                     f"only (got {t['attn_implementation']}: flash attention finds documents from restarting "
                     "positions, which long rows do not have)")
    return lines


MULTINODE_RULES = ("search", "train")  # the rules whose stage runs on torch.distributed ranks (longrope2.launch)


def _nodes_errors(data: Mapping[str, Any]) -> list[str]:
    """resources.<rule>.nodes: search and train start one torchrun per node, nodes x processes ranks in all."""
    lines = []
    for rule, spec in data["resources"].items():
        nodes = spec.get("nodes", 1)
        if nodes > 1 and rule not in MULTINODE_RULES:
            lines.append(f"resources.{rule}.nodes = {nodes}: accepted: 1 (only {' and '.join(MULTINODE_RULES)} "
                         "run across nodes)")
    t = data["train"]
    nodes, processes, cp = data["resources"].get("train", {}).get("nodes", 1), t["processes"], t["context_parallel"]
    # Per node the divisors are checked by _train_errors; across nodes the global batch is split over all ranks.
    if nodes > 1 and not processes % cp and not t["global_batch"] % (processes // cp):
        groups = nodes * processes // cp
        if t["global_batch"] % groups:
            lines.append(f"train.global_batch = {t['global_batch']}: accepted: a multiple of resources.train.nodes x "
                         f"train.processes / train.context_parallel = {nodes} x {processes} / {cp} = {groups}")
    return lines


LM_EVAL_SUITES = ("ruler", "longbench", "short")  # the vllm backend runs these; niah and ppl stay on HF


def job_error(backend: str, suites: list[str], key: str = "eval.suite") -> str | None:
    """A job's suites the backend cannot run in one process: under vllm, one engine per process and no HF
    model beside it on the GPU, so an lm-eval suite must be the job's only suite."""
    vllm = [s for s in suites if s in LM_EVAL_SUITES]
    if backend != "vllm" or not vllm or len(suites) == 1:
        return None
    return (f"{key} = {json.dumps(suites)} with eval.backend = vllm: accepted: {', '.join(vllm)} alone in a "
            "job (eval.jobs = per_suite; training-free rows: eval.training_free_suites of one lm-eval suite "
            "or of niah/ppl only): one vLLM engine per process, no HF model beside it")

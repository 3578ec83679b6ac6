"""Benchmark: needle-PPL with answer-only projection against the naive full-logits loss.

One candidate evaluation of the factor search = scoring one sample set (N samples of L = 8x the
model's window, each ending in a 5- to 7-token answer) once. It is timed and its peak memory is
measured for two ways of computing the same fitness, exp(mean over samples of the mean answer NLL):

- ``answer-only``: ``longrope2.lm.losses.needle_sample_losses`` runs the decoder and sends only the
  answer positions through the LM head;
- ``naive``: ``model(input_ids).logits`` (L x vocab) and transformers' own causal-LM loss with the
  labels masked to the answer, i.e. what a plain forward + loss does.

Models (LlamaForCausalLM, random seeded weights; fp32 on CPU, bf16 + sdpa on CUDA):

- ``toy``: the pipeline's toy shape (hidden 128, 2 layers, vocab 512, window 128 -> L = 1024), or
  the trained toy model with ``--toy-model results/toy/base_model``;
- ``wide-32k`` / ``wide-128k``: hidden 512, 4 layers, window 512 -> L = 4096, with LLaMA2's and
  LLaMA3's vocabularies, where the L x vocab logits (4096 x 128256 x 4 B = 2.1 GB) dominate memory.

Each (model, path) runs in a fresh subprocess, so its peak is measured alone: on CPU the peak RSS
(ru_maxrss) during the evaluations minus the RSS once the model and samples are built (the peak is
reset first through /proc/self/clear_refs so that building the model does not count); on CUDA
max_memory_allocated minus the allocation before. Time: median of ``--repeats`` evaluations after
one warm-up. The two paths must agree on needle-PPL (relative 1e-5 in fp32, 2e-2 in bf16).

Run (about 4 minutes on 2 CPU cores with the defaults; figures in docs/benchmarks.md)::

    python benchmarks/needle_ppl.py [--json needle_ppl.json] [--models toy] [--threads 2]

Expect the same needle-PPL from both paths (relative difference ~2e-7 in fp32). On the toy model
(vocab 512) the two cost about the same. On the wide models the naive path's peak grows by about
two L x vocab fp32 buffers (the logits and the loss's log-softmax: ~1 GiB at 32k, ~4 GiB at 128k)
while the answer-only peak (~250 MiB, the decoder's activations) does not depend on the vocabulary;
the full LM head makes the naive path ~2x (32k) to ~5x (128k) slower on 2 CPU threads.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout without install

from longrope2.data.needles import NeedleSample
from longrope2.lm.losses import needle_sample_losses

PATHS = ("naive", "answer-only")
REL_TOL = {"float32": 1e-5, "bfloat16": 2e-2}


# --------------------------------------------------------------------------- models and samples


def model_specs(args: argparse.Namespace) -> dict[str, dict]:
    """Shape (LlamaConfig kwargs) of every benchmarked model, keyed by name."""
    def shape(hidden, layers, heads, head_dim, intermediate, vocab, window):
        return {"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
                "num_key_value_heads": heads, "head_dim": head_dim, "intermediate_size": intermediate,
                "vocab_size": vocab, "max_position_embeddings": window}

    specs = {"toy": shape(128, 2, 4, 32, 256, 512, args.toy_window)}
    for vocab in args.wide_vocabs:
        specs[f"wide-{round(vocab / 1000)}k"] = shape(args.wide_hidden, args.wide_layers, args.wide_heads,
                                                      args.wide_head_dim, args.wide_intermediate, vocab,
                                                      args.wide_window)
    return specs


def build_model(shape: dict, toy_model: str | None, device: torch.device, dtype: torch.dtype, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    if toy_model:
        model = LlamaForCausalLM.from_pretrained(toy_model, dtype=dtype, attn_implementation="sdpa")
    else:
        torch.manual_seed(seed)  # both paths' subprocesses must build the same weights
        cfg = LlamaConfig(**shape, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                          bos_token_id=1, eos_token_id=2, pad_token_id=3, attn_implementation="sdpa")
        model = LlamaForCausalLM(cfg).to(dtype)
    return model.to(device).eval()


def make_samples(n: int, length: int, vocab: int, seed: int) -> list[NeedleSample]:
    """Random token ids with a 5- to 7-token answer at the end (only the cost and the agreement matter)."""
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(n):
        n_answer = int(torch.randint(5, 8, (1,), generator=gen))
        ids = torch.randint(4, vocab, (length,), generator=gen)  # skip the special ids 0-3
        mask = torch.zeros(length, dtype=torch.bool)
        mask[length - n_answer:] = True
        samples.append(NeedleSample(input_ids=ids, answer_mask=mask, key="bench", number="", depth=0.5,
                                    actual_depth=0.5, needle_position=length // 2,
                                    haystack_tokens=length - n_answer))
    return samples


# --------------------------------------------------------------------------- the two paths


def naive_losses(model, samples: list[NeedleSample], batch_size: int) -> list[float]:
    """Per-sample mean answer NLL from the full L x vocab logits and transformers' causal-LM loss."""
    device = next(model.parameters()).device
    nll = []
    with torch.inference_mode():
        for b in range(0, len(samples), batch_size):
            chunk = samples[b:b + batch_size]
            ids = torch.stack([s.input_ids for s in chunk]).to(device)
            logits = model(input_ids=ids, use_cache=False).logits
            labels = ids.masked_fill(~torch.stack([s.answer_mask for s in chunk]).to(device), -100)
            # Per row, so that a batch gives each sample's own mean (as needle_sample_losses does).
            for r in range(len(chunk)):
                loss = model.loss_function(logits=logits[r:r + 1], labels=labels[r:r + 1],
                                           vocab_size=model.config.vocab_size)
                nll.append(float(loss))
            del logits
    return nll


def evaluate(path: str, model, samples: list[NeedleSample], batch_size: int) -> float:
    """One candidate evaluation: the sample set's needle-PPL."""
    if path == "naive":
        nll = naive_losses(model, samples, batch_size)
    else:
        nll, _ = needle_sample_losses(model, samples, batch_size)
    return math.exp(sum(nll) / len(nll))


# --------------------------------------------------------------------------- memory probes


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


class PeakMemory:
    """Peak memory above the current level: CUDA allocator stats, or RSS on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.reset_ok = True
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return
        gc.collect()
        try:  # "5" resets the peak RSS (VmHWM, ru_maxrss): building the model must not count
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.reset_ok = False  # then the figure is a lower bound if building peaked higher
        self.base = _status_kib("VmRSS") * 1024

    def extra_bytes(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.base  # ru_maxrss is KiB


# --------------------------------------------------------------------------- worker (one subprocess)


def run_worker(job: dict) -> dict:
    torch.set_num_threads(job["threads"])
    device = torch.device(job["device"])
    dtype = getattr(torch, job["dtype"])
    model = build_model(job["shape"], job["toy_model"], device, dtype, job["seed"])
    length = job["factor"] * model.config.max_position_embeddings
    samples = make_samples(job["samples"], length, model.config.vocab_size, job["seed"] + 1)
    probe = PeakMemory(device)
    times, ppls = [], []
    for _ in range(1 + job["repeats"]):  # the first is the warm-up
        start = time.perf_counter()
        ppls.append(evaluate(job["path"], model, samples, job["batch_size"]))
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {"vocab": model.config.vocab_size, "L": length, "time_s": statistics.median(times[1:]),
            "times_s": times, "peak_extra_bytes": probe.extra_bytes(), "peak_reset": probe.reset_ok,
            "needle_ppl": ppls[-1], "threads": torch.get_num_threads(),
            "model_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}


def spawn_worker(job: dict) -> dict:
    """Run one (model, path) in a fresh interpreter so that its peak memory is its own."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"worker {job['model']}/{job['path']} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- report


def load_average() -> str:
    """1/5/15-minute load: on a shared machine it tells whether the times were disturbed."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def check_agreement(rows: list[dict], tol: float) -> list[str]:
    """|Δ needle_ppl| / ppl per model; returns the models that exceed the tolerance."""
    bad = []
    for name in dict.fromkeys(r["model"] for r in rows):
        naive, fast = (next(r for r in rows if r["model"] == name and r["path"] == p) for p in PATHS)
        rel = abs(naive["needle_ppl"] - fast["needle_ppl"]) / naive["needle_ppl"]
        fast["rel_diff"] = naive["rel_diff"] = rel
        fast["speedup"] = naive["time_s"] / fast["time_s"]
        fast["mem_ratio"] = naive["peak_extra_bytes"] / max(fast["peak_extra_bytes"], 1)
        print(f"{name}: needle_ppl naive {naive['needle_ppl']:.8g}, answer-only {fast['needle_ppl']:.8g}, "
              f"|diff|/ppl {rel:.2e} (tol {tol:g})")
        if not rel < tol:
            bad.append(name)
    return bad


def markdown_table(rows: list[dict]) -> str:
    lines = [("| model | vocab | L | path | time / candidate [ms] | peak extra memory [MiB] | needle_ppl "
              "| speed-up | memory ratio |"),
             "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        speed = f"{r['speedup']:.2f}x" if "speedup" in r else "—"
        mem = f"{r['mem_ratio']:.1f}x" if "mem_ratio" in r else "—"
        lines.append(f"| {r['model']} | {r['vocab']} | {r['L']} | {r['path']} | {r['time_s'] * 1e3:.0f} "
                     f"| {r['peak_extra_bytes'] / 2**20:.0f} | {r['needle_ppl']:.6g} | {speed} | {mem} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", default="toy,wide-32k,wide-128k", help="comma-separated subset to run")
    p.add_argument("--samples", type=int, default=4, help="samples per candidate evaluation (N)")
    p.add_argument("--factor", type=int, default=8, help="sample length L = factor x window")
    p.add_argument("--batch-size", type=int, default=1, help="samples per forward pass, both paths")
    p.add_argument("--repeats", type=int, default=3, help="timed evaluations after one warm-up")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--toy-model", default=None, help="load this checkpoint (e.g. results/toy/base_model) as toy")
    p.add_argument("--toy-window", type=int, default=128)
    p.add_argument("--wide-hidden", type=int, default=512)
    p.add_argument("--wide-layers", type=int, default=4)
    p.add_argument("--wide-heads", type=int, default=8)
    p.add_argument("--wide-head-dim", type=int, default=64)
    p.add_argument("--wide-intermediate", type=int, default=1408)
    p.add_argument("--wide-window", type=int, default=512)
    p.add_argument("--wide-vocabs", type=lambda s: [int(v) for v in s.split(",")], default=[32000, 128256],
                   help="comma-separated vocabulary sizes, one wide model each")
    p.add_argument("--json", type=Path, default=None, help="write all figures to this JSON file")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one job, JSON in and out
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(json.loads(args.worker))))
        return 0
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device, dtype = ("cuda", "bfloat16") if cuda else ("cpu", "float32")
    specs = model_specs(args)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in specs]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; choose from {list(specs)}")
    print(f"torch {torch.__version__}, device {device}, dtype {dtype}, threads {args.threads}, "
          f"N={args.samples}, batch {args.batch_size}, {args.repeats} repeats after 1 warm-up, "
          f"load average {load_average()}", flush=True)

    rows, start = [], time.perf_counter()
    for name in names:
        for path in PATHS:
            job = {"model": name, "path": path, "shape": specs[name], "device": device, "dtype": dtype,
                   "toy_model": args.toy_model if name == "toy" else None, "factor": args.factor,
                   "samples": args.samples, "batch_size": args.batch_size, "repeats": args.repeats,
                   "threads": args.threads, "seed": args.seed}
            t0 = time.perf_counter()
            res = spawn_worker(job)
            rows.append({"model": name, "path": path, **res})
            print(f"  {name:>10} {path:<11} L={res['L']:<6} {res['time_s'] * 1e3:9.0f} ms/candidate "
                  f"(min {min(res['times_s'][1:]) * 1e3:.0f}, warm-up {res['times_s'][0] * 1e3:.0f})  "
                  f"peak +{res['peak_extra_bytes'] / 2**20:7.0f} MiB  ppl {res['needle_ppl']:.6g}  "
                  f"(worker {time.perf_counter() - t0:.0f} s)", flush=True)
            if not res["peak_reset"]:
                print("    note: could not reset the peak RSS; the figure may miss part of the peak")

    bad = check_agreement(rows, REL_TOL[dtype])
    print()
    print(markdown_table(rows))
    total = time.perf_counter() - start
    print(f"\ntotal {total:.0f} s, load average {load_average()} (other processes on the machine skew the times)")
    if args.json:
        meta = {"torch": torch.__version__, "device": device, "dtype": dtype, "threads": args.threads,
                "samples": args.samples, "batch_size": args.batch_size, "repeats": args.repeats,
                "factor": args.factor, "total_s": total, "load_average_end": load_average()}
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    if bad:
        print(f"FAIL: the two paths disagree on {bad}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Stage train: the mixed-window fine-tuning loop, resume after a kill, N processes == 1, NaN stop, export."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import smoke_args
from numerics import FLOAT32_REL, assert_close_to_scale, assert_same_loss_curve, read_loss_curve

from longrope2 import needle_data, train, train_data
from longrope2.core.config import compose_config
from longrope2.core.errors import ConfigError
from longrope2.evolution import fitness
from longrope2.rope import methods
from longrope2.rope.hf_config import rope_facts_from_hf_config
from longrope2.rope.scaling import RopeScaling, rotary_modules
from longrope2.training import mixed, parallel
from longrope2.training import step as step_

REPO = Path(__file__).resolve().parents[1]
L, L_TRAIN = 256, 64


def _overrides(out, model_dir, folder, *extra):
    return [
        *smoke_args(out, model_dir),
        f"model.train_len={L_TRAIN}", f"target_len={L}",
        "data.corpus.source=folder", f"data.corpus.path={folder}", "data.corpus.heldout_fraction=0.5",
        "data.search_set.books=2", "data.search_set.samples=4", "data.search_set.validation_books=2",
        "data.search_set.validation_samples=4", "data.train_set.long_lengths=[128,256]",
        # 10 short + 8 long rows of 256 tokens
        "train.length_mix=[{max_len:64,tokens:2560},{max_len:256,tokens:2000}]",
        "train.global_batch=2", "train.lr=1e-3", "train.warmup_steps=2", "train.num_threads=1",
        "train.checkpoint_every=3", "train.validation_batch_size=4", *extra,
    ]


def _prepare(out, model_dir, folder):
    """needle_data + train_data + a longrope2 search result for a fine-tuning run in `out`."""
    from transformers import AutoConfig

    cfg = compose_config(_overrides(out, model_dir, folder))
    needle_data.run(cfg)
    train_data.run(cfg)
    facts = replace(rope_facts_from_hf_config(AutoConfig.from_pretrained(model_dir)), train_len=L_TRAIN)
    scaling = RopeScaling.longrope2(facts, L, tail=[6.0, 6.5, 7.0, 7.5] + [8.0] * 8, critical_dim=4)
    (out / "seed0" / "search" / "longrope2").mkdir(parents=True, exist_ok=True)
    result = {"long_factor": list(scaling.long_factor), "critical_dim": 4, "attention_factor": scaling.attention_factor}
    (out / "seed0" / "search" / "longrope2" / "result.json").write_text(json.dumps(result))
    return scaling


def _loss_csv(out, variant="longrope2"):
    return Path(out) / "seed0" / "train" / variant / "loss.csv"


def _curve(out, variant="longrope2"):
    return read_loss_curve(_loss_csv(out, variant))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, toy_model_dir, books):
    """One uninterrupted run, in this process, 8 epochs (72 steps)."""
    out = tmp_path_factory.mktemp("reference")
    scaling = _prepare(out, toy_model_dir, books)
    summary = train.run(compose_config(_overrides(out, toy_model_dir, books, "train.epochs=8")))
    return out, scaling, summary


def test_outputs_and_the_exported_config(reference, toy_model_dir):
    out, scaling, summary = reference
    folder = out / "seed0" / "train" / "longrope2"
    assert sorted(p.name for p in folder.iterdir()) == ["loss.csv", "loss.png", "model", "train.json",
                                                        "validation.json"]
    assert summary["steps"] == 18 * 8 // 2 == len(_curve(out))
    assert not (out / "seed0" / "checkpoints").exists() or not any((out / "seed0" / "checkpoints").iterdir())
    config = json.loads((folder / "model" / "config.json").read_text())
    rp = config["rope_parameters"]
    assert rp["rope_type"] == "longrope" and rp["short_factor"] == [1.0] * 16
    assert rp["long_factor"] == pytest.approx(list(scaling.long_factor), abs=0)
    assert rp["original_max_position_embeddings"] == L_TRAIN and config["max_position_embeddings"] == L
    assert rp["attention_factor"] == pytest.approx(scaling.attention_factor, rel=1e-12)
    assert config["use_cache"] is True and config["architectures"] == ["LlamaForCausalLM"]
    curve = _curve(out)
    assert curve[-1]["loss"] < 0.8 * curve[0]["loss"]  # it learns
    assert all(c["short_loss"] is not None or c["long_loss"] is not None for c in curve)
    val = json.loads((folder / "validation.json").read_text())
    assert val["tuned"]["validation"]["length"] == L and val["tuned"]["validation_short"]["length"] == L_TRAIN
    assert set(val["base"]) == {"validation", "validation_short"}
    for name in ("base", "tuned"):  # each outcome with its sample's id: this seed's held-out set, in order
        for split, m in val[name].items():
            assert m["ids"] == [f"{split}/seed0/{i}" for i in range(m["samples"])] and len(m["correct"]) == m["samples"]


def test_exported_model_loads_with_plain_transformers_and_matches_our_rope(reference, toy_model_dir):
    """from_pretrained, no custom code: logits equal the pipeline's own RoPE maths below and above L_train."""
    from transformers import AutoModelForCausalLM

    out, scaling, _ = reference
    path = out / "seed0" / "train" / "longrope2" / "model"
    exported = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    fitness.prepare_for_search(ours, replace(rope_facts_from_hf_config(ours.config), train_len=L_TRAIN))
    gen = torch.Generator().manual_seed(0)
    for n in (40, L_TRAIN, L_TRAIN + 1, 200):
        ids = torch.randint(4, exported.config.vocab_size, (1, n), generator=gen)
        inv_freq = scaling.long_inv_freq() if n > L_TRAIN else scaling.short_inv_freq()
        for _, rotary in rotary_modules(ours):  # static RoPE: we set each path's frequencies ourselves
            rotary.inv_freq.copy_(inv_freq)
            rotary.attention_scaling = scaling.attention_factor
        with torch.no_grad():
            a, b = exported(input_ids=ids).logits, ours(input_ids=ids).logits
        # float32 on both sides; only the inv_freq formulas' rounding differs (tests/numerics.py)
        assert_close_to_scale(a, b, FLOAT32_REL, f"logits at {n} tokens")
    base = AutoModelForCausalLM.from_pretrained(toy_model_dir, dtype=torch.float32).state_dict()
    assert all(torch.equal(exported.state_dict()[k], base[k]) is False for k in base if "norm" not in k)


@pytest.mark.parametrize("method, rope_type", [("pi", "linear"), ("ntk_rcd", "default"), ("yarn_rcd", "yarn")])
def test_every_method_fine_tunes_on_its_own_scaling_and_exports_it(tmp_path, toy_model_dir, books, method, rope_type):
    """Static and rcd methods: one scaling on every row, written as the transformers rope_type it is, whose
    frequencies (computed by transformers itself on loading) are the method's at every length."""
    from transformers import AutoConfig, AutoModelForCausalLM

    _prepare(tmp_path, toy_model_dir, books)  # the longrope2 search result: rcd methods take its c = 4
    summary = train.run(compose_config(_overrides(tmp_path, toy_model_dir, books, f"train.method={method}")))
    assert (summary["method"], summary["mixed_window"]) == (method, False)
    assert summary["critical_dim"] == (4 if method.endswith("_rcd") else None)
    folder = tmp_path / "seed0" / "train" / method / "model"
    assert json.loads((folder / "config.json").read_text())["rope_parameters"]["rope_type"] == rope_type
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    base_config = AutoConfig.from_pretrained(toy_model_dir)  # the exported NTK config has its new base
    facts = replace(rope_facts_from_hf_config(base_config), train_len=L_TRAIN)
    expected = methods.method_scaling(method, facts, L, {"critical_dim": 4})
    for n in (40, L):  # inside and beyond L_train: the same frequencies
        pos = torch.arange(n)[None]
        cos, sin = model.model.rotary_emb(torch.zeros(1), pos)
        ours_cos, ours_sin = expected.cos_sin(pos)
        assert torch.allclose(cos, ours_cos, atol=1e-5) and torch.allclose(sin, ours_sin, atol=1e-5), (method, n)


def _cli(out, model_dir, folder, *extra, launcher=()):
    cmd = [sys.executable, *launcher, "-m", "longrope2.train", *_overrides(out, model_dir, folder, *extra)]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "TQDM_DISABLE": "1"})


def test_killed_run_resumes_on_the_same_loss_curve(tmp_path, reference, toy_model_dir, books):
    _prepare(tmp_path, toy_model_dir, books)
    proc = _cli(tmp_path, toy_model_dir, books, "train.epochs=8")
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
        if list((tmp_path / "seed0" / "checkpoints").glob("train-longrope2-*/step-*")):
            break
    assert proc.poll() is None, "the run ended before it could be killed: make it longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "seed0" / "train" / "longrope2").exists()  # no half-written output
    resumed = _cli(tmp_path, toy_model_dir, books, "train.epochs=8")
    log = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, log
    assert "resuming the fine-tuning from" in log
    # bit for bit: weights, AdamW and schedule restored
    assert_same_loss_curve(_loss_csv(tmp_path), _loss_csv(reference[0]), rel=0)


@pytest.mark.parametrize("distributed", ["ddp", "fsdp"])
def test_two_processes_give_the_loss_curve_of_one(tmp_path, reference, toy_model_dir, books, distributed):
    """2 torchrun processes over gloo, DDP or accelerate's FSDP2 (sharded weights and AdamW state)."""
    from safetensors.torch import load_file

    _prepare(tmp_path, toy_model_dir, books)
    torchrun = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    proc = _cli(tmp_path, toy_model_dir, books, "train.epochs=8", "train.processes=2",
                f"train.distributed={distributed}", launcher=torchrun)
    log = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, log
    assert json.loads((tmp_path / "seed0" / "train" / "longrope2" / "train.json").read_text())["processes"] == 2
    assert len(_curve(tmp_path)) == 72
    # another all-reduce order: float32 round-off of each step's loss, learning rate and gradient norm
    assert_same_loss_curve(_loss_csv(tmp_path), _loss_csv(reference[0]), rel=FLOAT32_REL)
    weights = [load_file(out / "seed0" / "train" / "longrope2" / "model" / "model.safetensors")
               for out in (tmp_path, reference[0])]
    assert sorted(weights[0]) == sorted(weights[1])
    for k, v in weights[0].items():  # another all-reduce order: float32 round-off, relative to the tensor
        assert_close_to_scale(v, weights[1][k], FLOAT32_REL, k)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, toy_model_dir, books, monkeypatch):
    _prepare(tmp_path, toy_model_dir, books)
    forward = step_.ChunkedLossLM.forward
    calls = {"n": 0}

    def poisoned(self, *args, **kw):
        total, weight = forward(self, *args, **kw)
        calls["n"] += 1
        return (total * float("nan") if calls["n"] > 8 else total), weight  # 2 rows a step: step 5 diverges

    monkeypatch.setattr(step_.ChunkedLossLM, "forward", poisoned)
    with pytest.raises(step_.TrainingDiverged, match=r"non-finite loss nan .* at step 5 of 9 \(train.lr = 0.001\); "
                                                     r"the last good checkpoint is .*step-00000003"):
        train.run(compose_config(_overrides(tmp_path, toy_model_dir, books)))
    assert not (tmp_path / "seed0" / "train" / "longrope2").exists()
    assert len(list((tmp_path / "seed0" / "checkpoints").glob("train-longrope2-*/step-00000003/trainer.json"))) == 1


def test_no_mixed_window_uses_the_long_factors_everywhere(tmp_path, toy_model_dir, books):
    scaling = _prepare(tmp_path, toy_model_dir, books)
    summary = train.run(compose_config(_overrides(tmp_path, toy_model_dir, books, "train.method=longrope2_no_mixed")))
    assert summary["method"] == "longrope2_no_mixed" and not (tmp_path / "seed0" / "train" / "longrope2").exists()
    config = tmp_path / "seed0" / "train" / "longrope2_no_mixed" / "model" / "config.json"
    rp = json.loads(config.read_text())["rope_parameters"]
    assert rp["short_factor"] == rp["long_factor"] == pytest.approx(list(scaling.long_factor), abs=0)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(config.parent, dtype=torch.float32)
    pos = torch.arange(40)[None]  # inside L_train: the rescaled frequencies all the same
    cos, _ = model.model.rotary_emb(torch.zeros(1), pos)
    angles = pos[0, :, None].float() * scaling.long_inv_freq()
    assert torch.allclose(cos[0], torch.cat([angles, angles], -1).cos() * scaling.attention_factor, atol=1e-6)
    mixed_run = tmp_path / "mixed"
    _prepare(mixed_run, toy_model_dir, books)
    train.run(compose_config(_overrides(mixed_run, toy_model_dir, books)))
    no_mixed, mixed_curve = _curve(tmp_path, "longrope2_no_mixed"), _curve(mixed_run)
    # The same rows and weights at step 1: long rows agree, short rows see other frequencies.
    first = no_mixed[0]
    assert first["short_loss"] is not None and first["long_loss"] is None  # step 1 holds short rows only
    assert abs(first["short_loss"] - mixed_curve[0]["short_loss"]) > 1e-5  # float noise here: ~1e-7
    both = next(i for i, c in enumerate(mixed_curve) if c["long_loss"] is not None)
    assert no_mixed[both]["long_loss"] != mixed_curve[both]["long_loss"]  # the weights have diverged by then


@pytest.mark.parametrize("override, message", [
    ("train.global_batch=3", r"train.global_batch = 3: accepted: a multiple of train.processes / "
                             r"train.context_parallel = 2"),
    ("train.context_parallel=2", r"train.distributed = ddp: accepted: fsdp with train.context_parallel = 2"),
    ("train.context_parallel=3", r"train.context_parallel = 3: accepted: a divisor of train.processes = 2"),
    ("train.long_row_attention=per_document",
     r"train.long_row_attention = per_document: accepted with train.attn_implementation = sdpa only"),
    ("resources.train.gpu=4", r"train.processes = 2: accepted: resources.train.gpu = 4"),
    ("train.schedule=exponential", r'train.schedule = "exponential": accepted: cosine, linear, constant'),
    ("train.distributed=fsdp", r"train.micro_batch = 2: accepted: 1 with train.distributed = fsdp"),
])
def test_bad_train_settings_fail_before_any_work(tmp_path, toy_model_dir, books, override, message):
    extra = ["train.processes=2", "train.micro_batch=2", override]
    if "per_document" in override:
        extra.append("train.attn_implementation=flash_attention_2")
    with pytest.raises(ConfigError, match=message):
        compose_config(_overrides(tmp_path, toy_model_dir, books, *extra))


def test_stale_rows_and_missing_factors_fail_before_training(tmp_path, toy_model_dir, books):
    _prepare(tmp_path, toy_model_dir, books)
    with pytest.raises(ConfigError, match=r"target_len = 128 but the train_data rows have 256 tokens: rerun stage "
                                          r"train_data"):
        train.run(compose_config(_overrides(tmp_path, toy_model_dir, books, "target_len=128",
                                            "train.length_mix=[{max_len:64,tokens:2560},{max_len:128,tokens:2000}]")))
    (tmp_path / "seed0" / "search" / "longrope2" / "result.json").unlink()
    for method in ("longrope2", "yarn_rcd"):
        with pytest.raises(ConfigError, match=rf"train.method = {method}: .*search/longrope2/result.json is missing; "
                                              r"run stage search \(search.method=longrope2\) first"):
            train.run(compose_config(_overrides(tmp_path, toy_model_dir, books, f"train.method={method}")))
    assert not (tmp_path / "seed0" / "train").exists()


def test_every_epoch_visits_every_row_once():
    n, batch = 10, 4
    order = [j for step in range(10) for j in mixed.step_rows(n, batch, step, seed=3)]  # 4 epochs
    for epoch in range(4):
        assert sorted(order[epoch * n : (epoch + 1) * n]) == list(range(n))
    assert order[:n] != order[n : 2 * n]  # reshuffled per epoch
    assert mixed.step_rows(n, batch, 7, seed=3) == order[28:32]  # a resumed run sees the same rows
    assert mixed.step_rows(n, batch, 0, seed=4) != mixed.step_rows(n, batch, 0, seed=3)


def _short_row(lengths, vocab, seed=0):
    from longrope2.data import rows as mixed

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (1, sum(lengths)), generator=g)
    pos = mixed.document_position_ids(lengths)[None]
    return {"input_ids": ids, "position_ids": pos, "doc_ids": mixed.document_ids(pos),
            "loss_weight": torch.ones(1, sum(lengths)), "is_long": torch.tensor([False])}


def test_context_parallel_pieces_spread_whole_documents_and_keep_the_loss(toy_model_dir):
    """Under context parallelism a short row is spread over the group by whole documents: the
    pieces partition the row, and their losses add up to the packed row's loss."""
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(toy_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model = step_.ChunkedLossLM(lm, 64)
    cfg = compose_config(smoke_args())
    row = _short_row([30, 64, 10, 50, 40, 62], lm.config.vocab_size)  # 256 tokens, 6 documents

    def loss_of(batch):
        inputs = step_.forward_inputs(batch, False, cfg, torch.float32, torch.device("cpu"))
        with torch.no_grad():
            total, weight = model(**inputs)
        return float(total), weight

    full_total, full_weight = loss_of(row)
    for cp in (2, 4):
        pieces = [parallel.document_piece(row, k, cp) for k in range(cp)]
        assert sum(p["input_ids"].shape[1] for p in pieces) == 256
        assert torch.equal(torch.cat([p["input_ids"] for p in pieces], 1), row["input_ids"])  # in order, whole
        for p in pieces:  # every piece starts a document and holds whole ones
            assert int(p["position_ids"][0, 0]) == 0
        totals = [loss_of(p) for p in pieces]
        assert sum(w for _, w in totals) == full_weight
        assert sum(t for t, _ in totals) == pytest.approx(full_total, rel=1e-5)
    # more processes than documents: the empty piece is one token with no target and zero loss
    empty = parallel.document_piece(_short_row([64, 64], lm.config.vocab_size), 3, 4)
    assert empty["input_ids"].shape == (1, 1) and float(empty["loss_weight"].sum()) == 0
    inputs = step_.forward_inputs(empty, False, cfg, torch.float32, torch.device("cpu"))
    lm.zero_grad()
    total, weight = model(**inputs)
    total.backward()  # still a graph through every weight (FSDP's collectives stay in step)
    assert weight == 0 and float(total.detach()) == 0.0
    assert all(p.grad is not None and float(p.grad.abs().max()) == 0 for p in lm.parameters())


def test_short_rows_run_as_their_documents_and_long_rows_keep_their_mask():
    cfg = compose_config([*smoke_args(), "train.long_row_attention=per_document"])
    row = _short_row([30, 64, 10, 50, 40, 62], 100)
    short = step_.forward_inputs(row, False, cfg, torch.float32, torch.device("cpu"))
    assert short["attention_mask"] is None and short["input_ids"].shape == (6, 64)
    assert int(short["position_ids"].max()) == 63 and float(short["weights"].sum()) == 256 - 6
    long = step_.forward_inputs(row | {"is_long": torch.tensor([True])}, True, cfg, torch.float32,
                                torch.device("cpu"))
    assert long["input_ids"].shape == (1, 256) and long["attention_mask"].shape == (1, 1, 256, 256)
    flash = compose_config([*smoke_args(), "train.attn_implementation=flash_attention_2"])
    packed = step_.forward_inputs(row, False, flash, torch.float32, torch.device("cpu"))
    assert packed["attention_mask"] is None and packed["input_ids"].shape == (1, 256)  # varlen reads the positions


def test_every_process_runs_as_many_forward_passes_under_context_parallelism():
    rows = {k: torch.cat([v, v]) for k, v in _short_row([64, 64, 64, 64], 100).items()}
    rows["is_long"] = torch.tensor([False, True])
    counts = {r: len(list(parallel.micro_batches(rows, 1, parallel.Layout(world=4, rank=r, cp=2)))) for r in range(4)}
    assert set(counts.values()) == {2}
    layout = parallel.Layout(world=8, rank=5, cp=4)
    assert (layout.dp_world, layout.dp_rank, layout.cp_rank) == (2, 1, 1)

"""eval.backend = vllm without vLLM installed: the lm-eval model arguments of each paper preset, the version
check, the checkpoint folders vLLM would load (the base's original RoPE, a method's factors training-free), the
engines a `longrope` checkpoint runs on (one per factor regime: which factors each RULER cell and the short tasks
get), the LongBench path on the same backend, and the config errors."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from importlib import metadata
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from longrope2 import evaluate
from longrope2.core import checks
from longrope2.core.config import compose_config
from longrope2.core.errors import ConfigError
from longrope2.evaluation import backends, ruler, suites
from longrope2.rope.hf_config import rope_facts_from_hf_config
from longrope2.rope.scaling import RopeScaling

PRESETS = ("llama3_8b_128k", "phi3_mini_128k", "phi4_mini_128k")


@pytest.mark.parametrize("preset", PRESETS)
def test_paper_presets_run_vllm_with_these_model_args(preset):
    cfg = compose_config([f"experiment={preset}"])
    assert cfg.eval.backend == "vllm"
    common = {"pretrained": "/ckpt", "tokenizer": "/ckpt", "dtype": "bfloat16", "tensor_parallel_size": 1,
              "batch_size": "auto", "seed": 0, "add_bos_token": True, "truncation_side": "middle"}
    for suite, length in (("ruler", 131072), ("longbench", 131072), ("short", 4096)):
        assert backends.vllm_model_args(cfg, "/ckpt", suite, True) == {**common, "max_model_len": length}
    wide = compose_config([f"experiment={preset}", "resources.evaluate.gpu=4", "eval.ruler.lengths=[4096,65536]",
                           "seed=3"])
    assert backends.vllm_model_args(wide, "/m", "ruler", False) == {
        **common, "pretrained": "/m", "tokenizer": "/m", "tensor_parallel_size": 4, "max_model_len": 65536,
        "seed": 3, "add_bos_token": False}
    with pytest.raises(ConfigError, match="eval.suite = 'niah' with eval.backend = vllm: accepted: ruler"):
        backends.vllm_model_args(cfg, "/ckpt", "niah", True)


@pytest.mark.parametrize("preset", ["toy", "smoke"])
def test_toy_and_smoke_stay_on_hf(preset):
    assert compose_config([f"experiment={preset}"]).eval.backend == "hf"


def _installed(monkeypatch, version):
    def fake(name):
        assert name == "vllm"
        if version is None:
            raise metadata.PackageNotFoundError(name)
        return version

    monkeypatch.setattr(metadata, "version", fake)


def test_vllm_version_check(monkeypatch):
    _installed(monkeypatch, None)
    with pytest.raises(ConfigError) as err:
        backends.check_vllm()
    assert "vllm is not installed; accepted: vllm >= 0.11.1" in str(err.value)
    assert "issue 27414" in str(err.value) and "PR 27431" in str(err.value) and '".[vllm]"' in str(err.value)
    for old in ("0.11.0", "0.10.2", "0.11.1rc1", "not-a-version"):
        _installed(monkeypatch, old)
        with pytest.raises(ConfigError, match=f"vllm {old} is installed; accepted: vllm >= 0.11.1 .*PR 27431"):
            backends.check_vllm()
    for new in ("0.11.1", "0.20.0", "0.34.0"):
        _installed(monkeypatch, new)
        backends.check_vllm()


def test_version_check_comes_before_any_model_loads(monkeypatch, tmp_path):
    cfg = compose_config(["experiment=llama3_8b_128k", f"out_dir={tmp_path}", "eval.variant=base", "eval.suite=ruler"])
    (tmp_path / "eval_data").mkdir()
    (tmp_path / "eval_data" / "eval_data.json").write_text("{}")
    _installed(monkeypatch, "0.10.2")
    monkeypatch.setattr(evaluate, "load_variant", lambda *a: pytest.fail("a model was loaded"))
    with pytest.raises(ConfigError, match="vllm 0.10.2 is installed"):
        evaluate.run(cfg)


def test_config_rejects_a_bad_backend_and_vllm_jobs_it_cannot_run():
    with pytest.raises(ConfigError, match='eval.backend = "tgi": accepted: hf, vllm'):
        compose_config(["eval.backend=tgi"])
    with pytest.raises(ConfigError) as err:  # the toy: one job per model for every suite
        compose_config(["experiment=toy", "eval.backend=vllm", "resources.evaluate.gpu=1"])
    assert ('eval.suites = ["niah", "short", "ppl"] with eval.backend = vllm: accepted: short alone in a job'
            in str(err.value))
    with pytest.raises(ConfigError, match="resources.evaluate.gpu = 0 with eval.backend = vllm: accepted: >= 1"):
        compose_config(["experiment=llama3_8b_128k", "resources.evaluate.gpu=0"])
    with pytest.raises(ConfigError, match=r'eval.training_free_suites = \["ruler", "niah"\] with eval.backend'):
        compose_config(["experiment=llama3_8b_128k", "eval.training_free_suites=[ruler,niah]"])
    compose_config(["experiment=llama3_8b_128k", "eval.training_free_suites=[niah,ppl]"])
    compose_config(["experiment=llama3_8b_128k", "eval.training_free_suites=[ruler]"])
    assert checks.job_error("hf", ["ruler", "niah"]) is None


def _tuned(toy_model_dir, tmp_path, attention_factor=None, name="tuned"):
    """A copy of the toy with LongRoPE factors in its config (64 -> 256), as the train stage exports one."""
    from transformers import AutoConfig

    path = tmp_path / name
    shutil.copytree(toy_model_dir, path)
    config = AutoConfig.from_pretrained(path)
    facts = dataclasses.replace(rope_facts_from_hf_config(config), train_len=64)
    long = torch.linspace(1.0, 4.0, facts.rotary_dim // 2)
    RopeScaling.longrope(facts, 256, long, attention_factor=attention_factor).update_hf_config(config)
    config.save_pretrained(path)
    return path


def test_a_fine_tuned_checkpoint_is_loaded_as_exported(toy_model_dir, tmp_path):
    path = _tuned(toy_model_dir, tmp_path)
    model = backends.prepare_checkpoint(str(path), 256, 256, tmp_path / "scratch", original_rope=False)
    assert model == backends.VllmModel(str(path), "longrope", (), switch_len=64)  # its L_train
    assert not (tmp_path / "scratch").exists()
    with pytest.raises(ConfigError, match="max_model_len 512 > max_position_embeddings 256"):
        backends.prepare_checkpoint(str(path), 256, 512, tmp_path / "scratch", original_rope=False)


def test_a_searched_attention_factor_is_pinned_for_vllm(toy_model_dir, tmp_path):
    """vLLM's LongRoPE ignores attention_factor and derives sqrt(1 + ln(256/64) / ln 64) unless told."""
    assert backends.vllm_longrope_mscale(256, 64) == pytest.approx((1 + math.log(4) / math.log(64)) ** 0.5)
    path = _tuned(toy_model_dir, tmp_path, attention_factor=1.3, name="searched")
    model = backends.prepare_checkpoint(str(path), 256, 256, tmp_path / "scratch", original_rope=False)
    assert model.rope_type == "longrope" and model.changes[0].startswith("short_mscale = long_mscale = 1.3 ")
    written = json.loads((tmp_path / "scratch" / "model" / "config.json").read_text())["rope_parameters"]
    assert written["short_mscale"] == written["long_mscale"] == written["attention_factor"] == 1.3
    exported = json.loads((path / "config.json").read_text())["rope_parameters"]
    assert {k: v for k, v in written.items() if not k.endswith("_mscale")} == exported


def _logits(model, ids):
    with torch.inference_mode():
        return model(ids).logits


def _cfg256():
    """What evaluate's model loader reads of the config: the toy at L = 256 (L_train 64), float32."""
    from omegaconf import OmegaConf

    return OmegaConf.create({"target_len": 256, "model": {"path": None, "train_len": 64, "dtype": "float32"}})


def test_base_and_training_free_checkpoints_carry_the_rope_the_hf_backend_applies(toy_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    tuned = _tuned(toy_model_dir, tmp_path)  # ships LongRoPE factors: the base rows must drop them
    base = backends.prepare_checkpoint(str(tuned), 256, 256, tmp_path / "base", original_rope=True)
    assert base.rope_type == "default" and base.path == str(tmp_path / "base" / "model")
    assert base.changes[0].startswith("rope_type longrope -> default")
    folder = tmp_path / "base" / "model"
    assert (folder / "model.safetensors").resolve() == (tuned / "model.safetensors").resolve()
    assert not (folder / "config.json").is_symlink()
    ids = torch.randint(3, 300, (1, 200), generator=torch.Generator().manual_seed(0))
    ours = evaluate.load_model(_cfg256(), str(folder))[0]
    theirs = evaluate.load_model(_cfg256(), str(tuned), original_rope=True)[0]
    torch.testing.assert_close(_logits(ours, ids), _logits(theirs, ids), rtol=0, atol=0)

    def yarn(config):
        return RopeScaling.yarn(dataclasses.replace(rope_facts_from_hf_config(config), train_len=64), 256)

    free = backends.prepare_checkpoint(str(toy_model_dir), 256, 256, tmp_path / "free", original_rope=True,
                                       scaling=yarn)
    assert free.rope_type == "yarn" and free.changes == ("rope_parameters -> yarn (yarn)",)
    written = json.loads((tmp_path / "free" / "model" / "config.json").read_text())
    assert written["rope_parameters"]["rope_type"] == "yarn" and written["max_position_embeddings"] == 256
    with pytest.raises(ConfigError, match=r"max_model_len 512 > max_position_embeddings 256 of .* \(yarn\)"):
        backends.prepare_checkpoint(str(toy_model_dir), 256, 512, tmp_path / "long", original_rope=True, scaling=yarn)
    # the original RoPE extrapolates (as transformers' does on the hf path): vLLM's window is raised to cover it
    raised = backends.prepare_checkpoint(str(toy_model_dir), 256, 512, tmp_path / "raised", original_rope=True)
    assert raised.rope_type == "default" and len(raised.changes) == 1
    assert raised.changes[0].startswith("max_position_embeddings ") and raised.changes[0].endswith(" -> 512")
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "free" / "model").eval()
    in_process = evaluate.load_model(_cfg256(), str(toy_model_dir), original_rope=True)[0]
    in_process = yarn(in_process.config).apply_to_model(in_process)
    torch.testing.assert_close(_logits(ours, ids), _logits(in_process, ids), rtol=0, atol=0)


class FakeVllm:
    """Stands in for lm-eval's VLLM: records the generate_until requests, answers from a table."""

    def __init__(self, answers):
        self.answers, self.requests = answers, []

    def generate_until(self, requests, disable_tqdm=False):
        self.requests += requests
        return [self.answers[req.args[1]["max_gen_toks"]] for req in requests]


def test_longbench_runs_on_the_same_backend(toy_model_dir, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    sample = {"input": "Who wrote Hamlet?", "context": "Hamlet is a play by William Shakespeare. " * 20,
              "answers": ["William Shakespeare"], "length": 200, "dataset": "triviaqa", "language": "en",
              "all_classes": None, "_id": "t0"}
    (tmp_path / "triviaqa.jsonl").write_text(json.dumps(sample) + "\n")
    cfg = compose_config(["experiment=llama3_8b_128k", f"eval.longbench.path={tmp_path}",
                          "eval.longbench.tasks=[triviaqa]", "eval.longbench.max_length=128"])
    fake, built = FakeVllm({32: "William Shakespeare"}), []

    def harness(model, cfg_, suite, add_bos_token, length):
        built.append((model.path, suite, backends.vllm_model_args(cfg_, model.path, suite, add_bos_token, length)))
        return fake

    monkeypatch.setattr(backends, "vllm_harness", harness)
    tokenizer = AutoTokenizer.from_pretrained(toy_model_dir)
    model = backends.VllmModel(str(toy_model_dir), "default")
    result = suites.eval_longbench(cfg, model, tokenizer, tmp_path, tmp_path)
    assert result["tasks"]["triviaqa"]["score"] == 100.0
    assert [(p, s, a["max_model_len"]) for p, s, a in built] == [(str(toy_model_dir), "longbench", 128)]
    (request,) = fake.requests
    prompt, kwargs = request.args
    assert "Who wrote" in prompt  # the toy tokenizer drops capitals
    assert kwargs == {"until": [], "max_gen_toks": 32, "do_sample": False, "temperature": 0.0}
    # no data folder: skipped, and no engine started
    skipped = compose_config(["experiment=llama3_8b_128k"])
    assert suites.eval_longbench(skipped, model, tokenizer, tmp_path, tmp_path)["skipped"]
    assert len(built) == 1


def test_lm_eval_suites_get_the_vllm_model_on_that_backend(monkeypatch):
    cfg = compose_config(["experiment=phi3_mini_128k"])
    seen = []

    def harness(model, cfg_, suite, add_bos_token, length):
        seen.append((suite, length))
        return 1

    monkeypatch.setattr(backends, "vllm_harness", harness)
    tokenizer = OmegaConf.create({"bos_token_id": 1})
    for suite in ("ruler", "short"):
        ((engine, lengths),) = suites.suite_engines(cfg, backends.VllmModel("/m", "default"), tokenizer, suite,
                                                    [4096, 8192], 10)
        with engine() as lm:
            assert lm == 1 and lengths == [4096, 8192]
    assert seen == [("ruler", 8192), ("short", 8192)]


def _fake_vllm_engines(monkeypatch, events):
    """lm-eval's VLLM replaced by a stand-in that takes, from its arguments, the factors vLLM >= 0.11.1's LongRoPE
    takes (Phi3LongRoPEScaledRotaryEmbedding: the long ones iff max_model_len > original_max_position_embeddings,
    for the whole engine); events: each engine's start and shutdown, with its max_model_len."""
    import sys
    import types

    class VLLM:
        def __init__(self, **kwargs):
            self.kwargs, length = kwargs, kwargs["max_model_len"]
            rope = json.loads((Path(kwargs["pretrained"]) / "config.json").read_text())["rope_parameters"]
            if rope["rope_type"] != "longrope":
                self.factors = rope["rope_type"]
            else:
                long = length > rope["original_max_position_embeddings"]
                self.factors = rope["long_factor" if long else "short_factor"]
            core = types.SimpleNamespace(shutdown=lambda: events.append(("shutdown", length)))
            self.model = types.SimpleNamespace(llm_engine=types.SimpleNamespace(engine_core=core))
            events.append(("start", length))

    module = types.ModuleType("lm_eval.models.vllm_causallms")
    module.VLLM = VLLM
    monkeypatch.setitem(sys.modules, "lm_eval.models.vllm_causallms", module)
    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda name: "0.11.1" if name == "vllm" else real(name))


def _fake_simple_evaluate(monkeypatch, runs):
    """lm_eval.simple_evaluate replaced: records (the model, its tasks) and answers every RULER sample with its
    first reference (a short task: acc 1)."""
    import lm_eval

    def simple_evaluate(model, tasks, **kwargs):
        runs.append((model, [t["task"] if isinstance(t, dict) else t for t in tasks]))
        samples = {t["task"]: [{"doc": doc, "filtered_resps": [[doc["outputs"][0]]]}
                               for doc in ruler.read_jsonl(t["dataset_kwargs"]["data_files"]["test"])]
                   for t in tasks if isinstance(t, dict)}
        return {"samples": samples, "results": {t: {"acc,none": 1.0} for t in tasks if isinstance(t, str)}}

    monkeypatch.setattr(lm_eval, "simple_evaluate", simple_evaluate)


RULER_TASKS, RULER_LENGTHS = ("niah_single_1", "vt"), (32, 64, 128, 256)


def _ruler_setup(tmp_path):
    """The config (L_train 64, L 256; RULER at 32..256, the short tasks' window 64) and RULER data for it."""
    data = tmp_path / "eval_data"
    (data / "ruler").mkdir(parents=True)
    manifest = {"tasks": {t: {} for t in RULER_TASKS}}
    for task in RULER_TASKS:
        for length in RULER_LENGTHS:
            rows = [{"task": task, "index": i, "input": f"{task} {length} {i}", "gen_prefix": "",
                     "outputs": [f"{i}{length}"], "length": length - 8, "max_length": length,
                     "max_new_tokens": 8} for i in range(2)]
            ruler.write_jsonl(data / "ruler" / f"{task}-{length}.jsonl", rows)
            manifest["tasks"][task][str(length)] = {"file": f"{task}-{length}.jsonl", "mean_tokens": length - 8}
    (data / "ruler.json").write_text(json.dumps(manifest))
    return _ruler_config(), data


def _ruler_config(window=64):
    return compose_config(["experiment=llama3_8b_128k", "target_len=256", "model.train_len=64", "eval.variant=base",
                           f"eval.ruler.tasks=[{','.join(RULER_TASKS)}]",
                           f"eval.ruler.lengths=[{','.join(map(str, RULER_LENGTHS))}]", f"eval.short.window={window}",
                           "eval.short.tasks=[{name: toy_short_needle, metric: 'acc,none'}]"])


def _yarn(config):
    return RopeScaling.yarn(dataclasses.replace(rope_facts_from_hf_config(config), train_len=64), 256)


def _longrope(config):
    """A training-free LongRoPE row's scaling on the toy (64 -> 256; short factors ones)."""
    facts = dataclasses.replace(rope_facts_from_hf_config(config), train_len=64)
    return RopeScaling.longrope(facts, 256, torch.linspace(1.0, 4.0, facts.rotary_dim // 2))


def _run_ruler(cfg, model, tokenizer, data, out):
    out.mkdir(parents=True)
    summary = suites.eval_ruler(cfg, model, tokenizer, data, out)
    return summary, (out / "predictions.jsonl").read_text()


@pytest.fixture
def engines(toy_model_dir, tmp_path, monkeypatch):
    """The RULER set-up at L_train 64 with lm-eval's VLLM and simple_evaluate faked: events (engine starts and
    shutdowns) and runs ((engine, its tasks) per simple_evaluate) recorded."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    cfg, data = _ruler_setup(tmp_path)
    env = SimpleNamespace(cfg=cfg, data=data, tokenizer=AutoTokenizer.from_pretrained(toy_model_dir), events=[],
                          runs=[], tmp=tmp_path)
    _fake_vllm_engines(monkeypatch, env.events)
    _fake_simple_evaluate(monkeypatch, env.runs)
    return env


def _longrope_checkpoint(kind, toy_model_dir, tmp_path):
    """A `longrope` checkpoint as prepare_checkpoint gives it to vLLM: a fine-tuned variant's export, or the base
    under LongRoPE's factors training-free (a scratch config); and its rope_parameters as written."""
    if kind == "exported":
        model = backends.prepare_checkpoint(str(_tuned(toy_model_dir, tmp_path)), 256, 256, tmp_path / "t",
                                            original_rope=False)
    else:
        model = backends.prepare_checkpoint(str(toy_model_dir), 256, 256, tmp_path / "t", original_rope=True,
                                            scaling=_longrope)
    rope = json.loads((Path(model.path) / "config.json").read_text())["rope_parameters"]
    assert model.rope_type == "longrope" and rope["original_max_position_embeddings"] == 64
    assert rope["short_factor"] != rope["long_factor"]
    return model, rope


@pytest.mark.parametrize("kind", ["exported", "training_free"])
def test_a_longrope_checkpoint_runs_each_ruler_cell_on_the_factors_of_its_length(engines, toy_model_dir, kind):
    """Two vLLM engines, in turn: the RULER cells at lengths <= L_train (64) on one whose max_model_len (64)
    keeps vLLM's LongRoPE on the short factors, the longer cells on one (256) with the long factors, as the hf
    path's per-forward switch gives them; the first engine is shut down before the second starts."""
    model, rope = _longrope_checkpoint(kind, toy_model_dir, engines.tmp)
    _run_ruler(engines.cfg, model, engines.tokenizer, engines.data, engines.tmp / "out")
    factors = {task: lm.factors for lm, tasks in engines.runs for task in tasks}
    assert factors == {f"ruler_{t}_{n}": rope["short_factor" if n <= 64 else "long_factor"]
                       for t in RULER_TASKS for n in RULER_LENGTHS}
    assert engines.events == [("start", 64), ("shutdown", 64), ("start", 256), ("shutdown", 256)]
    assert {lm.kwargs["pretrained"] for lm, _ in engines.runs} == {model.path} and model.switch_len == 64


def test_the_short_tasks_get_the_factors_of_their_window(engines, toy_model_dir):
    """One engine of max_model_len eval.short.window: the short factors within L_train, the long ones beyond."""
    model, rope = _longrope_checkpoint("exported", toy_model_dir, engines.tmp)
    assert suites.eval_short(engines.cfg, model, engines.tokenizer, engines.data, engines.tmp)["average"] == 1.0
    suites.eval_short(_ruler_config(window=128), model, engines.tokenizer, engines.data, engines.tmp)
    assert [(lm.factors, tasks) for lm, tasks in engines.runs] == [(rope["short_factor"], ["toy_short_needle"]),
                                                                   (rope["long_factor"], ["toy_short_needle"])]
    assert engines.events == [("start", 64), ("shutdown", 64), ("start", 128), ("shutdown", 128)]


@pytest.mark.parametrize("scaling", [_yarn, None], ids=["yarn", "base"])
def test_static_factors_and_the_original_rope_keep_one_engine(engines, toy_model_dir, scaling):
    model = backends.prepare_checkpoint(str(toy_model_dir), 256, 256, engines.tmp / "m", original_rope=True,
                                        scaling=scaling)
    assert model.switch_len is None
    _run_ruler(engines.cfg, model, engines.tokenizer, engines.data, engines.tmp / "out")
    assert engines.events == [("start", 256), ("shutdown", 256)]
    ((lm, tasks),) = engines.runs
    assert lm.factors == ("yarn" if scaling else "default") and len(tasks) == len(RULER_TASKS) * len(RULER_LENGTHS)


def test_the_two_engines_results_merge_into_the_single_run_result(engines, toy_model_dir, monkeypatch):
    """The RULER result and predictions of the two vLLM runs are those of one run over every cell (the hf path:
    one HFLM), format and content."""
    model, _ = _longrope_checkpoint("exported", toy_model_dir, engines.tmp)
    result, predictions = _run_ruler(engines.cfg, model, engines.tokenizer, engines.data, engines.tmp / "vllm")
    assert len(engines.runs) == 2
    engines.runs.clear()
    monkeypatch.setattr(suites, "harness", lambda model, tok, max_length, batch_size: ("hf", max_length))
    hf = _run_ruler(engines.cfg, object(), engines.tokenizer, engines.data, engines.tmp / "hf")
    assert hf == (result, predictions)
    assert [(lm, len(tasks)) for lm, tasks in engines.runs] == [(("hf", 256 + 128), 8)]
    assert result["lengths"] == list(RULER_LENGTHS) and set(result["average"].values()) == {100.0}

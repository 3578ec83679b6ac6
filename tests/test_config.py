"""Config composition and validation: every experiment composes; bad values fail with the key,
the value and what is accepted."""

import pytest

from longrope2.core.config import (
    available,
    compose_config,
    flatten,
    overrides_from_snakemake,
    to_dict,
)
from longrope2.core.errors import ConfigError

EXPERIMENTS = ["toy", "toy_ablations", "toy_seeds", "smoke", "llama3_8b_128k", "phi3_mini_128k", "phi4_mini_128k",
               "smollm2_16k"]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(experiment):
    cfg = compose_config([f"experiment={experiment}"])
    assert cfg.experiment_name == experiment
    assert cfg.target_len > cfg.model.train_len
    assert cfg.out_dir == f"results/{experiment}"


def test_experiment_list_is_the_conf_folder():
    # experiment=extend composes only with a checkpoint (model.path) and target_len: tests/test_extend.py
    assert set(EXPERIMENTS) | {"extend"} == set(available("experiment"))


@pytest.mark.parametrize(
    ("experiment", "train_len", "target_len", "base", "head_dim"),
    [
        ("llama3_8b_128k", 8192, 131072, 500000.0, 128),
        ("phi3_mini_128k", 2048, 131072, 10000.0, 96),
        ("phi4_mini_128k", 4096, 131072, 10000.0, 128),
    ],
)
def test_paper_experiments_carry_the_paper_settings(experiment, train_len, target_len, base, head_dim):
    cfg = compose_config([f"experiment={experiment}"])
    assert (cfg.model.train_len, cfg.target_len) == (train_len, target_len)
    assert (cfg.model.rope_theta, cfg.model.head_dim) == (base, head_dim)
    assert not cfg.model.pretrain.enabled
    search = cfg.search
    assert (search.population, search.iterations, search.parents) == (64, 40, 32)
    assert (search.mutants, search.crossovers, search.mutation_prob) == (16, 16, 0.3)
    assert (search.grid, search.monotone) == (0.01, "non_decreasing")
    assert (cfg.train.lr, cfg.train.global_batch, tuple(cfg.train.betas)) == (2e-5, 64, (0.9, 0.95))
    assert cfg.train.length_mix[0].max_len == train_len
    assert [b.tokens for b in cfg.train.length_mix] == [3_000_000_000, 3_000_000_000, 4_000_000_000]  # Table 1
    # §4.1: short documents from FineWeb-Edu, long ones (buckets 1, 2: L_train ... 200k) from RedPajama / StarCoder
    assert {c.name: list(c.buckets) for c in cfg.data.train_set.corpora} == {
        "redpajama_v1": [1, 2], "redpajama_v2": [1, 2], "starcoder": [1, 2], "fineweb_edu": [0]}
    assert (cfg.train.epochs, cfg.train.warmup_steps, cfg.train.weight_decay, cfg.train.grad_clip) == (1, 40, 0.0, 1.0)
    assert (cfg.train.processes, cfg.resources.train.gpu, cfg.train.distributed) == (8, 8, "fsdp")


def test_interpolations_follow_overrides():
    cfg = compose_config(["model.train_len=256", "target_len=2048"])
    assert cfg.train.length_mix[0].max_len == 256
    assert cfg.train.length_mix[1].max_len == 2048


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["experiment=nope"],
         "experiment='nope' is not a known experiment; accepted: extend, llama3_8b_128k, phi3_mini_128k, "
         "phi4_mini_128k, smoke, smollm2_16k, toy, toy_ablations, toy_seeds"),
        (["target_len=128"],
         "target_len = 128: accepted: a length > model.train_len = 128"),
        (["experiment=llama3_8b_128k", "target_len=4096"],
         "target_len = 4096: accepted: a length > model.train_len = 8192"),
        (["search.population=0"], "search.population = 0: accepted: a value >= 1"),
        (["model.train_len=-8"], "model.train_len = -8: accepted: a value >= 1"),
        (["train.lr=0"], "train.lr = 0: accepted: a value > 0"),
        (["methods=[none,magic]"],
         'methods.1 = "magic": accepted: none, pi, ntk, yarn, longrope, longrope2, ntk_rcd, '
         "yarn_rcd, longrope2_plain_ppl, longrope2_no_mixed, longrope2_all_dims"),
        (["experiment=llama3_8b_128k", "model.path=null"],
         "model.path = null: experiment 'llama3_8b_128k' needs a model location"),
        (["experiment=phi3_mini_128k", "model.path=''"],
         "model.path = \"\": experiment 'phi3_mini_128k' needs a model location"),
        (["search.monotone=up"], 'search.monotone = "up": accepted: non_decreasing, strictly_increasing'),
        (["model.partial_rotary_factor=0.3"],
         "model.partial_rotary_factor = 0.3: accepted: a factor that makes head_dim x factor"),
        (["search.populaton=3"], "unknown config key 'search.populaton'"),
        (["seeds=[]"], "seeds = []: accepted: a list of at least 1 item"),
        (["seeds=[0,0]"], "seeds = [0, 0]: accepted: a list without repeated items"),
        (["seeds=[0,1]", "run_seed=2"], "run_seed = 2: accepted: null or one of seeds = [0, 1]"),
        (["model=nope"],
         "model='nope' is not a known model; accepted: checkpoint, llama3_8b, phi3_mini, phi4_mini, smollm2_135m, "
         "toy"),
        (["search=nope"], "search='nope' is not a known search; accepted: paper, reference"),
        (["search.preset=reference"],
         "search.preset='reference': the preset is the config group `search`; select it with search=reference "
         "(accepted: paper, reference)"),
        (["search.operators=swap"], 'search.operators = "swap": accepted: plateau, neighbours'),
        (["search.initial=grid"], 'search.initial = "grid": accepted: alg1, staircase'),
        (["search.crossover_base=best"], 'search.crossover_base = "best": accepted: random, better'),
        (["search.initial_population=4"], "search.initial_population = 4: accepted: null or >= search.parents = 16"),
        (["search.c_range=[30,24]"], "search.c_range = [30, 24]: accepted: null or [lo, hi] with lo <= hi"),
        # the first population holds a seed per c in [d10_tcd, d_tcd], known before any data or model loads
        (["experiment=phi3_mini_128k", "model.train_len=256", "target_len=2048", "search.population=6",
          "search.parents=4", "search.mutants=1", "search.crossovers=1"],
         "search.population = 6: accepted: >= 13, the first population holds every seed (one seed per c in c = "
         "[8, 20]: d10_tcd = 8, d_tcd = 20 of model.head_dim 96, model.rope_theta 10000, L_train 256 -> L 2048)"),
        (["experiment=llama3_8b_128k", "search=reference", "search.initial_population=7"],
         "search.initial_population = 7: accepted: >= 8, the first population holds every seed (8 staircase seeds "
         "per c in c = [34, 34]"),
        # the paper's regime: the toy fine-tunes on at most 10 % of its base's pretraining tokens
        (["train.length_mix=[{max_len:128,tokens:400000},{max_len:1024,tokens:800000}]"],
         "train.length_mix = 1200000 fine-tuning tokens: accepted: at most train.max_pretrain_share = 0.1 x "
         "1228800 pretraining tokens = 122880"),
        (["experiment=llama3_8b_128k", "train.max_pretrain_share=0.0001"],
         "train.length_mix = 10000000000 fine-tuning tokens: accepted: at most train.max_pretrain_share = 0.0001 x "
         "15000000000000 pretraining tokens = 1500000000"),
        (["experiment=llama3_8b_128k", "model.pretrain_tokens=null", "train.max_pretrain_share=0.01"],
         "train.max_pretrain_share = 0.01: accepted: null, or a share with model.pretrain_tokens set"),
        (["eval.training_free_suites=[ruler]"],
         'eval.training_free_suites = ["ruler"]: accepted: suites of eval.suites (niah, short, ppl)'),
        (["eval.niah.runs_by_length={1024:0}"], "eval.niah.runs_by_length.1024 = 0: accepted: a value >= 1"),
        # data.train_set.corpora[i].buckets: indices of train.length_mix, every bucket fed by some corpus
        (["experiment=llama3_8b_128k", "data.train_set.corpora.3.buckets=[3]"],
         "data.train_set.corpora.3.buckets = [3] (corpus 'fineweb_edu'): accepted: null (every bucket) or a non-empty "
         "list of bucket indices of train.length_mix, 0 ... 2 (3 buckets; 0 is the short one, max_len = "
         "model.train_len)"),
        (["experiment=phi3_mini_128k", "data.train_set.corpora.3.buckets=[1,2]"],
         "data.train_set.corpora.<i>.buckets = {redpajama_v1: [1, 2], redpajama_v2: [1, 2], starcoder: [1, 2], "
         "fineweb_edu: [1, 2]}: no corpus feeds bucket 0 of train.length_mix; accepted: lists that together cover "
         "every bucket 0 ... 2 (null or absent: every bucket)"),
        (["experiment=phi4_mini_128k", "data.train_set.corpora.0.buckets=[1,1]"],
         "data.train_set.corpora.0.buckets = [1, 1]: accepted: a list without repeated items"),
        # a paper preset on two buckets: its long corpora name bucket 2
        (["experiment=llama3_8b_128k", "train.length_mix=[{max_len:8192,tokens:1000},{max_len:131072,tokens:1000}]"],
         "data.train_set.corpora.0.buckets = [1, 2] (corpus 'redpajama_v1'): accepted: null (every bucket) or a "
         "non-empty list of bucket indices of train.length_mix, 0 ... 1"),
    ],
)
def test_bad_values_are_rejected_with_key_value_and_accepted(overrides, message):
    with pytest.raises(ConfigError) as err:
        compose_config(overrides)
    assert message in str(err.value)


def test_all_errors_are_reported_at_once():
    with pytest.raises(ConfigError) as err:
        compose_config(["search.population=0", "search.iterations=-1"])
    assert "search.population = 0" in str(err.value)
    assert "search.iterations = -1" in str(err.value)


def test_snakemake_config_becomes_hydra_overrides():
    # `--config` keys can't contain dots: nested keys come as YAML mappings or `overrides`.
    config = {
        "experiment": "llama3_8b_128k",
        "seed": 3,
        "model": {"path": "/models/llama3"},
        "overrides": ["search.population=48", "search.parents=16", "eval.ruler.lengths=[4096,8192]"],
    }
    overrides = overrides_from_snakemake(config)
    assert overrides == [
        "experiment=llama3_8b_128k",
        "seed=3",
        "model.path=/models/llama3",
        "search.population=48",
        "search.parents=16",
        "eval.ruler.lengths=[4096,8192]",
    ]
    cfg = compose_config(overrides)
    assert (cfg.model.path, cfg.search.population, cfg.seed, list(cfg.seeds)) == ("/models/llama3", 48, 3, [3])
    assert list(cfg.eval.ruler.lengths) == [4096, 8192]
    assert overrides_from_snakemake({"overrides": "seed=1", "flag": True}) == ["flag=true", "seed=1"]


def test_flatten_and_to_dict_drop_hydra():
    data = to_dict(compose_config())
    assert "hydra" not in data
    flat = flatten(data)
    assert flat["model.arch.hidden_size"] == 128
    assert flat["search.population"] == 32


def test_search_presets_are_the_paper_and_the_reference_code():
    paper = compose_config(["experiment=llama3_8b_128k", "model.path=/m"]).search
    assert (paper.preset, paper.population, paper.initial_population, paper.iterations) == ("paper", 64, None, 40)
    assert (paper.parents, paper.mutants, paper.crossovers, paper.initial) == (32, 16, 16, "alg1")
    assert (paper.monotone, paper.critical_dim_mode, paper.c_range, paper.last_step_max) == \
        ("non_decreasing", "population", None, None)
    assert (paper.operators, paper.crossover_base) == ("plateau", "random")
    ref = compose_config(["experiment=llama3_8b_128k", "model.path=/m", "search=reference"]).search
    assert (ref.preset, ref.population, ref.initial_population, ref.iterations) == ("reference", 64, 128, 60)
    assert (ref.parents, ref.mutants, ref.crossovers, ref.initial) == (32, 16, 16, "staircase")
    assert (ref.monotone, ref.critical_dim_mode, ref.c_range, ref.last_step_max) == \
        ("strictly_increasing", "per_c", None, 4.0)
    assert (ref.crossover_base, ref.crossover_tries, ref.operators) == ("better", 20, "plateau")
    # the experiment's own numbers still win over the preset's (the toy's budget)
    toy = compose_config(["search=reference"]).search
    assert (toy.preset, toy.population, toy.iterations, toy.monotone) == ("reference", 32, 8, "strictly_increasing")

"""Context parallelism keeps LongRoPE's short/long switch of the whole row (training.parallel.whole_row_regime).

transformers' longrope rotary takes the long factors iff max(position_ids) + 1 > L_train, on the positions it
is given; under context parallelism those are one shard's. A row of L = 40 > L_train = 32 over 2 processes
(head-tail shards of 10 tokens: rank 0 holds 0-9 and 30-39, rank 1 holds 10-29) leaves rank 1 with positions
all below L_train: without the fix it would take the short factors. Two gloo processes run the real
`sequence_sharded` (torch's context_parallel shards the buffers) on a tiny Llama and must apply the long
factors on both ranks and give the one-process loss of the whole row.

PyTorch's ring attention has no CPU kernel (its dispatcher handles the CUDA SDPA ops only), so inside the
context the test stands in an exact all-gather attention for it: each rank's queries against every rank's
keys and values, causal by position.
"""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import smoke_args
from numerics import FLOAT32_REL

from longrope2.core.config import compose_config
from longrope2.core.errors import ConfigError
from longrope2.lm import losses
from longrope2.rope.scaling import rotary_modules
from longrope2.training import parallel
from longrope2.training import step as step_

L, L_TRAIN, HEAD_DIM, VOCAB = 40, 32, 16, 64
SHORT, LONG = [1.0] * (HEAD_DIM // 2), [1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 8.0]
_SDPA = F.scaled_dot_product_attention  # torch's own, before any context_parallel patches it


def _tiny_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, head_dim=HEAD_DIM, max_position_embeddings=4 * L_TRAIN, initializer_range=0.2,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10_000.0, "short_factor": SHORT,
                         "long_factor": LONG, "original_max_position_embeddings": L_TRAIN},
        attn_implementation="sdpa", dtype=torch.float32)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).float().eval()


def _row() -> dict[str, torch.Tensor | None]:
    """One long row (1, L): a single document, positions 0..L-1, the inputs of a long-row forward pass."""
    ids = torch.randint(0, VOCAB, (1, L), generator=torch.Generator().manual_seed(1))
    labels = losses.causal_lm_labels(ids, None)
    return {"input_ids": ids, "position_ids": torch.arange(L)[None], "attention_mask": None, "labels": labels,
            "weights": losses.label_weights(torch.ones(1, L), labels)}


def _recorder(model: torch.nn.Module) -> tuple[list[dict[str, torch.Tensor]], list]:
    """The inverse frequencies and cos every rotary module applies, per call."""
    seen: list[dict[str, torch.Tensor]] = []

    def hook(module, args, output):
        seen.append({"inv_freq": module.inv_freq.clone(), "cos": output[0].detach().clone()})

    return seen, [m.register_forward_hook(hook) for _, m in rotary_modules(model)]


def _gathered_sdpa(positions: torch.Tensor):
    """Exact attention of this rank's queries over all ranks' keys and values (causal by position)."""

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        assert attn_mask is None and is_causal  # sequence_sharded's hook: plain causal attention
        world = dist.get_world_size()
        keys, values, where = ([torch.empty_like(t) for _ in range(world)] for t in (key, value, positions))
        dist.all_gather(keys, key.contiguous())
        dist.all_gather(values, value.contiguous())
        dist.all_gather(where, positions)
        mask = torch.cat(where, 1)[0][None, :] <= positions[0][:, None]  # (local queries, all keys)
        return _SDPA(query, torch.cat(keys, 2), torch.cat(values, 2), attn_mask=mask, scale=scale, **kwargs)

    return sdpa


def _worker(rank: int, store: str, weights: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    from torch.distributed.device_mesh import init_device_mesh

    lm = _tiny_llama()
    lm.load_state_dict(torch.load(weights))
    model, inputs = step_.ChunkedLossLM(lm, 16), _row()
    with torch.no_grad(), parallel.sequence_sharded(init_device_mesh("cpu", (2,)), model, inputs):
        seen, hooks = _recorder(model)  # the model's forward only, not the regime's probe
        patched, F.scaled_dot_product_attention = F.scaled_dot_product_attention, _gathered_sdpa(
            inputs["position_ids"])
        try:
            total, weight = model(**inputs)
        finally:
            F.scaled_dot_product_attention = patched  # context_parallel restores its own patch on exit
            for hook in hooks:
                hook.remove()
    with open(f"{out}/rank{rank}.pkl", "wb") as fh:
        pickle.dump({"positions": inputs["position_ids"].clone(), "seen": seen, "total": float(total),
                     "weight": weight}, fh)
    dist.destroy_process_group()


def test_every_shard_keeps_the_whole_rows_long_factors_and_its_loss(tmp_path):
    lm = _tiny_llama()
    torch.save(lm.state_dict(), tmp_path / "weights.pt")
    model, inputs = step_.ChunkedLossLM(lm, 16), _row()
    seen, hooks = _recorder(model)
    with torch.no_grad():
        total, weight = model(**inputs)  # one process, the whole row
    for hook in hooks:
        hook.remove()
    (rotary,) = [m for _, m in rotary_modules(lm)]
    short, long = rotary.original_inv_freq.clone(), seen[0]["inv_freq"]
    assert float((long - short).abs().max()) > 0.1 * float(short.abs().max())  # the factors differ clearly
    full_cos = seen[0]["cos"][0]  # (L, head_dim)

    torch.multiprocessing.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path / "weights.pt"),
                                               str(tmp_path)), nprocs=2)
    ranks = []
    for r in range(2):
        with open(tmp_path / f"rank{r}.pkl", "rb") as fh:
            ranks.append(pickle.load(fh))
    positions = [d["positions"][0] for d in ranks]
    assert torch.equal(torch.sort(torch.cat(positions)).values, torch.arange(L))  # the shards partition the row
    assert int(positions[0].max()) + 1 > L_TRAIN >= int(positions[1].max()) + 1  # rank 1 alone looks short
    for r, d in enumerate(ranks):
        (call,) = d["seen"]  # (a) one rotary call per rank, with the long factors, as the whole row gets
        assert torch.equal(call["inv_freq"], long), f"rank {r} applied other frequencies than the row's long ones"
        assert torch.allclose(call["cos"][0], full_cos[positions[r]], rtol=0, atol=1e-6), f"rank {r}: cos"
    assert torch.equal(rotary.original_inv_freq, short)  # (the one-process model was never pinned)
    # (b) the shards' weighted NLL sums add up to the whole row's
    assert sum(d["weight"] for d in ranks) == weight
    sharded = sum(d["total"] for d in ranks)
    assert abs(sharded - float(total)) <= FLOAT32_REL * abs(float(total)), (sharded, float(total))


def test_pinning_restores_the_rotary_and_keeps_a_short_row_short():
    lm = _tiny_llama()
    (rotary,) = [m for _, m in rotary_modules(lm)]
    short = rotary.original_inv_freq.clone()
    x = torch.zeros(1)
    with parallel.whole_row_regime(lm, torch.arange(L)[None]):  # a long row: a short-looking piece gets long
        cos, _ = rotary(x, torch.arange(10)[None])
        assert not torch.equal(rotary.inv_freq, short)
    assert torch.equal(rotary.original_inv_freq, short)
    rotary(x, torch.arange(10)[None])
    assert torch.equal(rotary.inv_freq, short)  # unpinned: the switch reads the positions again
    with parallel.whole_row_regime(lm, torch.arange(L_TRAIN)[None]):  # a row within L_train stays short
        rotary(x, torch.arange(10)[None])
        assert torch.equal(rotary.inv_freq, short)


@pytest.mark.parametrize("target_len, message", [
    (36, None),  # just above model.train_len = 32: accepted (it took > 2 x model.train_len before)
    (34, "target_len = 34: accepted with train.context_parallel = 2: a multiple of 2 x 2 (head-tail shards)"),
])
def test_context_parallel_accepts_any_length_of_whole_head_tail_shards(target_len, message):
    args = [*smoke_args(), "model.train_len=32", f"target_len={target_len}", "train.processes=2",
            "train.distributed=fsdp", "train.micro_batch=1", "train.context_parallel=2", "train.global_batch=2",
            "train.length_mix=[{max_len:32,tokens:256},{max_len:%d,tokens:256}]" % target_len,
            "data.train_set.long_lengths=[%d]" % target_len]
    if message is None:
        assert compose_config(args).target_len == target_len
        return
    with pytest.raises(ConfigError) as err:
        compose_config(args)
    assert f"  {message}" in str(err.value).splitlines(), str(err.value)

"""Decode steps padded to buckets over fixed buffers (model/decode_graphs.py), as CUDA graphs
replay them, checked on the CPU without capture against the ordinary forward: logits, routed
ids, the KV cache they leave, and the engine's output through a real RankWorker. The capture
itself is checked on a GPU (tests/test_gpu.py)."""

from __future__ import annotations

import pytest
import torch

from maverick_ray.config import EngineConfig, ModelConfig, ParallelConfig
from maverick_ray.engine.engine import Engine
from maverick_ray.engine.sampling import SamplingParams
from maverick_ray.engine.worker import RankWorker
from maverick_ray.model.decode_graphs import DecodeGraphs, batch_bucket, blocks_bucket
from maverick_ray.model.kv_cache import PagedKVCache
from maverick_ray.parallel.placement import ExpertPlacement

from engine_helpers import greedy_reference, prompts_for
from graph_helpers import twin_decode


def test_buckets():
    assert [batch_bucket(b, 32) for b in (1, 2, 3, 5, 9, 17, 25, 32)] == [1, 2, 4, 8, 16, 24, 32, 32]
    assert batch_bucket(5, 6) == 6 and batch_bucket(7, 6) is None and batch_bucket(40, 40) == 40
    assert [blocks_bucket(w) for w in (0, 1, 2, 3, 5, 64, 65)] == [1, 1, 2, 4, 8, 64, 128]


def test_graphs_need_a_scratch_page(tiny_ckpt):
    w = worker(tiny_ckpt)
    with pytest.raises(ValueError, match="scratch page"):
        DecodeGraphs(w.model, PagedKVCache(w.cache.layout, 8), 4, capture=False)


def worker(ckpt, **engine) -> RankWorker:
    experts = ModelConfig.from_pretrained(ckpt).text.num_local_experts
    cfg = EngineConfig(cpu_kernels="off", max_num_seqs=6, max_model_len=256, **engine)
    return RankWorker(ckpt, 0, ExpertPlacement.contiguous(experts, 1), cfg)


def test_padded_steps_match_the_ordinary_forward(tiny_ckpt):
    """One sequence, then two, then three (bucket 4: one padded row), decoding across the chunked
    layers' 32-token chunk boundaries, tables 1 to 8 blocks wide: logits, routed ids, dispatcher
    counts and the KV cache equal the ordinary forward's (graph_helpers.twin_decode)."""
    out = twin_decode(worker(tiny_ckpt), capture=False, rtol=1e-4, atol=1e-4)
    assert out["widths"] == {1, 2, 4, 8} and out["padded_steps"] == 40
    assert out["stats"]["replays"] == 60 and {key[0] for key in out["stats"]["buckets"]} == {1, 2, 4}


def test_steps_that_do_not_qualify_run_the_ordinary_way(tiny_ckpt):
    w = worker(tiny_ckpt)
    graphs = DecodeGraphs(w.model, PagedKVCache(w.cache.layout, 8, scratch_page=True), 2, capture=False)
    assert graphs.qualifies([1, 1]) and not graphs.qualifies([1, 1, 1]) and not graphs.qualifies([2, 1])
    assert not graphs.qualifies([])
    w.force_expert(3)   # a routing test hook would be baked into a graph
    assert not graphs.qualifies([1])
    x = torch.zeros(3, w.config.text.hidden_size)
    assert graphs.run(x, [0, 0, 0], [1, 1, 1], [[0] * 3] * 4, [[[0]] * 3] * 4) is None


def test_engine_decodes_through_padded_steps_as_the_reference(tiny_ckpt):
    """A real engine whose rank runs its decode steps through DecodeGraphs (without capture, on
    the CPU): greedy outputs equal the single-process reference, concurrent and one by one."""
    prompts = prompts_for(tiny_ckpt)
    want = greedy_reference(tiny_ckpt, prompts, 40, use_hf=False)
    greedy = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    cfg = EngineConfig(cpu_kernels="off", max_num_seqs=4, max_model_len=256)
    with Engine(tiny_ckpt, ParallelConfig(ep_size=1), cfg) as eng:
        rank = eng.stats()["ranks"][0]
        assert rank["device"] == "cpu" and not rank["cuda_graphs"] and rank["cuda_graphs_off"] == "not a GPU rank"
        assert eng.ranks.call("use_decode_graphs", False) == [None]
        steps = []
        eng.add_step_listener(steps.append)
        streams = [eng.add_request(p, greedy) for p in prompts]
        together = [[ev.token_id for ev in s if ev.token_id is not None] for s in streams]
        alone = [eng.generate(p, greedy)["token_ids"] for p in prompts]
        stats = eng.ranks.call("decode_graph_stats")[0]
    assert together == want and alone == want
    assert stats["replays"] >= 2 * 39 and stats["failed"] is None
    assert {b for b, _ in stats["buckets"]} >= {1, 4}
    decodes = [s for s in steps if s.admitted == 0 and s.num_tokens]
    assert decodes and all(s.rank_received == [[s.num_tokens] * len(s.expert_counts)] for s in decodes)
    assert all([sum(c) for c in s.expert_counts] == [s.num_tokens] * len(s.expert_counts) for s in decodes)


def test_expert_row_bounds_match_bincount():
    """moe.expert_row_bounds (the grouped GEMMs' offsets and the Triton kernels' bounds, searched
    on the device instead of CUDA's host-syncing bincount) against bincount's cumulative sums,
    with empty experts and no rows at all."""
    from maverick_ray.model.moe import expert_row_bounds

    g = torch.Generator().manual_seed(0)
    for rows in (0, 1, 9, 64):
        ids = torch.randint(0, 7, (rows,), generator=g)
        ids[ids == 2] = 5
        order = torch.argsort(ids, stable=True)
        ends = torch.cumsum(torch.bincount(ids, minlength=7), 0).to(torch.int32)
        assert torch.equal(expert_row_bounds(ids, order, 7, ends_only=True), ends)
        assert expert_row_bounds(ids, order, 7).tolist() == [0] + ends.tolist()

"""Decode steps run two ways on twin KV caches: the ordinary forward and DecodeGraphs (padded to
buckets; captured as CUDA graphs when asked). Used by the CPU tests (no capture) and the GPU
tests (capture)."""

from __future__ import annotations

import torch

from maverick_ray.engine.kv_blocks import BlockTables
from maverick_ray.model.batch import ForwardBatch
from maverick_ray.model.decode_graphs import DecodeGraphs, batch_bucket, blocks_bucket
from maverick_ray.model.kv_cache import KVView, PagedKVCache

from engine_helpers import prompts_for

PAGES = 96


@torch.inference_mode()
def twin_decode(w, capture: bool, rtol: float, atol: float, steps: int = 60, max_batch: int = 6) -> dict:
    """Prefills the three prompts of prompts_for (5, 17 and 40 tokens) the ordinary way into both
    caches, then decodes `steps` tokens: sequence 0 alone for 10 steps, with 1 for 10 more, then
    all three (a padded row in bucket 4). Each step runs the ordinary forward on one cache and
    DecodeGraphs on the other, fed the ordinary path's greedy tokens, and checks the logits
    (within rtol/atol; on a GPU in bf16 also the argmax where the top two are 0.05 apart), the
    routed ids and the dispatcher's counts. At the end the caches must hold the same keys and
    values. Returns the table widths seen, the steps with padding and DecodeGraphs.stats()."""
    model, layout, dev = w.model, w.cache.layout, w.device
    plain = PagedKVCache(layout, PAGES, w.dtype, dev)
    padded = PagedKVCache(layout, PAGES, w.dtype, dev, scratch_page=True)
    graphs = DecodeGraphs(model, padded, max_batch=max_batch, capture=capture)
    tables = BlockTables(layout, PAGES)
    G = layout.num_groups
    last, length = {}, {}

    def forward(cache, starts, lengths, ids, first, pages, routed=None):
        batch = ForwardBatch.build(starts, lengths, device=dev, kv=KVView(layout, starts, lengths, first, pages, dev))
        return model(batch=batch, cache=cache, inputs_embeds=model.embed(ids), routed_ids=routed)

    def plan(seqs, starts, ends):
        views = [tables.allocate(s, a, b) for s, a, b in zip(seqs, starts, ends)]
        return [[v[0][g] for v in views] for g in range(G)], [[v[1][g] for v in views] for g in range(G)]

    for i, p in enumerate(prompts_for(w.checkpoint)):
        first, pages = plan([i], [0], [len(p)])
        for cache in (plain, padded):
            logits = forward(cache, [0], [len(p)], torch.tensor(p, device=dev), first, pages)
        last[i], length[i] = int(logits[-1].argmax()), len(p)
        tables.trim(i, len(p))
    widths, padded_steps = set(), 0
    for step in range(steps):
        seqs = [0] if step < 10 else [0, 1] if step < 20 else [0, 1, 2]
        starts = [length[s] for s in seqs]
        first, pages = plan(seqs, starts, [s + 1 for s in starts])
        widths.add(blocks_bucket(max(len(p) for group in pages for p in group)))
        ids = torch.tensor([last[s] for s in seqs], device=dev)
        want_routed, got_routed = [], []
        want = forward(plain, starts, [1] * len(seqs), ids, first, pages, want_routed).float()
        model.moe_blocks[0].dispatcher.begin_step(None)
        got = graphs.run(model.embed(ids), starts, [1] * len(seqs), first, pages, got_routed)
        assert got is not None, graphs.stats()
        got = got.float()
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
        top2 = want.topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > 0.05
        assert torch.equal(got.argmax(-1)[clear], want.argmax(-1)[clear]), step
        if w.dtype == torch.float32:   # bf16 rounding may flip a near-tie route; fp32 must not
            assert [r.tolist() for r in got_routed] == [r.tolist() for r in want_routed]
        else:
            agree = sum((a == b).sum().item() for a, b in zip(got_routed, want_routed))
            assert agree >= 0.9 * sum(r.numel() for r in want_routed)
        assert [r.shape for r in got_routed] == [r.shape for r in want_routed]
        received = model.moe_blocks[0].dispatcher.stats.received_per_layer
        assert received == {b.layer: len(seqs) for b in model.moe_blocks}
        padded_steps += batch_bucket(len(seqs), max_batch) > len(seqs)
        for s, tok in zip(seqs, want.argmax(-1).tolist()):
            last[s], length[s] = tok, length[s] + 1
            tables.trim(s, length[s])
    rows = PAGES * layout.block_size
    for a, b in zip(plain.k + plain.v, padded.k + padded.v):   # the same keys and values, scratch page aside
        torch.testing.assert_close(b[:rows].float(), a.float(), rtol=rtol, atol=atol)
    return {"widths": widths, "padded_steps": padded_steps, "stats": graphs.stats()}

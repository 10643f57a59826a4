"""Several sequences in one ForwardBatch give the same logits as each sequence alone."""

from __future__ import annotations

import torch

from maverick_ray.model.batch import ForwardBatch
from maverick_ray.model.kv_cache import PagedKVCache

from hf_reference import hf_text_model, ours_from_hf


@torch.no_grad()
def test_mixed_prefill_and_batched_decode_match_single_sequences():
    hf, d = hf_text_model(dict(attention_chunk_size=8, floor_scale=4, use_qk_norm=True))
    model = ours_from_hf(hf, d)
    cfg = model.cfg
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, cfg.vocab_size, (n,), generator=g) for n in (5, 12, 1, 9)]

    def new_cache(slots):
        return PagedKVCache.for_sequences(cfg, slots, 64)

    # Reference: each sequence alone, greedy for 10 steps.
    ref = []
    for p in prompts:
        cache, out = new_cache(1), []
        logits = model(p, ForwardBatch.single(p.numel()), cache)
        steps = [logits[0]]
        for i in range(10):
            out.append(int(steps[-1].argmax()))
            steps.append(model(torch.tensor(out[-1:]), ForwardBatch.single(1, start=p.numel() + i), cache)[0])
        ref.append(torch.stack(steps))

    # Batched: sequences 0 and 1 prefill together (slots 3 and 0), 2 and 3 join one step later
    # while 0 and 1 decode (a mixed batch); afterwards everyone decodes in one batch.
    cache = new_cache(4)
    slots = [3, 0, 2, 1]
    got = [[] for _ in prompts]
    toks = [None] * 4
    pos = [0] * 4
    first = model(torch.cat(prompts[:2]), ForwardBatch.build([0, 0], [5, 12], slots=slots[:2]), cache)
    for i in range(2):
        got[i].append(first[i]); toks[i] = int(first[i].argmax()); pos[i] = prompts[i].numel()
    mixed_ids = torch.cat([torch.tensor([toks[0], toks[1]]), prompts[2], prompts[3]])
    mixed = model(mixed_ids, ForwardBatch.build([pos[0], pos[1], 0, 0], [1, 1, 1, 9], slots=slots), cache)
    for i in range(4):
        got[i].append(mixed[i])
        toks[i] = int(mixed[i].argmax())
    pos = [pos[0] + 1, pos[1] + 1, 1, 9]
    for _ in range(10):
        out = model(torch.tensor(toks), ForwardBatch.build(pos, [1] * 4, slots=slots), cache)
        for i in range(4):
            got[i].append(out[i]); toks[i] = int(out[i].argmax()); pos[i] += 1
    for i in range(4):
        n = len(ref[i])
        diff = (torch.stack(got[i][:n]) - ref[i]).abs().max()
        assert diff <= 1e-4, f"sequence {i}: max abs diff {diff}"


@torch.no_grad()
def test_tokens_past_the_kv_cache_length_are_refused_before_any_write():
    hf, d = hf_text_model({})
    model = ours_from_hf(hf, d)
    cfg = model.cfg
    cache = PagedKVCache.for_sequences(cfg, 2, 8, block_size=4)
    model(torch.arange(3, 10), ForwardBatch.build([0, 0], [7, 0], slots=[0, 1]), cache)  # fits: positions 0..6
    before = [k.clone() for k in cache.k]
    try:
        model(torch.arange(3, 5), ForwardBatch.build([0, 7], [0, 2], slots=[1, 0]), cache)  # slot 0 positions 7, 8
    except IndexError as e:
        assert "position 8 is beyond the KV cache length 8" in str(e)
    else:
        raise AssertionError("a write past the cache length was not refused")
    assert all(torch.equal(a, b) for a, b in zip(before, cache.k))


@torch.no_grad()
def test_one_step_mixing_decodes_fresh_prompts_and_a_continued_prompt_matches_each_alone():
    """One forward with two decode rows, two fresh prompts (one padded SDPA) and a prompt that
    continues over its cached prefix (own SDPA) gives each sequence's logits as when run alone."""
    hf, d = hf_text_model(dict(attention_chunk_size=8, floor_scale=4))
    model = ours_from_hf(hf, d)
    cfg = model.cfg
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(3, cfg.vocab_size, (n,), generator=g) for n in (6, 4, 6, 7, 9)]
    done = [5, 3, 0, 0, 5]  # tokens already cached before the mixed step

    def cache_for(slots):
        return PagedKVCache.for_sequences(cfg, slots, 32)

    want = []
    for s, c in zip(seqs, done):
        cache = cache_for(1)
        if c:
            model(s[:c], ForwardBatch.single(c), cache)
        want.append(model(s[c:], ForwardBatch.single(s.numel() - c, start=c), cache)[0])
    cache = cache_for(5)
    slots = [4, 0, 2, 1, 3]
    for i, (s, c) in enumerate(zip(seqs, done)):
        if c:
            model(s[:c], ForwardBatch.build([0], [c], slots=[slots[i]]), cache)
    ids = torch.cat([s[c:] for s, c in zip(seqs, done)])
    got = model(ids, ForwardBatch.build(done, [s.numel() - c for s, c in zip(seqs, done)], slots=slots), cache)
    for i in range(5):
        assert (got[i] - want[i]).abs().max() <= 1e-4, f"sequence {i}"

"""Through the engine: long prompts prefilled in chunks across many attention chunks equal
transformers; running streams keep decoding while a long prompt prefills; a KV budget too
small for every request at once preempts and still finishes every request unchanged."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from maverick_ray.config import EngineConfig, ModelConfig, ParallelConfig
from maverick_ray.engine.engine import Engine
from maverick_ray.engine.sampling import SamplingParams
from maverick_ray.model.kv_cache import KVLayout

from engine_helpers import greedy_reference

LONG = 1000  # tokens: ~31 attention chunks of the tiny checkpoint (chunk 32)


def long_prompts(ckpt) -> list[list[int]]:
    vocab = ModelConfig.from_pretrained(ckpt).text.vocab_size
    g = torch.Generator().manual_seed(7)
    return [torch.randint(10, vocab - 50, (n,), generator=g).tolist() for n in (LONG, 333)]


@pytest.mark.parametrize("ep", [1, 2])
def test_long_prompts_in_chunks_across_attention_chunks_equal_transformers(tiny_ckpt, ep, request):
    if ep > 1:
        request.getfixturevalue("ray_local")
    prompts = long_prompts(tiny_ckpt)
    want = greedy_reference(tiny_ckpt, prompts, 40, use_hf=True)  # decoding crosses chunk boundaries too
    cfg = EngineConfig(max_num_seqs=4, max_prefill_tokens=96)   # every prompt split in many prefill chunks
    with Engine(tiny_ckpt, ParallelConfig(ep_size=ep), cfg) as eng:
        got = [eng.generate(p, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))["token_ids"]
               for p in prompts]
        assert eng.max_model_len == ModelConfig.from_pretrained(tiny_ckpt).text.max_position_embeddings
    assert got == want


@pytest.mark.parametrize("budget", [7, 20])
def test_prompts_prefilled_a_few_tokens_a_step_side_by_side_equal_transformers(tiny_ckpt, budget):
    """Both prompts at once, a few tokens a step: chunks of at most 8 tokens that continue a cached
    prompt go through the native kernel (read in place, one call with the decodes), longer ones
    through flash SDPA; with a 20-token budget one step can hold both kinds."""
    prompts = long_prompts(tiny_ckpt)
    want = greedy_reference(tiny_ckpt, prompts, 40, use_hf=True)
    steps = []
    with Engine(tiny_ckpt, ParallelConfig(ep_size=1), EngineConfig(max_num_seqs=4, max_prefill_tokens=budget)) as eng:
        assert eng.ranks.infos[0]["native_paged_attention"]
        eng.add_step_listener(lambda st: steps.append(st.prefill_tokens))
        streams = [eng.add_request(p, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)) for p in prompts]
        got = [[ev.token_id for ev in st if ev.token_id is not None] for st in streams]
    assert got == want
    assert max(steps) <= budget and len(steps) > sum(map(len, prompts)) // budget


@pytest.fixture(scope="module")
def prompt_32k(tiny_ckpt):
    """A 32k-token prompt ending 12 tokens before a 32-token attention chunk boundary, so its
    40 greedy tokens cross it, and transformers' continuation of it (prefilled in 1024-token
    pieces through its own cache: one-shot eager attention would need tens of GB)."""
    vocab = ModelConfig.from_pretrained(tiny_ckpt).text.vocab_size
    prompt = torch.randint(10, vocab - 50, (LONG_32K,), generator=torch.Generator().manual_seed(11)).tolist()
    return prompt, greedy_reference(tiny_ckpt, [prompt], 40, use_hf=True, hf_piece=1024)[0]


LONG_32K = 32768 - 12  # ~1024 attention chunks of the tiny checkpoint


def test_the_piecewise_transformers_reference_equals_its_one_shot_generate(tiny_ckpt):
    """The 32k oracle is transformers itself, fed in pieces: check the pieces change nothing."""
    prompts = long_prompts(tiny_ckpt)
    assert greedy_reference(tiny_ckpt, prompts, 40, use_hf=True, hf_piece=70) == \
        greedy_reference(tiny_ckpt, prompts, 40, use_hf=True)


@pytest.mark.parametrize("ep", [1, 2])
def test_a_32k_prompt_across_a_thousand_attention_chunks_equals_transformers(tiny_ckpt, prompt_32k, ep, request):
    if ep > 1:
        request.getfixturevalue("ray_local")
    prompt, want = prompt_32k
    cfg = EngineConfig(max_num_seqs=4, max_prefill_tokens=2048, max_model_len=LONG_32K + 64, kv_cache_memory_gb=0.05)
    with Engine(tiny_ckpt, ParallelConfig(ep_size=ep), cfg) as eng:
        got = eng.generate(prompt, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))["token_ids"]
    assert got == want


def test_streams_keep_decoding_while_a_16k_prompt_prefills(tiny_ckpt):
    long_len, budget = 16384, 256
    # a fixed budget (no pacing, tests/test_prefill_pacer.py): exactly long_len / budget chunks
    cfg = EngineConfig(max_num_seqs=32, max_prefill_tokens=budget, max_model_len=long_len + 64, max_decode_slowdown=0)
    with Engine(tiny_ckpt, ParallelConfig(ep_size=1), cfg) as eng:
        streams = [eng.add_request([5 + i, 6, 7], SamplingParams(max_tokens=long_len, temperature=0, ignore_eos=True))
                   for i in range(16)]
        times: list[list[float]] = [[] for _ in streams]

        def read(i):
            for ev in streams[i]:
                if ev.token_id is not None:
                    times[i].append(time.monotonic())

        readers = [threading.Thread(target=read, args=(i,)) for i in range(len(streams))]
        for t in readers:
            t.start()
        while min(len(t) for t in times) < 3:
            time.sleep(0.01)
        t_submit = time.monotonic()
        prompt = (long_prompts(tiny_ckpt)[0] * 17)[:long_len]
        first = eng.add_request(prompt, SamplingParams(max_tokens=1, temperature=0))
        t_first = next(ev for ev in first if ev.token_id is not None) and time.monotonic()
        for st in streams:
            eng.abort(st.request_id)
        for t in readers:
            t.join(120)
    chunks = long_len // budget
    during = [sum(t_submit < x < t_first for x in ts) for ts in times]
    # the prompt took 64 steps of 256 prompt tokens, and every stream decoded in them
    assert min(during) >= chunks - 2, (chunks, during)


def test_a_kv_budget_too_small_for_all_requests_preempts_and_finishes_them_unchanged(tiny_ckpt):
    text = ModelConfig.from_pretrained(tiny_ckpt).text
    layout = KVLayout.from_config(text, 16)
    reqs = []
    for i in range(32):
        prompt = [(11 * i + j) % 400 + 5 for j in range(10 + i % 7)]
        params = (SamplingParams(max_tokens=48, temperature=0, ignore_eos=True) if i % 2 else
                  SamplingParams(max_tokens=48, temperature=0.9, seed=i, ignore_eos=True))
        reqs.append((prompt, params))
    with Engine(tiny_ckpt, ParallelConfig(ep_size=1), EngineConfig(max_num_seqs=32)) as eng:
        alone = [eng.generate(p, s)["token_ids"] for p, s in reqs]  # one at a time, plenty of pages
    # ~8 sequences of 64 tokens fit at once: 32 concurrent ones must take turns
    gb = 8 * layout.pages_for_length(64) * layout.page_bytes(torch.float32) / 2**30
    with Engine(tiny_ckpt, ParallelConfig(ep_size=1), EngineConfig(max_num_seqs=32, kv_cache_memory_gb=gb)) as eng:
        streams = [eng.add_request(p, s) for p, s in reqs]
        outs = [[ev.token_id for ev in st if ev.token_id is not None] for st in streams]
        stats = eng.stats()
    assert outs == alone
    assert stats["preemptions"] > 0 and stats["kv_pages_used"] == 0
    assert stats["kv_pages_total"] == 8 * layout.pages_for_length(64)

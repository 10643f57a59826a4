"""Automatic prefix caching: blocks found by their token chain (and image content), shared,
evicted least recently used; outputs unchanged; cached_tokens reported."""

from __future__ import annotations

import torch

from maverick_ray.config import EngineConfig, ModelConfig, ParallelConfig
from maverick_ray.engine.engine import Engine
from maverick_ray.engine.kv_blocks import BlockTables, block_hashes
from maverick_ray.engine.sampling import SamplingParams
from maverick_ray.model.kv_cache import KVLayout

from test_paged_kv import small_text


def small_layout(chunk=8) -> KVLayout:
    return KVLayout.from_config(small_text(chunk), block_size=4)  # groups: 1 global, 3 chunked (chunk 8 = 2 blocks)


def test_chained_hashes_cover_the_whole_prefix_and_the_images():
    a = block_hashes(list(range(10)), 4, [])
    assert len(a) == 2 and block_hashes(list(range(10)), 4, a[:1]) == a
    b = block_hashes([9] + list(range(1, 10)), 4, [])
    assert a[0] != b[0] and a[1] != b[1]  # the second block's tokens agree, its prefix does not
    img = block_hashes([1, 2, 7, 3, 4, 5, 6, 8], 4, [], image_token=7, image_key=11)
    other = block_hashes([1, 2, 7, 3, 4, 5, 6, 8], 4, [], image_token=7, image_key=12)
    assert img[0] != other[0] and img[1] != other[1]
    assert block_hashes([1, 2, 3, 3], 4, [], image_token=7, image_key=11) == block_hashes([1, 2, 3, 3], 4, [])


def test_block_tables_share_cached_prefix_pages_and_evict_the_least_recently_released():
    layout = small_layout()
    t = BlockTables(layout, num_pages=24, caching=True)
    toks = list(range(30, 50))  # 20 tokens = 5 blocks
    h = block_hashes(toks, 4, [])
    t.allocate("a", 0, 20)
    t.register("a", h, 20)
    t.trim("a", 20)  # the chunked groups keep only chunk 2 (positions 16..23): block 4
    assert t.used == 5 + 3 * 1
    # b shares a's first 16 tokens: global blocks 0..3, and chunk 2 starts at 16, so no chunked block is needed
    assert t.longest_prefix(h, 4) == 4
    t.adopt("b", h, 4)
    assert t.used == 8 and t.refs[t.tables["b"][0][0]] == 2
    # 5 blocks would need block 4 in the chunked groups too: a still holds it
    assert t.longest_prefix(h, 5) == 5
    t.release("a")
    assert t.used == 4 and t.available == 24 - 4  # a's other pages: cached, unused, evictable
    assert t.longest_prefix(h, 5) == 5            # still findable
    t.allocate("c", 0, 20)  # 5 blocks in each of the 4 groups = every available page: the 4 cached ones are evicted
    assert t.longest_prefix(h, 5) == 4 and t.used == 24 and not t.evictable
    t.release("b")
    t.release("c")
    assert t.used == 0 and t.available == 24


def test_register_offers_new_blocks_once_and_a_collided_block_again_until_its_key_is_free():
    """register looks only at blocks that filled since its last call, plus those whose key another
    page held: once that page is evicted, the next call makes this sequence's page findable."""
    layout = KVLayout.from_config(small_text(None), block_size=4)   # no chunked groups: every block kept
    t = BlockTables(layout, num_pages=40, caching=True)
    h = block_hashes(list(range(30, 46)), 4, [])   # 4 blocks
    t.allocate("a", 0, 8)
    t.allocate("b", 0, 8)                           # the same tokens, its own pages (not adopted)
    t.register("a", h, 8)
    t.register("b", h, 8)                           # keys held by a's pages: b's collide
    a0, b0 = t.tables["a"][0][0], t.tables["b"][0][0]
    assert t.page_of[(0, h[0])] == a0 and b0 not in t.key_of
    t.release("a")                                  # a's pages cached, unused
    blocks = t.available // layout.num_groups
    t.allocate("c", 0, 4 * blocks)                  # every free page, then a's cached ones (evicted)
    assert (0, h[0]) not in t.page_of and not t.evictable
    t.release("c")
    t.allocate("b", 8, 12)
    t.register("b", h, 12)                          # b's collided blocks 0 and 1 now register, block 2 too
    assert [t.page_of[(0, h[j])] for j in range(3)] == [t.tables["b"][0][j] for j in range(3)]
    before = dict(t.key_of)
    t.register("b", h, 12)                          # nothing new filled: nothing changes
    assert t.key_of == before


def _engine(ckpt, caching: str, **cfg):
    return Engine(ckpt, ParallelConfig(ep_size=1), EngineConfig(max_num_seqs=8, prefix_caching=caching, **cfg))


def test_prefix_caching_keeps_outputs_and_reports_the_cached_prompt_tokens(tiny_ckpt):
    vocab = ModelConfig.from_pretrained(tiny_ckpt).text.vocab_size
    g = torch.Generator().manual_seed(3)
    system = torch.randint(10, vocab - 50, (2048,), generator=g).tolist()   # a 2k-token shared prefix
    prompts = [system + torch.randint(10, vocab - 50, (n,), generator=g).tolist() for n in (7, 20, 33)]
    params = [SamplingParams(max_tokens=24, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=24, temperature=0.8, seed=5, ignore_eos=True)]
    outs, cached = {}, {}
    for caching in ("off", "on"):
        with _engine(tiny_ckpt, caching) as eng:
            outs[caching], cached[caching] = [], []
            for p in prompts:
                for sp in params:
                    events = list(eng.add_request(p, sp))
                    outs[caching].append([e.token_id for e in events if e.token_id is not None])
                    cached[caching].append(events[-1].cached_tokens)
            stats = eng.stats()
        if caching == "on":
            assert stats["prefix_cache_hit_tokens"] == sum(cached["on"])
            assert stats["prefix_cache_queried_tokens"] == sum(len(p) for p in prompts) * len(params)
    assert outs["on"] == outs["off"]
    assert cached["off"] == [0] * 6
    # the first request computes the prefix; each later one finds its blocks (the 2048 shared
    # tokens, and a repeated prompt everything but the block holding its last token)
    assert cached["on"][0] == 0 and cached["on"][2] == cached["on"][4] == 2048
    for i in (1, 3, 5):  # the same prompt again: everything but the block holding its last token
        n = len(prompts[i // 2])
        assert cached["on"][i] == (n - 1) // 16 * 16, (i, cached["on"])


def test_the_same_image_hits_the_cache_and_another_image_does_not(tiny_ckpt, tmp_path):
    from maverick_ray.checkpoint.tokenizer import ChatTokenizer
    from maverick_ray.engine.multimodal import prepare_images_from_files

    from image_helpers import image_bytes

    tok = ChatTokenizer.from_pretrained(tiny_ckpt)
    with _engine(tiny_ckpt, "on") as eng:
        def run(path, text):
            ids, mm = prepare_images_from_files(tiny_ckpt, tok, [str(path)], text, max_images=2)
            events = list(eng.add_request(ids, SamplingParams(max_tokens=4, temperature=0), mm_inputs=mm))
            return ids, events[-1].cached_tokens, [e.token_id for e in events if e.token_id is not None]

        red, blue = tmp_path / "a.png", tmp_path / "b.png"
        red.write_bytes(image_bytes(64, 48, seed=1))
        blue.write_bytes(image_bytes(64, 48, seed=2))
        ids, first, out = run(red, "What colour is this?")
        image_at = ids.index(ModelConfig.from_pretrained(tiny_ckpt).image_token_id)
        _, again, out_again = run(red, "What colour is this?")
        _, other, _ = run(blue, "What colour is this?")
    assert first == 0 and out_again == out
    assert again == (len(ids) - 1) // 16 * 16 > image_at        # past the image: its blocks were found
    assert other <= image_at // 16 * 16                          # only the text before the image


def test_a_request_goes_to_the_rank_holding_its_prefix_else_the_least_loaded():
    from maverick_ray.engine.request import Request, RequestStream
    from maverick_ray.engine.scheduler import Scheduler

    layout = small_layout(chunk=64)
    sched = Scheduler(2, EngineConfig(max_num_seqs=8, max_waiting=8), layout, pages_per_rank=64)
    shared = list(range(40, 56))  # 16 tokens = 4 blocks

    def req(rid, tail):
        r = Request(rid, shared + tail, SamplingParams(max_tokens=4, temperature=0), RequestStream(rid))
        sched.add(r)
        return r

    first = req("a", [1, 2, 3])
    plans, _ = sched.plan()
    sched.commit(plans)  # its prompt ran: its full blocks are registered on its rank
    first.output_ids.append(9)
    sched.first_token(first)
    busy = first.rank
    other = req("b", [7, 7, 7, 7, 7])  # unrelated: the least loaded rank
    unrelated = Request("c", [90 + i for i in range(19)], SamplingParams(max_tokens=4), RequestStream("c"))
    sched.add(unrelated)
    plans, admitted = sched.plan()
    assert admitted == 2 and unrelated.rank == 1 - busy
    assert other.rank == busy and other.prefilled == 16 == other.cached_prompt_tokens  # the prefix's rank, though busier
    assert sched.prefix_hit == 16 and sched.prefix_queried == 19 + 21 + 19


def test_requests_sharing_a_prompt_at_once_prefill_it_once(tiny_ckpt):
    """The n choices of one request (or a burst with one system prompt) arrive together: the
    first prefills the shared blocks, the others wait for them and find them cached."""
    vocab = ModelConfig.from_pretrained(tiny_ckpt).text.vocab_size
    prompt = torch.randint(10, vocab - 50, (300,), generator=torch.Generator().manual_seed(9)).tolist()
    with _engine(tiny_ckpt, "on", max_prefill_tokens=64) as eng:
        streams = [eng.add_request(prompt, SamplingParams(max_tokens=8, temperature=0.7, seed=s, ignore_eos=True))
                   for s in range(3)]
        outs = [[e.token_id for e in st if e.token_id is not None] for st in streams]
        stats = eng.stats()
    with _engine(tiny_ckpt, "off") as eng:
        alone = [eng.generate(prompt, SamplingParams(max_tokens=8, temperature=0.7, seed=s, ignore_eos=True))
                 ["token_ids"] for s in range(3)]
    assert outs == alone
    assert stats["prefix_cache_hit_tokens"] == 2 * (299 // 16 * 16)  # the prompt ran once, 2 x 288 tokens found

"""The paged KV cache: layer groups, block tables, local-window freeing, the context it allows."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from maverick_ray.config import ConfigError, EngineConfig, ModelConfig, TextConfig
from maverick_ray.engine.kv_blocks import BlockTables, OutOfPages
from maverick_ray.engine.kv_budget import kv_pages, resolve_max_model_len
from maverick_ray.model.kv_cache import KVLayout, KVView, PagedKVCache


def maverick_text() -> TextConfig:
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "configs" / "models" / "Llama-4-Maverick-17B-128E-Instruct.json"
    return ModelConfig.from_dict(json.loads(path.read_text())).text


def small_text(chunk: int | None, heads: int = 4) -> TextConfig:
    """4 layers (NoPE every 4th: 1 global, 3 chunked with `chunk`), 2 kv heads of 16."""
    return TextConfig.from_dict({"hidden_size": 64, "num_attention_heads": heads, "num_key_value_heads": 2,
                                 "head_dim": 16, "num_hidden_layers": 4, "vocab_size": 100,
                                 "attention_chunk_size": chunk, "no_rope_layer_interval": 4,
                                 "intermediate_size": 64, "intermediate_size_mlp": 64, "num_local_experts": 4})


def test_tiny_layout_groups_global_and_chunked_layers(tiny_ckpt):
    text = ModelConfig.from_pretrained(tiny_ckpt).text  # 4 layers, NoPE every 4th, chunk 32
    layout = KVLayout.from_config(text, block_size=16)
    assert layout.groups == ((3,), (0,), (1,), (2,)) and layout.local == (False, True, True, True)
    assert layout.page_bytes(torch.float32) == 2 * 1 * 16 * text.num_key_value_heads * text.head_dim * 4
    # position 70 is in chunk 2 (64..95): local layers keep blocks from 64 // 16 = 4 on
    assert layout.first_kept_block(0, 70) == 0 and layout.first_kept_block(1, 70) == 4
    assert list(layout.blocks_for(1, 60, 70)) == [2, 3, 4]  # the query at 60 still sees chunk 1 (32..63)
    assert list(layout.blocks_for(0, 60, 70)) == [0, 1, 2, 3, 4]


def test_maverick_layout_holds_a_fraction_of_the_slot_reservation_at_long_context():
    text = maverick_text()  # 48 layers: 12 global (NoPE), 36 chunked with chunk 8192
    layout = KVLayout.from_config(text, block_size=16)
    assert [len(g) for g in layout.groups] == [12, 12, 12, 12] and layout.local == (False, True, True, True)
    per_token_all_layers = 2 * 48 * text.num_key_value_heads * text.head_dim * 2  # bf16, the slot design
    for n, ratio in ((8192, 1.0), (32768, 0.25 + 0.75 * 8208 / 32768), (131072, 0.25 + 0.75 * 8208 / 131072)):
        paged = layout.pages_for_length(n) * layout.page_bytes(torch.bfloat16)
        # global layers hold every token; chunked ones one chunk plus a shared boundary block
        assert paged / (n * per_token_all_layers) == pytest.approx(ratio, rel=1e-3), n


def test_block_tables_allocate_trim_and_release():
    text = small_text(32)
    layout = KVLayout.from_config(text, block_size=16)
    tables = BlockTables(layout, num_pages=20)
    first, pages = tables.allocate("a", 0, 40)  # 3 blocks in each of the 4 groups
    assert first == [0, 0, 0, 0] and [len(p) for p in pages] == [3, 3, 3, 3] and tables.used == 12
    assert len({p for group in pages for p in group}) == 12
    tables.trim("a", 40)  # next token at 40, in chunk 1 (32..63): local groups drop blocks 0 and 1
    assert tables.used == 3 + 3 * 1 and tables.held("a") == 6
    first, pages = tables.allocate("a", 40, 41)  # nothing new
    assert first == [0, 2, 2, 2] and tables.used == 6
    with pytest.raises(OutOfPages):
        tables.allocate("b", 0, 100)  # 7 blocks x 4 groups > 14 free
    assert tables.used == 6 and "b" not in tables.tables
    assert tables.release("a") == 6 and tables.used == 0


def test_decode_steps_extend_the_last_allocation_as_a_full_walk_would():
    """allocate keeps each sequence's last view and extends it; every step must still return what
    walking all of the step's blocks gives, across chunk boundaries, trims, a release and reuse."""
    layout = KVLayout.from_config(small_text(32), block_size=4)
    tables = BlockTables(layout, num_pages=200)

    def walked(seq, start, end):
        t = tables.tables[seq]
        return ([layout.blocks_for(g, start, end).start for g in range(layout.num_groups)],
                [[t[g][j] for j in layout.blocks_for(g, start, end)] for g in range(layout.num_groups)])

    for seq in ("a", "b"):
        tables.allocate(seq, 0, 10)
    plans = []
    for pos in range(10, 75):                           # crosses chunk boundaries at 32 and 64
        for seq in ("a", "b"):
            need = tables.pages_needed(seq, pos, pos + 1)
            held = tables.used
            got = tables.allocate(seq, pos, pos + 1)
            assert tables.used - held == need
            assert got == walked(seq, pos, pos + 1), (seq, pos)
            plans.append((got, [list(g) for g in got[1]]))
            tables.trim(seq, pos + 1)
            held_blocks = [sorted(tables.tables[seq][g]) for g in range(layout.num_groups)]
            assert held_blocks == [list(range(layout.first_kept_block(g, pos + 1), -(-(pos + 1) // 4)))
                                   for g in range(layout.num_groups)], (seq, pos)   # trims exactly what it should
        if pos == 40:
            tables.release("b")                          # preempted: recomputed from 0 next step
            tables.allocate("b", 0, 41)
    assert all(got[1] == copy for got, copy in plans)   # later steps never change an earlier plan's lists


def test_kv_view_rows_and_positions():
    text = small_text(8)
    layout = KVLayout.from_config(text, block_size=4)
    # one sequence at positions 9..10 (2 new tokens after 9 cached); global group pages [5, 2, 7]
    view = KVView(layout, [9], [2], [[0], [2], [2], [2]], [[[5, 2, 7]], [[1]], [[3]], [[4]]])
    assert view.write_rows[0].tolist() == [7 * 4 + 1, 7 * 4 + 2] and view.write_rows[1].tolist() == [1 * 4 + 1, 1 * 4 + 2]
    assert view.key_pos[0][0].tolist() == list(range(11)) + [-1]  # the block's last row is not written yet
    assert view.key_pos[1][0].tolist() == [8, 9, 10, -1]
    cache = PagedKVCache(layout, 8)
    k = torch.randn(2, 2, 16)
    cache.write(3, view.write_rows[0], k, k)  # layer 3 is the global one
    got, _ = cache.gather(3, view.read_rows[0])
    assert torch.equal(got[0, 9:11], k)


def test_a_prefill_step_holds_every_block_from_the_chunk_it_starts_in():
    text = maverick_text()
    layout = KVLayout.from_config(text, block_size=16)
    # a step over 8000..12095 (its first query in chunk 0) reads chunk 0's blocks from 0 on
    need = sum(len(layout.blocks_for(g, 8000, 12096)) for g in range(layout.num_groups))
    assert need == 4 * 756 <= layout.pages_for_length(12096, 4096)
    assert layout.pages_for_length(12096, 1) < need  # decode-only steps hold far less


def test_context_length_follows_the_checkpoint_and_the_kv_budget(tiny_ckpt):
    text = ModelConfig.from_pretrained(tiny_ckpt).text
    layout = KVLayout.from_config(text, 16)
    cpu = torch.device("cpu")
    auto = EngineConfig(max_num_seqs=4)
    pages = kv_pages(auto, text, layout, torch.float32, cpu)
    assert pages == 4 * layout.pages_for_length(2048, auto.max_prefill_tokens)
    assert resolve_max_model_len(auto, text, layout, pages) == text.max_position_embeddings  # 4096 fits alone
    small = EngineConfig(kv_cache_memory_gb=40 * layout.page_bytes(torch.float32) / 2**30)
    pages = kv_pages(small, text, layout, torch.float32, cpu)
    assert pages == 40
    n = resolve_max_model_len(small, text, layout, pages)
    step = small.max_prefill_tokens  # a step of up to that many prompt tokens: all its chunks' blocks at once
    assert layout.pages_for_length(n, step) <= 40 < layout.pages_for_length(n + 1, step)
    with pytest.raises(ConfigError, match="max_model_len 4096 needs"):
        resolve_max_model_len(EngineConfig(max_model_len=4096, kv_cache_memory_gb=small.kv_cache_memory_gb),
                              text, layout, pages)


def _scattered_view(layout: KVLayout, starts: list[int], lengths: list[int], pages: int, g) -> KVView:
    """A view of sequences at `starts` adding `lengths` tokens, their pages scattered over the pool."""
    perm = torch.randperm(pages, generator=g).tolist()
    tables, first, used = [[] for _ in layout.groups], [[] for _ in layout.groups], 0
    for s, n in zip(starts, lengths):
        for grp in range(layout.num_groups):
            blocks = layout.blocks_for(grp, s, s + n)
            first[grp].append(blocks.start)
            tables[grp].append(perm[used:used + len(blocks)])
            used += len(blocks)
    assert used <= pages
    return KVView(layout, starts, lengths, first, tables)


# (block size, head_dim): 16-token blocks with head_dim 64 or 32 take the kernel's vector path,
# block size 4 its generic loop.
@pytest.mark.parametrize("block,head_dim", [(16, 64), (16, 32), (4, 16)])
@pytest.mark.parametrize("chunk", [None, 8, 48])
def test_native_paged_attention_equals_the_torch_gather_path(chunk, block, head_dim):
    """Decode (one new token per sequence) and prompt chunks continuing a cached sequence (several
    new tokens, each seeing the keys up to its own position, across attention-chunk boundaries),
    against the gather + mask + SDPA path the engine uses without the kernel."""
    from maverick_ray.model.attention import attention_mask
    from maverick_ray.native.paged_attention import paged_attention_kernel

    kernel = paged_attention_kernel()
    assert kernel is not None, "the C compiler is part of the test machine's setup"
    g = torch.Generator().manual_seed(0)
    text = dataclasses.replace(small_text(chunk, heads=8), head_dim=head_dim)
    layout = KVLayout.from_config(text, block_size=block)
    pages = 400
    cache = PagedKVCache(layout, pages)
    for t in cache.k + cache.v:
        t.copy_(torch.randn(t.shape, generator=g))
    cases = {"decode": ([0, 5, 17, 30, 161], [1] * 5),
             "chunks": ([3, 40, 44, 0, 100, 7], [5, 9, 20, 1, 64, 1])}
    for name, (starts, lengths) in cases.items():
        view = _scattered_view(layout, starts, lengths, pages, g)
        T = sum(lengths)
        q = torch.randn(T, 2, 4, head_dim, generator=g)  # (T, KV, G, D)
        for layer in range(4):
            grp = cache.group_of(layer)
            local = chunk if layout.local[grp] else None
            got = kernel(q, *cache.pools(layer), view.table[grp], view.first[grp], view.end, block, local,
                         None if name == "decode" else torch.tensor(lengths))
            k, v = cache.gather(layer, view.read_rows[grp])   # (B, N, KV, D)
            offset = 0
            for i, (s, n) in enumerate(zip(starts, lengths)):
                kpos = view.key_pos[grp][i]
                mask = attention_mask(torch.arange(s, s + n), kpos, local) & (kpos >= 0)[None, :]   # (n, N)
                want = torch.nn.functional.scaled_dot_product_attention(
                    q[offset:offset + n].permute(1, 2, 0, 3),            # (KV, G, n, D)
                    k[i].transpose(0, 1)[:, None], v[i].transpose(0, 1)[:, None],  # (KV, 1, N, D)
                    attn_mask=mask)                                       # -> (KV, G, n, D)
                assert torch.allclose(got[offset:offset + n], want.permute(2, 0, 1, 3), atol=1e-5), \
                    (name, layer, i, (got[offset:offset + n] - want.permute(2, 0, 1, 3)).abs().max())
                offset += n


def test_native_paged_attention_rejects_a_query_count_that_does_not_add_up():
    from maverick_ray.native.paged_attention import paged_attention_kernel

    text = small_text(None)
    layout = KVLayout.from_config(text, block_size=16)
    cache = PagedKVCache(layout, 8)
    view = _scattered_view(layout, [0], [3], 8, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="3 query tokens, but the sequences add up to 4"):
        paged_attention_kernel()(torch.zeros(3, 2, 2, 16), *cache.pools(0), view.table[0], view.first[0], view.end,
                                 16, None, torch.tensor([4]))

"""The native attention prologue (RoPE, QK norm, temperature and cache write in one call) against
the torch ops it replaces, through whole Attention layers: same outputs, same cache contents."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from maverick_ray.model.attention import Attention
from maverick_ray.model.batch import ForwardBatch
from maverick_ray.model.fused import fuse_projections
from maverick_ray.model.kv_cache import KVLayout, PagedKVCache
from maverick_ray.model.rope import inverse_frequencies
from maverick_ray.native.attention_prologue import attention_prologue_kernel

from test_paged_kv import _scattered_view, small_text


@pytest.fixture(scope="module")
def kernel():
    k = attention_prologue_kernel()
    assert k is not None, "the C compiler is part of the test machine's setup"
    return k


# decode (one token each) and a mixed batch: two fresh prompts (padded SDPA over the new k, v),
# chunks continuing cached prompts (their new k, v read directly) and decodes
CASES = {"decode": ([0, 5, 17, 30, 61], [1] * 5),
         "mixed": ([0, 0, 40, 44, 9, 100], [6, 5, 9, 20, 1, 1])}


@pytest.mark.parametrize("qk_norm", [True, False])
@pytest.mark.parametrize("case", sorted(CASES))
def test_prologue_equals_the_torch_ops_it_replaces(kernel, case, qk_norm):
    g = torch.Generator().manual_seed(1)
    # floor_scale 4: NoPE-layer temperatures differ from 1 from position 3 on
    text = dataclasses.replace(small_text(16), use_qk_norm=qk_norm, attn_temperature_tuning=True,
                               floor_scale=4.0, attn_scale=0.1)
    layout = KVLayout.from_config(text, block_size=4)
    pages = 300
    starts, lengths = CASES[case]
    view = _scattered_view(layout, starts, lengths, pages, g)
    inv_freq = inverse_frequencies(text.head_dim, text.rope_theta, text.rope_scaling)
    x = torch.randn(sum(lengths), text.hidden_size, generator=g)
    caches = [PagedKVCache(layout, pages) for _ in range(2)]
    for a, b in zip(caches[0].k + caches[0].v, caches[1].k + caches[1].v):
        a.copy_(torch.randn(a.shape, generator=g))
        b.copy_(a)
    with torch.inference_mode():
        for layer in range(text.num_hidden_layers):   # 3 RoPE layers, then a NoPE one
            att = Attention(text, layer)
            for p in att.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * text.hidden_size ** -0.5)
            fuse_projections(att)
            outs = []
            for cache, k in zip(caches, (None, kernel)):
                att.use_prologue(k)
                batch = ForwardBatch.build(starts, lengths, kv=view)
                outs.append(att(x, batch, inv_freq, cache, residual=x))
            assert torch.allclose(outs[1], outs[0], atol=1e-5), (layer, (outs[1] - outs[0]).abs().max())
            for a, b in zip(caches[0].pools(layer), caches[1].pools(layer)):
                assert torch.allclose(a, b, atol=1e-5), (layer, (a - b).abs().max())


def test_prologue_refuses_a_write_row_outside_the_pools_and_writes_nothing(kernel):
    H, KV, D = 4, 2, 16
    qkv = torch.randn(2, (H + 2 * KV) * D)
    k_pool, v_pool = torch.zeros(8, KV, D), torch.zeros(8, KV, D)
    with pytest.raises(IndexError, match="outside the pools' 8 rows"):
        kernel(qkv, torch.tensor([3, 4]), H, KV, D, None, None, None, 0.0, k_pool, v_pool, torch.tensor([1, 8]))
    assert not k_pool.any() and not v_pool.any()
    with pytest.raises(ValueError, match="attention prologue needs"):
        kernel(qkv, torch.tensor([3, 4], dtype=torch.int32), H, KV, D, None, None, None, 0.0, k_pool, v_pool,
               torch.tensor([1, 2]))
    q = kernel(qkv.clone(), torch.tensor([3, 4]), H, KV, D, None, None, None, 0.0, k_pool, v_pool, torch.tensor([1, 7]))
    assert torch.equal(q, qkv[:, :H * D].view(2, H, D))   # NoPE, no norm, no temperature: q as projected
    assert torch.equal(k_pool[7], qkv[1, H * D:(H + KV) * D].view(KV, D))
    assert torch.equal(v_pool[1], qkv[0, (H + KV) * D:].view(KV, D))

"""The native decode layer (a whole decoder layer of a decode step in one call) and the decode
stack (every layer of the step in one call) against the torch path of the same model: same
logits, same routed experts, same cache contents; MoE blocks it cannot run go to torch after its
attention half; a bad cache row is refused before anything is written."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from maverick_ray.model.batch import ForwardBatch
from maverick_ray.model.fused import fuse_projections
from maverick_ray.model.kv_cache import KVLayout, PagedKVCache
from maverick_ray.model.text import TextModel
from maverick_ray.native.attention_prologue import attention_prologue_kernel
from maverick_ray.native.decode_layer import decode_layer_kernel
from maverick_ray.native.grouped_experts import grouped_experts_kernel
from maverick_ray.native.paged_attention import paged_attention_kernel

from test_paged_kv import _scattered_view, small_text

PAGES = 400


@pytest.fixture(scope="module")
def kernel():
    k = decode_layer_kernel()
    assert k is not None, "the C compiler and torch's BLAS are part of the test machine's setup"
    return k


def model_and_caches(qk_norm: bool, kernel, g, block: int = 4, heads: int = 4, chunk: int | None = 8):
    """A 4-layer model (2 dense, 2 MoE layers; 3 RoPE layers, chunked unless chunk is None, 1
    NoPE; `heads` query heads over 2 kv heads) with the per-op kernels attached as a rank
    attaches them, and two caches holding the same random contents."""
    # a vocabulary of 7 x 16: lm_head packs into panels like the projections (all but the 4-expert router)
    text = dataclasses.replace(small_text(chunk, heads), use_qk_norm=qk_norm, attn_temperature_tuning=True,
                               floor_scale=4.0, attn_scale=0.1, moe_layers=(1, 3), vocab_size=112)
    model = TextModel(text)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * text.hidden_size ** -0.5)
    fuse_projections(model.eval())
    assert [layer.is_moe for layer in model.model.layers] == [False, True, False, True]
    for block_ in model.moe_blocks:
        assert block_.experts.use_kernel(grouped_experts_kernel())
    layout = KVLayout.from_config(text, block_size=block)
    caches = [PagedKVCache(layout, PAGES) for _ in range(2)]
    for a, b in zip(caches[0].k + caches[0].v, caches[1].k + caches[1].v):
        a.copy_(torch.randn(a.shape, generator=g))
        b.copy_(a)
    for cache in caches:
        cache.attention_kernel = paged_attention_kernel()
    for layer in model.model.layers:
        assert layer.self_attn.use_prologue(attention_prologue_kernel())
        assert layer.use_decode_kernel(kernel)
    # as a rank does: the layers, the final norm and lm_head of a decode step in one call
    model.decode_stack = kernel.stack([layer.decode_kernel for layer in model.model.layers], model.model.norm,
                                      model.lm_head)
    assert model.decode_stack.returns_logits and model.decode_stack._lm_panels is not None
    assert all({"qkv", "o"} <= set(layer.decode_kernel._panels) for layer in model.model.layers)
    return text, model, layout, caches


def run(model, layout, cache, starts, native: bool, g_seed: int = 3):
    """One decode step (a token at each start) -> logits (B, V), routed ids per MoE layer."""
    g = torch.Generator().manual_seed(g_seed)
    view = _scattered_view(layout, starts, [1] * len(starts), PAGES, g)
    ids = torch.randint(0, model.cfg.vocab_size, (len(starts),), generator=g)
    kernels, stack = [layer.decode_kernel for layer in model.model.layers], model.decode_stack
    if not native:
        model.decode_stack = None
        for layer in model.model.layers:
            layer.decode_kernel = None
    routed: list = []
    try:
        with torch.inference_mode():
            logits = model(ids, ForwardBatch.build(starts, [1] * len(starts), kv=view), cache, routed_ids=routed)
    finally:
        model.decode_stack = stack
        for layer, k in zip(model.model.layers, kernels):
            layer.decode_kernel = k
    return logits, [r.view(-1) for r in routed]


# 1 and 3 sequences (the few-row matmul kernel), 6 (BLAS gemm), positions across chunk (8) and
# block (4) boundaries
@pytest.mark.parametrize("starts", [[13], [7, 40, 62], [0, 5, 8, 17, 31, 62]], ids=["1seq", "3seqs", "6seqs"])
@pytest.mark.parametrize("qk_norm", [True, False])
# 2 query heads per kv head with 4-token blocks and chunks of 8 (the attention kernel's generic
# loop), 3 per kv head with 16-token blocks and no chunking (its vector path)
@pytest.mark.parametrize("heads,block,chunk", [(4, 4, 8), (6, 16, None)], ids=["g2-b4-chunked", "g3-b16"])
# the whole step in one call with the final norm and lm_head, its layers in one call, one per layer
@pytest.mark.parametrize("stacked", ["with-head", "layers", None], ids=["one-call", "one-call-no-head", "per-layer"])
def test_decode_layers_equal_the_torch_path(kernel, starts, qk_norm, heads, block, chunk, stacked):
    text, model, layout, caches = model_and_caches(qk_norm, kernel, torch.Generator().manual_seed(1), block, heads,
                                                   chunk)
    if stacked != "with-head":
        model.decode_stack = kernel.stack([layer.decode_kernel for layer in model.model.layers]) if stacked else None
        assert stacked is None or not model.decode_stack.returns_logits
    want, want_ids = run(model, layout, caches[0], starts, native=False)
    got, got_ids = run(model, layout, caches[1], starts, native=True)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), (got - want).abs().max()
    assert len(got_ids) == 2 and all(torch.equal(a, b) for a, b in zip(got_ids, want_ids))
    for layer in range(text.num_hidden_layers):
        for a, b in zip(caches[0].pools(layer), caches[1].pools(layer)):
            assert torch.allclose(a, b, atol=1e-5), (layer, (a - b).abs().max())


def test_the_kernel_runs_every_layer_of_a_decode_step_and_none_of_a_prefill(kernel, monkeypatch):
    from maverick_ray.model.moe import MoEBlock

    text, model, layout, caches = model_and_caches(False, kernel, torch.Generator().manual_seed(2))
    calls, torch_moe, stacked = [], [], []
    bound, stack = type(model.model.layers[0].decode_kernel), type(model.decode_stack)
    original, moe_forward, original_stack = bound.__call__, MoEBlock.forward, stack.__call__
    monkeypatch.setattr(bound, "__call__", lambda self, *a: calls.append(self.layer) or original(self, *a))
    monkeypatch.setattr(stack, "__call__", lambda self, *a: stacked.append(original_stack(self, *a)) or stacked[-1])
    monkeypatch.setattr(MoEBlock, "forward", lambda self, *a, **k: torch_moe.append(self) or moe_forward(self, *a, **k))
    run(model, layout, caches[0], [3, 9], native=True)
    # every layer runs whole: the step is one stack call, no per-layer runner, no torch MoE
    assert len(stacked) == 1 and stacked[0] is not None and calls == [] and torch_moe == []
    stacked.clear()
    model.decode_stack = None   # a rank without the stack: one call per layer
    run(model, layout, caches[0], [3, 9], native=True)
    assert calls == list(model.model.layers) and torch_moe == []
    calls.clear()
    model.decode_stack = kernel.stack([layer.decode_kernel for layer in model.model.layers], model.model.norm,
                                      model.lm_head)
    # past the grouped kernel's rows for 4 experts, so the MoE blocks run on torch (per-expert
    # BLAS) after the native attention half; the result is the torch path's
    from maverick_ray.model.moe import Experts

    monkeypatch.setattr(Experts, "KERNEL_MAX_ROWS_PER_EXPERT", 8)   # a step that fits this test's cache
    many = [i % 3 for i in range(Experts.KERNEL_MAX_ROWS_PER_EXPERT * 4 + 1)]   # one cache block each
    for a, b in zip(caches[0].k + caches[0].v, caches[1].k + caches[1].v):
        b.copy_(a)
    got, got_ids = run(model, layout, caches[0], many, native=True)
    assert stacked == [None]   # the stack declined the step before running any layer
    assert calls == list(model.model.layers) and torch_moe == model.moe_blocks
    calls.clear()
    want, want_ids = run(model, layout, caches[1], many, native=False)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4) and all(map(torch.equal, got_ids, want_ids))
    calls.clear()
    g = torch.Generator().manual_seed(4)
    view = _scattered_view(layout, [0], [5], PAGES, g)
    stacked.clear()
    with torch.inference_mode():
        model(torch.arange(5), ForwardBatch.build([0], [5], kv=view), caches[0])
    assert calls == [] and stacked == []


def test_moe_blocks_with_a_routing_hook_or_remote_experts_run_on_torch_after_the_native_attention(kernel):
    text, model, layout, caches = model_and_caches(False, kernel, torch.Generator().manual_seed(5))
    moe = model.model.layers[1]
    assert moe.decode_kernel.runs_moe(2)
    moe.feed_forward.force_expert = 2        # the test hook the engine's skew tests use
    assert not moe.decode_kernel.runs_moe(2)
    got, ids = run(model, layout, caches[0], [3, 9], native=True)
    assert (ids[0] == 2).all() and not (ids[1] == 2).all()   # the hook honoured in layer 1 only
    want, want_ids = run(model, layout, caches[1], [3, 9], native=False)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4) and all(map(torch.equal, ids, want_ids))
    moe.feed_forward.force_expert = None

    moe.feed_forward.experts.use_kernel(None)   # experts without the grouped kernel (as FP8 ones)
    assert not moe.decode_kernel.runs_moe(2)
    got, ids = run(model, layout, caches[0], [3, 9], native=True)
    want, want_ids = run(model, layout, caches[1], [3, 9], native=False)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4) and all(map(torch.equal, ids, want_ids))

    class Remote:   # any dispatcher but the local one: experts live on other ranks (EP > 1)
        stats = moe.feed_forward.dispatcher.stats

    moe.feed_forward.dispatcher = Remote()
    assert not moe.decode_kernel.runs_moe(2)


def test_a_write_row_outside_the_pools_is_refused_before_the_layer_writes(kernel):
    text, model, layout, caches = model_and_caches(False, kernel, torch.Generator().manual_seed(6))
    cache = caches[0]
    g = torch.Generator().manual_seed(7)
    view = _scattered_view(layout, [3, 9], [1, 1], PAGES, g)
    layer = model.model.layers[0]
    group = cache.group_of(0)
    view.write_rows[group][1] = cache.pools(0)[0].shape[0]   # one past the last row
    before = [p.clone() for p in cache.pools(0)]
    x = torch.randn(2, text.hidden_size, generator=g)
    x0 = x.clone()
    with torch.inference_mode(), pytest.raises(IndexError, match="outside the pools"):
        layer.decode_kernel(x, ForwardBatch.build([3, 9], [1, 1], kv=view), model.inv_freq, cache, None)
    assert torch.equal(x, x0)
    assert all(torch.equal(a, b) for a, b in zip(before, cache.pools(0)))


def test_a_bad_write_row_in_a_later_layer_stops_the_stack_with_a_clear_error(kernel):
    """The stack runs the layers in order; a cache row outside the pools in the last layer's group
    raises IndexError from that layer before it writes, and the hidden states passed in are kept."""
    text, model, layout, caches = model_and_caches(False, kernel, torch.Generator().manual_seed(10))
    cache = caches[0]
    groups = [cache.group_of(layer) for layer in range(text.num_hidden_layers)]
    late = groups[-1]
    assert late not in groups[:-1], groups   # the layers before it run first, in other groups
    g = torch.Generator().manual_seed(11)
    view = _scattered_view(layout, [3, 9], [1, 1], PAGES, g)
    view.write_rows[late][0] = -1
    kept = int(view.write_rows[late][1])   # the other token's row in that group: the layer writes nothing
    before = [p[kept].clone() for p in cache.pools(text.num_hidden_layers - 1)]
    x = torch.randn(2, text.hidden_size, generator=g)
    x0 = x.clone()
    with torch.inference_mode(), pytest.raises(IndexError, match="outside the pools"):
        model.decode_stack(x, ForwardBatch.build([3, 9], [1, 1], kv=view), model.inv_freq, cache, None)
    assert torch.equal(x, x0)
    assert all(torch.equal(a, p[kept]) for a, p in zip(before, cache.pools(text.num_hidden_layers - 1)))


def test_expert_weights_replaced_after_binding_are_the_ones_read(kernel):
    """A live rebalance swaps a layer's expert tensors for new ones (engine/expert_swap.apply):
    the runner must read the new ones, not addresses it kept from before."""
    from torch import nn

    text, model, layout, caches = model_and_caches(False, kernel, torch.Generator().manual_seed(8))
    run(model, layout, caches[1], [3, 9], native=True)   # the runners have built their specs
    g = torch.Generator().manual_seed(9)
    for block in model.moe_blocks:
        experts = block.experts
        for name in ("gate_up_proj", "down_proj"):
            old = getattr(experts, name)
            new = torch.empty_strided(old.shape, old.stride()).copy_(torch.randn(old.shape, generator=g) * 0.2)
            experts._parameters[name] = nn.Parameter(new, requires_grad=False)
        assert experts.use_kernel(experts.kernel)
    want, _ = run(model, layout, caches[0], [3, 9], native=False)
    got, _ = run(model, layout, caches[1], [3, 9], native=True)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), (got - want).abs().max()

"""model/fused.py: fused q/k/v and gate/up projections over column-major weights compute what
transformers' Llama 4 computes, keep the state dict's names/shapes/values, and hold no weight twice."""

from __future__ import annotations

import torch

from hf_reference import hf_text_model, ours_from_hf
from maverick_ray.model.batch import ForwardBatch
from maverick_ray.model.fused import fuse_projections
from maverick_ray.model.kv_cache import PagedKVCache


def test_fused_model_matches_transformers_prefill_and_decode():
    hf, d = hf_text_model(dict(use_qk_norm=True))
    ours = fuse_projections(ours_from_hf(hf, d))
    ids = torch.randint(3, d["vocab_size"], (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = hf(input_ids=ids).logits[0]  # (T, V)
        cache = PagedKVCache.for_sequences(ours.cfg, 1, 32)
        prefill = ours(ids[0, :11], batch=ForwardBatch.single(11), cache=cache, all_logits=True)
        step = ours(ids[0, 11:], batch=ForwardBatch.single(1, start=11), cache=cache)
    assert torch.allclose(prefill, want[:11], atol=1e-4)
    assert torch.allclose(step[0], want[11], atol=1e-4)


def test_fusion_keeps_the_state_dict_and_shares_storage():
    hf, d = hf_text_model({})
    ours = ours_from_hf(hf, d)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    fuse_projections(ours)
    fuse_projections(ours)  # idempotent
    after = ours.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    attn = ours.model.layers[0].self_attn
    qkv = attn.qkv  # (C, Nq + Nk + Nv), contiguous: one matmul
    assert qkv.is_contiguous() and qkv.shape == (d["hidden_size"], (4 + 2 + 2) * d["head_dim"])
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):  # views into the fused matrix, not copies
        assert proj.weight.untyped_storage().data_ptr() == qkv.untyped_storage().data_ptr()
    mlp = ours.model.layers[0].feed_forward  # a dense layer
    assert mlp.gate_proj.weight.untyped_storage().data_ptr() == mlp.gate_up.untyped_storage().data_ptr()
    assert ours.lm_head.weight.t().is_contiguous()  # other linears stored column-major
    experts = ours.moe_blocks[0].experts  # routed experts stored output-major
    assert experts.gate_up_proj.transpose(1, 2).is_contiguous()


def test_prefill_sized_matmuls_take_onednn_and_repack_after_an_in_place_change():
    """fused.matmul: from PACKED_MIN_ROWS rows (fp32 CPU inference) through oneDNN's packed weight,
    equal to mm/addmm; a weight changed in place (a state dict loaded) is packed afresh."""
    import pytest

    from maverick_ray.model import fused

    if not fused._onednn():
        pytest.skip("this torch has no oneDNN")
    g = torch.Generator().manual_seed(0)
    w, r = torch.randn(64, 96, generator=g), torch.randn(40, 96, generator=g)
    with torch.inference_mode():
        for rows in (fused.PACKED_MIN_ROWS - 1, fused.PACKED_MIN_ROWS, 40):
            x = torch.randn(rows, 64, generator=g)
            torch.testing.assert_close(fused.matmul(x, w), x @ w, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(fused.matmul(x, w, r[:rows]), x @ w + r[:rows], rtol=1e-4, atol=1e-4)
        assert hasattr(w, "_onednn_packed")
        first = w._onednn_packed[1]
        fused.matmul(x, w)
        assert w._onednn_packed[1] is first   # packed once
    w.mul_(2.0)
    with torch.inference_mode():
        torch.testing.assert_close(fused.matmul(x, w), x @ w, rtol=1e-4, atol=1e-4)
        assert w._onednn_packed[1] is not first


def test_weights_made_under_inference_mode_take_plain_mm():
    from maverick_ray.model import fused

    with torch.inference_mode():
        w, x = torch.randn(64, 32), torch.randn(fused.PACKED_MIN_ROWS + 7, 64)
        torch.testing.assert_close(fused.matmul(x, w), x @ w)
        assert not hasattr(w, "_onednn_packed")

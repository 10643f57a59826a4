"""Our Llama 4 text model against transformers' (the oracle), fp32, max abs difference <= 1e-4."""

from __future__ import annotations

import pytest
import torch

from maverick_ray.model.batch import ForwardBatch
from maverick_ray.model.kv_cache import PagedKVCache

from hf_reference import hf_text_model, ours_from_hf

CONFIGS = {
    # MoE every 2nd layer, no QK norm, plain RoPE (Maverick's shape of things).
    "maverick_like": dict(interleave_moe_layer_step=2, use_qk_norm=False),
    # Every layer MoE, QK norm, llama3 RoPE scaling (Scout's).
    "scout_like": dict(interleave_moe_layer_step=1, use_qk_norm=True, num_local_experts=4,
                       rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=16.0,
                                            low_freq_factor=1.0, high_freq_factor=4.0,
                                            original_max_position_embeddings=16)),
    # Prompt longer than the attention chunk; floor_scale small enough that temperature tuning bites.
    "long_chunked": dict(attention_chunk_size=8, floor_scale=4, interleave_moe_layer_step=2, use_qk_norm=True),
}
PROMPT_LEN = {"maverick_like": 11, "scout_like": 13, "long_chunked": 21}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request):
    hf, d = hf_text_model(CONFIGS[request.param])
    return request.param, hf, ours_from_hf(hf, d)


def _prompt(name: str, vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(len(name))
    return torch.randint(3, vocab, (PROMPT_LEN[name],), generator=g)


@torch.no_grad()
def test_prefill_and_cached_decode_logits_match(pair):
    name, hf, ours = pair
    ids = _prompt(name, ours.cfg.vocab_size)
    n = ids.numel()
    hf_out = hf(ids[None], use_cache=True)
    cache = PagedKVCache.for_sequences(ours.cfg, 1, 64)
    our_logits = ours(ids, ForwardBatch.single(n), cache, all_logits=True)
    assert (our_logits - hf_out.logits[0]).abs().max() <= 1e-4
    past, nxt = hf_out.past_key_values, int(hf_out.logits[0, -1].argmax())
    for step in range(16):
        tok = torch.tensor([nxt])
        hf_out = hf(tok[None], past_key_values=past, use_cache=True)
        past = hf_out.past_key_values
        ours_step = ours(tok, ForwardBatch.single(1, start=n + step), cache)
        diff = (ours_step[0] - hf_out.logits[0, -1]).abs().max()
        assert diff <= 1e-4, f"decode step {step}: max abs diff {diff}"
        nxt = int(hf_out.logits[0, -1].argmax())


@torch.no_grad()
def test_greedy_generation_identical(pair):
    name, hf, ours = pair
    ids = _prompt(name, ours.cfg.vocab_size)
    hf_gen = hf.generate(ids[None], max_new_tokens=16, do_sample=False, eos_token_id=None,
                         pad_token_id=0)[0, ids.numel():].tolist()
    cache = PagedKVCache.for_sequences(ours.cfg, 1, 64)
    logits = ours(ids, ForwardBatch.single(ids.numel()), cache)
    out, pos = [], ids.numel()
    for _ in range(16):
        out.append(int(logits[0].argmax()))
        logits = ours(torch.tensor(out[-1:]), ForwardBatch.single(1, start=pos), cache)
        pos += 1
    assert out == hf_gen
    assert len(set(out)) > 1, "degenerate generation makes the comparison meaningless"


@torch.no_grad()
def test_uncached_prefill_matches_and_temperature_tuning_matters(pair):
    name, hf, ours = pair
    ids = _prompt(name, ours.cfg.vocab_size)
    full = ours(ids, all_logits=True)
    ref = hf(ids[None]).logits[0]
    assert (full - ref).abs().max() <= 1e-4
    if name == "long_chunked":
        for layer in ours.model.layers:
            layer.self_attn.temperature = False
        try:
            assert (ours(ids, all_logits=True) - ref).abs().max() > 1e-3
        finally:
            for layer in ours.model.layers:
                layer.self_attn.temperature = not layer.self_attn.use_rope

"""Builds transformers' Llama 4 text model (the numerical oracle) and copies its weights into ours."""

from __future__ import annotations

import torch

from maverick_ray.config import TextConfig
from maverick_ray.model.text import TextModel


def hf_text_model(overrides: dict, seed: int = 1):
    """A transformers Llama4ForCausalLM with the given config fields, weights spread wide enough
    that greedy decoding is not a chain of near-ties. Returns (hf_model, config dict)."""
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    d = dict(vocab_size=97, hidden_size=32, intermediate_size=24, intermediate_size_mlp=48,
             num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
             num_local_experts=8, num_experts_per_tok=1, interleave_moe_layer_step=2, use_qk_norm=False,
             attention_chunk_size=64, floor_scale=8192, attn_scale=0.1, attn_temperature_tuning=True,
             rope_theta=500000.0, max_position_embeddings=4096, rms_norm_eps=1e-5,
             tie_word_embeddings=False, pad_token_id=None, bos_token_id=1, eos_token_id=2)
    d.update(overrides)
    hf_cfg = Llama4TextConfig(**d)
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = Llama4ForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif p.dim() >= 2:
                fan_in = p.shape[-2] if "experts." in name else p.shape[-1]
                p.copy_(torch.randn_like(p) / fan_in ** 0.5)
    return model, d


def ours_from_hf(hf_model, d: dict) -> TextModel:
    cfg = TextConfig.from_dict(d)
    ours = TextModel(cfg).eval()
    missing, unexpected = ours.load_state_dict(hf_model.state_dict(), strict=False)
    assert not missing, missing
    return ours

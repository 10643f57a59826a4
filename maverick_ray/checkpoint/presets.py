"""Architectures of the generated checkpoints: `tiny` (tests, try-outs) and `mini` (benchmarks).

Both keep Llama 4 Maverick's structure (MoE every second layer, top-1 routing, shared expert,
NoPE every fourth layer, chunked attention) at small widths.
"""

from __future__ import annotations

TINY_TEXT = dict(
    hidden_size=64, intermediate_size=64, intermediate_size_mlp=128, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=16, num_experts_per_tok=1,
    interleave_moe_layer_step=2, use_qk_norm=False, attention_chunk_size=32, attn_temperature_tuning=True,
    floor_scale=8, attn_scale=0.1, rope_theta=500000.0, max_position_embeddings=4096, rms_norm_eps=1e-5,
)
# 56 px tiles of 14 px patches: 16 patches, 4 tokens per tile after pixel shuffle.
TINY_VISION = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, image_size=56,
    patch_size=14, num_channels=3, norm_eps=1e-5, pixel_shuffle_ratio=0.5, projector_input_dim=64,
    projector_output_dim=64, vision_output_dim=64, rope_theta=10000, hidden_act="gelu",
    vision_feature_select_strategy="default", multi_modal_projector_bias=False,
)
MINI_TEXT = dict(
    hidden_size=512, intermediate_size=256, intermediate_size_mlp=1024, num_hidden_layers=4,
    num_attention_heads=8, num_key_value_heads=2, head_dim=64, num_local_experts=128, num_experts_per_tok=1,
    interleave_moe_layer_step=2, use_qk_norm=False, attention_chunk_size=8192, attn_temperature_tuning=True,
    floor_scale=8192, attn_scale=0.1, rope_theta=500000.0, max_position_embeddings=8192, rms_norm_eps=1e-5,
)
PRESETS = {"tiny": (TINY_TEXT, TINY_VISION), "mini": (MINI_TEXT, None)}

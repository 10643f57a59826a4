"""The demo model's architecture: Llama 4 Maverick's structure at a size a 2-core CPU trains.

Same structure as the real model: MoE every second layer (top-1 sigmoid routing over 16 routed
experts plus a shared expert), dense SwiGLU layers between, chunked-attention RoPE layers and a
NoPE global layer every fourth layer with temperature tuning, GQA; a vision tower of tiles,
patches, 2D RoPE, pixel shuffle, adapter and projector. Widths are small (hidden 128), so the
checkpoint stays near 12 MB in fp32.

Two choices differ from Maverick's values and why: rope_theta 10000 (Maverick: 500000) because
contexts here are a few hundred tokens and the slow frequencies of 500000 would be dead weight;
attention_chunk_size 128 and floor_scale 128 (Maverick: 8192) so the chunked and temperature
paths are actually exercised by 256-token training windows.
"""

from __future__ import annotations

from ..checkpoint.presets import TINY_TEXT, TINY_VISION

# The tiny test preset's structure (MoE at layers 1 and 3, NoPE at layer 3, 16 experts, top-1,
# GQA 4/2 heads) at twice its width. The committed checkpoint's config.json is what loads; a change
# to the tiny preset changes what retraining builds (test_demo_model checks the structure).
DEMO_TEXT = dict(TINY_TEXT, hidden_size=128, intermediate_size=128, intermediate_size_mlp=384, head_dim=32,
                 attention_chunk_size=128, floor_scale=128, rope_theta=10000.0, max_position_embeddings=2048)
# 64 px tiles of 8 px patches: 64 patches, 16 tokens per tile after pixel shuffle.
DEMO_VISION = dict(TINY_VISION, hidden_size=64, intermediate_size=256, image_size=64, patch_size=8,
                   projector_input_dim=128, projector_output_dim=128, vision_output_dim=128)
VOCAB_SIZE = 2048

"""The one place that knows Llama 4's Hugging Face tensor names and shapes.

Internal names are the HF names without the `language_model.` prefix of the multimodal
layout (`model.layers.N...`, `lm_head.weight`); vision tensors keep their on-disk names
(`vision_model.*`, `multi_modal_projector.*`). Routed experts are fused: gate_up_proj
(E, C, 2I) and down_proj (E, I, C), used as x @ W.
"""

from __future__ import annotations

from ..config import ModelConfig, TextConfig

TEXT_PREFIX = "language_model."
EXPERT_SUFFIXES = ("feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj")


def layer_prefix(i: int) -> str:
    return f"model.layers.{i}."


def expected_text_tensors(cfg: TextConfig) -> dict[str, tuple[int, ...]]:
    C, V = cfg.hidden_size, cfg.vocab_size
    H, KV, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    E, inter, mlp = cfg.num_local_experts, cfg.intermediate_size, cfg.intermediate_size_mlp
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, C), "model.norm.weight": (C,),
                                       "lm_head.weight": (V, C)}
    for i in range(cfg.num_hidden_layers):
        p = layer_prefix(i)
        out[p + "input_layernorm.weight"] = (C,)
        out[p + "post_attention_layernorm.weight"] = (C,)
        out[p + "self_attn.q_proj.weight"] = (H * D, C)
        out[p + "self_attn.k_proj.weight"] = (KV * D, C)
        out[p + "self_attn.v_proj.weight"] = (KV * D, C)
        out[p + "self_attn.o_proj.weight"] = (C, H * D)
        if cfg.is_moe[i]:
            out[p + "feed_forward.router.weight"] = (E, C)
            out[p + "feed_forward.experts.gate_up_proj"] = (E, C, 2 * inter)
            out[p + "feed_forward.experts.down_proj"] = (E, inter, C)
            for name in ("gate_proj", "up_proj"):
                out[p + f"feed_forward.shared_expert.{name}.weight"] = (inter, C)
            out[p + "feed_forward.shared_expert.down_proj.weight"] = (C, inter)
        else:
            out[p + "feed_forward.gate_proj.weight"] = (mlp, C)
            out[p + "feed_forward.up_proj.weight"] = (mlp, C)
            out[p + "feed_forward.down_proj.weight"] = (C, mlp)
    return out


def is_routed_expert(name: str) -> bool:
    return name.endswith(EXPERT_SUFFIXES)


def split_expert_names(fused_name: str, expert: int) -> dict[str, str]:
    """On-disk names of one expert in the split layout, keyed by projection."""
    base = fused_name.rsplit(".", 1)[0]  # ...feed_forward.experts
    return {proj: f"{base}.{expert}.{proj}.weight" for proj in ("gate_proj", "up_proj", "down_proj")}


def expected_vision_tensors(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    v = cfg.vision
    if v is None:
        return {}
    h, p, inter = v.hidden_size, v.patch_size, v.intermediate_size
    out: dict[str, tuple[int, ...]] = {
        "vision_model.patch_embedding.linear.weight": (h, v.num_channels * p * p),
        "vision_model.class_embedding": (h,),
        "vision_model.positional_embedding_vlm": (v.patches_per_side ** 2 + 1, h),
        "vision_model.layernorm_pre.weight": (h,), "vision_model.layernorm_pre.bias": (h,),
        "vision_model.layernorm_post.weight": (h,), "vision_model.layernorm_post.bias": (h,),
        "vision_model.vision_adapter.mlp.fc1.weight": (v.projector_input_dim, inter),
        "vision_model.vision_adapter.mlp.fc2.weight": (v.projector_output_dim, v.projector_output_dim),
        "multi_modal_projector.linear_1.weight": (cfg.text.hidden_size, v.vision_output_dim),
    }
    for i in range(v.num_hidden_layers):
        b = f"vision_model.model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[b + f"self_attn.{proj}.weight"] = (h, h)
            out[b + f"self_attn.{proj}.bias"] = (h,)
        out[b + "mlp.fc1.weight"], out[b + "mlp.fc1.bias"] = (inter, h), (inter,)
        out[b + "mlp.fc2.weight"], out[b + "mlp.fc2.bias"] = (h, inter), (h,)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            out[b + f"{norm}.weight"], out[b + f"{norm}.bias"] = (h,), (h,)
    return out

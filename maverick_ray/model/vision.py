"""Llama 4 vision tower + multi-modal projector: image tiles -> text-width features.

Shape legend: N tiles, P = (S/p)^2 patches per tile (+1 with the class token), h vision
hidden, nh heads, hd = h/nh, K = P * r^2 tokens per tile after pixel shuffle (r = 0.5),
F projector width, C text hidden.

    tiles (N, 3, S, S) -> unfold p x p + Linear -> (N, P, h) -> [.., CLS at the END] (N, P+1, h)
    + positional_embedding_vlm -> layernorm_pre -> blocks (pre-LN, non-causal attention with
    bias and 2D RoPE, GELU MLP) -> layernorm_post -> drop CLS -> pixel shuffle (N, K, h/r^2)
    -> adapter fc1 -> GELU -> fc2 -> GELU (N, K, F) -> multi_modal_projector (N*K, C)
Parameter names match transformers' Llama4VisionModel under `vision_model.` and the projector
under `multi_modal_projector.`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig, VisionConfig


def vision_rope(v: VisionConfig) -> torch.Tensor:
    """Complex (P+1, 1, hd/2) rotations: x and y patch coordinates, zero rotation for the CLS token."""
    side = v.patches_per_side
    idx = torch.arange(side * side, dtype=torch.int32).reshape(-1, 1)
    idx = torch.cat([idx, idx[:1]], 0)
    idx[-1, -1] = -2  # the class token
    x, y = idx % side, idx // side
    freq_dim = v.hidden_size // v.num_attention_heads // 2
    base = 1.0 / (v.rope_theta ** (torch.arange(0, freq_dim, 2)[: freq_dim // 2].float() / freq_dim))
    fx = ((x + 1)[..., None] * base[None, None, :]).repeat_interleave(2, dim=-1)
    fy = ((y + 1)[..., None] * base[None, None, :]).repeat_interleave(2, dim=-1)
    freqs = torch.cat([fx, fy], dim=-1).float()[..., ::2]
    freqs = freqs.masked_fill(idx.reshape(-1, 1, 1) < 0, 0)
    return torch.polar(torch.ones_like(freqs), freqs)


def pixel_shuffle(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """(N, P, h) -> (N, P*r^2, h/r^2): merges neighbouring patches into the channel dim."""
    n, p, c = x.shape
    side = int(p ** 0.5)
    x = x.view(n, side, side, c)
    x = x.view(n, side, int(side * ratio), int(c / ratio)).permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(side * ratio), int(side * ratio), int(c / ratio ** 2)).permute(0, 2, 1, 3).contiguous()
    return x.view(n, -1, x.shape[-1])


class _Attention(nn.Module):
    def __init__(self, v: VisionConfig):
        super().__init__()
        h = v.hidden_size
        self.heads, self.head_dim = v.num_attention_heads, h // v.num_attention_heads
        self.q_proj, self.k_proj = nn.Linear(h, h), nn.Linear(h, h)
        self.v_proj, self.o_proj = nn.Linear(h, h), nn.Linear(h, h)

    def forward(self, x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
        n, s, _ = x.shape
        shape = (n, s, self.heads, self.head_dim)
        q, k, v = self.q_proj(x).view(shape), self.k_proj(x).view(shape), self.v_proj(x).view(shape)

        def rope(t):  # (n, s, nh, hd) rotated by rot (s, 1, hd/2)
            tc = torch.view_as_complex(t.float().reshape(*t.shape[:-1], t.shape[-1] // 2, 2))
            return torch.view_as_real(tc * rot[None]).flatten(3).type_as(t)

        q, k = rope(q), rope(k)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.o_proj(out.transpose(1, 2).reshape(n, s, -1))


class _MLP(nn.Module):
    def __init__(self, v: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(v.hidden_size, v.intermediate_size)
        self.fc2 = nn.Linear(v.intermediate_size, v.hidden_size)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, v: VisionConfig):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(v.hidden_size)
        self.self_attn = _Attention(v)
        self.post_attention_layernorm = nn.LayerNorm(v.hidden_size)
        self.mlp = _MLP(v)

    def forward(self, x, rot):
        x = x + self.self_attn(self.input_layernorm(x), rot)
        return x + self.mlp(self.post_attention_layernorm(x))


class _Encoder(nn.Module):
    def __init__(self, v: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(_Block(v) for _ in range(v.num_hidden_layers))


class _Unfold(nn.Module):
    def __init__(self, v: VisionConfig):
        super().__init__()
        self.patch = v.patch_size
        self.linear = nn.Linear(v.num_channels * v.patch_size ** 2, v.hidden_size, bias=False)

    def forward(self, pixels):  # (N, 3, S, S) -> (N, P, h)
        return self.linear(F.unfold(pixels, kernel_size=self.patch, stride=self.patch).transpose(1, 2))


class _AdapterMLP(nn.Module):
    def __init__(self, v: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(v.intermediate_size, v.projector_input_dim, bias=False)
        self.fc2 = nn.Linear(v.projector_output_dim, v.projector_output_dim, bias=False)

    def forward(self, x):
        return F.gelu(self.fc2(F.gelu(self.fc1(x))))


class _Adapter(nn.Module):
    def __init__(self, v: VisionConfig):
        super().__init__()
        self.ratio = v.pixel_shuffle_ratio
        self.mlp = _AdapterMLP(v)

    def forward(self, x):
        return self.mlp(pixel_shuffle(x, self.ratio))


class VisionTower(nn.Module):
    def __init__(self, v: VisionConfig):
        super().__init__()
        h = v.hidden_size
        self.patch_embedding = _Unfold(v)
        self.class_embedding = nn.Parameter(torch.zeros(h))
        self.positional_embedding_vlm = nn.Parameter(torch.zeros(v.patches_per_side ** 2 + 1, h))
        self.layernorm_pre, self.layernorm_post = nn.LayerNorm(h), nn.LayerNorm(h)
        self.model = _Encoder(v)
        self.vision_adapter = _Adapter(v)
        self.register_buffer("rot", vision_rope(v), persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> (N, K, F)."""
        x = self.patch_embedding(pixels)                                             # (N, P, h)
        x = torch.cat([x, self.class_embedding.expand(x.shape[0], 1, -1)], dim=1)   # (N, P+1, h)
        x = self.layernorm_pre(x + self.positional_embedding_vlm.to(x.dtype))
        for block in self.model.layers:
            x = block(x, self.rot)
        x = self.layernorm_post(x)[:, :-1]                                           # drop CLS
        return self.vision_adapter(x)


class _Projector(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.linear_1 = nn.Linear(cfg.vision.vision_output_dim, cfg.text.hidden_size, bias=False)


class VisionModel(nn.Module):
    """Tower + projector; state-dict names equal the checkpoint's (vision_model.*, multi_modal_projector.*)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vision is None:
            raise ValueError("this checkpoint has no vision tower")
        self.vision_model = VisionTower(cfg.vision)
        self.multi_modal_projector = _Projector(cfg)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) tiles -> (N*K, C) text-width features, in tile order."""
        feats = self.vision_model(pixels)
        return self.multi_modal_projector.linear_1(feats.reshape(-1, feats.shape[-1]))

"""Rotary position embedding in Llama 4's complex, interleaved-pair form.

Shape legend: T tokens, H heads, D head_dim, D/2 rotated pairs.
Adjacent channels (2i, 2i+1) of q/k form one complex number that is multiplied by
exp(i * pos * inv_freq[i]); checkpoints store q/k weights in that order.
"""

from __future__ import annotations

import math

import torch

from ..config import RopeScaling


def inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """(D/2,) fp32 inverse frequencies on the CPU, with Llama 3 style scaling when configured.
    Always computed on the CPU, also inside a `torch.device("meta")` block: on meta, the division
    runs a Python reference that imports torch._dynamo (~1.5 s of every rank start)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))
    if scaling is None:
        return inv_freq
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    if scaling.high_freq_factor > scaling.low_freq_factor:  # equal factors leave no medium band
        smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor)
        smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        scaled = torch.where(medium, smoothed, scaled)
    return scaled


def rotation(positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """positions (T,) -> complex64 rotations (T, D/2)."""
    angles = positions.float()[:, None] * inv_freq.to(positions.device)[None, :]
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """x (T, H, D) rotated by rot (T, D/2); computed in fp32, returned in x's dtype."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], x.shape[-1] // 2, 2))  # (T, H, D/2)
    return torch.view_as_real(xc * rot[:, None, :]).flatten(-2).type_as(x)

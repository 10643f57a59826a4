"""RMSNorm and the weightless L2 norm Llama 4 applies to q/k.

Shape legend: T tokens, C hidden (or head) width. Both norms compute in fp32 and cast back
before the weight multiply, exactly as Meta's and transformers' Llama 4 do.
"""

from __future__ import annotations

import torch
from torch import nn


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) over the last dim, computed in fp32, returned in x's dtype. (..., C) -> (..., C)"""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, width: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., C) -> (..., C)
        return rms_normalize(x, self.eps) * self.weight

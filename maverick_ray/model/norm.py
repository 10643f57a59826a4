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
    """rms_normalize(x) * weight; in fp32 inference, the native kernel (native/rms_norm.py)
    when one is attached (`use_kernel`)."""

    def __init__(self, width: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width))
        self.kernel = None  # native/rms_norm.py RMSNormKernel, see use_kernel

    def use_kernel(self, kernel) -> bool:
        """Runs inference calls on fp32 inputs through `kernel` when it supports this weight;
        returns whether it does."""
        self.kernel = kernel if kernel is not None and kernel.supports(self.weight) else None
        return self.kernel is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., C) -> (..., C)
        if self.kernel is not None and x.dtype == torch.float32 and not torch.is_grad_enabled():
            return self.kernel(x, self.weight, self.eps)
        return rms_normalize(x, self.eps) * self.weight

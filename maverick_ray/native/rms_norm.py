"""Python side of rms_norm.c: RMSNorm of fp32 rows in one call.

Shape legend: T rows (any leading dims flattened), C width.
"""

from __future__ import annotations

import ctypes

import torch

from .build import load

_P, _L = ctypes.c_void_p, ctypes.c_int64


class RMSNormKernel:
    """Callable kernel: (x (..., C), weight (C,), eps) -> x / rms(x) * weight, fp32 CPU, no autograd."""

    def __init__(self, lib: ctypes.CDLL):
        self._fn = lib.rms_norm_f32
        self._fn.argtypes = [_P, _P, _P, _L, _L, ctypes.c_float, ctypes.c_int]
        self._fn.restype = None

    @staticmethod
    def supports(weight: torch.Tensor) -> bool:
        return weight.dtype == torch.float32 and weight.device.type == "cpu" and weight.dim() == 1

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        # Checks in plain attribute reads: this runs twice per layer per step, and at decode a
        # dispatched op or a helper call costs more than the norm itself (issue 21).
        C = weight.shape[0] if weight.dim() == 1 else -1
        if not (x.dtype == weight.dtype == torch.float32 and x.device.type == weight.device.type == "cpu"
                and x.shape[-1] == C):
            raise ValueError(f"rms_norm kernel needs fp32 CPU x (..., {C}) and weight (C,), got x "
                             f"{tuple(x.shape)} {x.dtype} {x.device}, weight {tuple(weight.shape)} {weight.dtype}")
        if not x.is_contiguous():
            x = x.contiguous()
        if not weight.is_contiguous():
            weight = weight.contiguous()
        y = torch.empty_like(x)
        self._fn(x.data_ptr(), weight.data_ptr(), y.data_ptr(), x.numel() // C if C else 0, C, eps,
                 torch.get_num_threads())
        return y


def rms_norm_kernel() -> RMSNormKernel | None:
    """The compiled kernel, or None when it cannot be built here (logged; callers use torch)."""
    lib = load("rms_norm")
    return RMSNormKernel(lib) if lib is not None else None

"""Python side of grouped_experts.c: one call runs a layer's routed experts over few rows.

Shape legend: R rows, C hidden, I expert width, E local experts.
"""

from __future__ import annotations

import ctypes

import torch

from .build import load

BLOCK = 16  # output rows per work unit (blocks of 8, 32 and 64 timed alike on the mini decode shapes)

_P, _L = ctypes.c_void_p, ctypes.c_int64


class GroupedExperts:
    """Callable kernel: (x (R, C), ids (R,), gate_up (E, C, 2I), down (E, I, C)) -> (R, C).

    The weights must be stored output-major (Experts.fuse_projections): gate_up a view of a
    contiguous (E, 2I, C) tensor, down of a contiguous (E, C, I) one. fp32, CPU, no autograd."""

    def __init__(self, lib: ctypes.CDLL):
        self._fn = lib.grouped_swiglu_f32
        self._fn.argtypes = [_P, _P, _L, _L, _L, _L, _P, _P, _P, _P, _P, _P, _P, _P, _L, ctypes.c_int]
        self._fn.restype = ctypes.c_int

    @staticmethod
    def supports(gate_up: torch.Tensor, down: torch.Tensor) -> bool:
        E, C, two_i = gate_up.shape
        return (gate_up.dtype == down.dtype == torch.float32 and gate_up.device.type == down.device.type == "cpu"
                and gate_up.stride() == (two_i * C, 1, C) and down.shape == (E, two_i // 2, C)
                and down.stride() == (C * two_i // 2, 1, two_i // 2))

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        if not self.supports(gate_up, down):
            raise ValueError("grouped experts kernel needs fp32 CPU weights in output-major layout")
        E, C, two_i = gate_up.shape
        I = two_i // 2
        x = x.contiguous()
        if ids.dtype != torch.int64:  # no no-op casts: each is a dispatched op (issue 21)
            ids = ids.to(torch.int64)
        ids = ids.contiguous()
        if x.dtype != torch.float32 or x.shape[1] != C or ids.shape != (x.shape[0],):
            raise ValueError(f"expected x (R, {C}) fp32 and ids (R,), got {tuple(x.shape)} {x.dtype}, {tuple(ids.shape)}")
        R = x.shape[0]
        # Scratch as two allocations addressed by pointer offsets, not one per buffer or views.
        out, scratch = torch.empty_like(x), x.new_empty(R * (C + I))        # scratch: xs (R, C), act (R, I)
        index = torch.empty(R + 2 * (E + 1) + 2 * E * (-(-I // BLOCK) - (-C // BLOCK)), dtype=torch.int64)
        xs, fsize, isize = scratch.data_ptr(), x.element_size(), index.element_size()
        order = index.data_ptr()
        starts = order + R * isize
        units = starts + 2 * (E + 1) * isize
        rc = self._fn(x.data_ptr(), ids.data_ptr(), R, E, C, I, gate_up.data_ptr(), down.data_ptr(), out.data_ptr(),
                      xs, xs + R * C * fsize, order, starts, units, BLOCK, torch.get_num_threads())
        if rc != 0:
            raise ValueError(f"expert ids must lie in [0, {E}), got min {ids.min().item()} max {ids.max().item()}")
        return out


def grouped_experts_kernel() -> GroupedExperts | None:
    """The compiled kernel, or None when it cannot be built here (logged; callers use torch)."""
    lib = load("grouped_experts")
    return GroupedExperts(lib) if lib is not None else None

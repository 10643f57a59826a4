"""Python side of attention_prologue.c: RoPE, QK norm, temperature, cache write and q in one call.

Shape legend: T tokens, H query heads, KV kv heads, D head_dim, N = (H + 2 KV) * D.
"""

from __future__ import annotations

import ctypes

import torch

from .build import load

_P, _L, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float


class AttentionPrologue:
    """Callable: (qkv (T, N) modified in place, positions (T,) int64, H, KV, D, inv_freq (D/2,) or
    None (NoPE), qk_eps or None, floor_scale or None (no temperature), attn_scale, k_pool, v_pool
    (rows, KV, D) or None, write_rows (T,) int64) -> q (T, H, D). fp32 CPU, no autograd."""

    def __init__(self, lib: ctypes.CDLL):
        self._fn = lib.attention_prologue_f32
        self._fn.argtypes = [_P, _P, _L, _L, _L, _L, _P, _F, _F, _F, _P, _P, _P, _P, _L, ctypes.c_int]
        self._fn.restype = ctypes.c_int

    @staticmethod
    def supports(dtype: torch.dtype, device: torch.device) -> bool:
        return dtype == torch.float32 and device.type == "cpu"

    def __call__(self, qkv: torch.Tensor, positions: torch.Tensor, H: int, KV: int, D: int,
                 inv_freq: torch.Tensor | None, qk_eps: float | None, floor_scale: float | None,
                 attn_scale: float, k_pool: torch.Tensor | None, v_pool: torch.Tensor | None,
                 write_rows: torch.Tensor | None) -> torch.Tensor:
        T = qkv.shape[0]
        pools = k_pool is not None
        # Plain attribute checks, no helper calls: this runs once per layer per step (issue 21).
        if not (qkv.dtype == torch.float32 and qkv.is_cpu and qkv.is_contiguous() and qkv.shape == (T, (H + 2 * KV) * D)
                and positions.dtype == torch.int64 and positions.shape == (T,) and positions.is_contiguous()
                and (inv_freq is None or (inv_freq.dtype == torch.float32 and inv_freq.shape == (D // 2,)
                                          and inv_freq.is_contiguous()))
                and (not pools or (k_pool.dtype == v_pool.dtype == torch.float32 and k_pool.is_contiguous()
                                   and v_pool.is_contiguous() and k_pool.shape[1:] == v_pool.shape[1:] == (KV, D)
                                   and k_pool.shape[0] == v_pool.shape[0] and write_rows is not None
                                   and write_rows.dtype == torch.int64 and write_rows.shape == (T,)
                                   and write_rows.is_contiguous()))):
            raise ValueError(f"attention prologue needs contiguous fp32 CPU qkv (T, {(H + 2 * KV) * D}), int64 "
                             f"positions and write rows (T,), fp32 inv_freq ({D // 2},) and pools (rows, {KV}, {D})")
        q = qkv.new_empty(T, H, D)
        rc = self._fn(qkv.data_ptr(), positions.data_ptr(), T, H, KV, D,
                      None if inv_freq is None else inv_freq.data_ptr(), -1.0 if qk_eps is None else qk_eps,
                      floor_scale or 0.0, attn_scale, q.data_ptr(),
                      k_pool.data_ptr() if pools else None, v_pool.data_ptr() if pools else None,
                      write_rows.data_ptr() if pools else None, k_pool.shape[0] if pools else 0, torch.get_num_threads())
        if rc:
            raise IndexError(f"attention prologue: a cache write row lies outside the pools' {k_pool.shape[0]} rows")
        return q


def attention_prologue_kernel() -> AttentionPrologue | None:
    """The compiled kernel, or None when it cannot be built here (logged; callers use torch)."""
    lib = load("attention_prologue")
    return AttentionPrologue(lib) if lib is not None else None

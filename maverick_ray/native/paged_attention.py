"""Python side of paged_attention.c: decode attention read in place from the paged KV cache.

Shape legend: B sequences, KV kv heads, G query heads per kv head, D head_dim, nb blocks per
sequence (padded), P pages, Bs block size.
"""

from __future__ import annotations

import ctypes
import math

import torch

from .build import load

_P, _L = ctypes.c_void_p, ctypes.c_int64


class PagedDecodeKernel:
    """Callable: (q (B, KV, G, D), k_pool, v_pool (P * Bs, KV, D), table (B, nb), first (B,),
    end (B,), block size, chunk or None) -> (B, KV, G, D), fp32 CPU, no autograd."""

    def __init__(self, lib: ctypes.CDLL):
        self._fn = lib.paged_decode_f32
        self._fn.argtypes = [_P, _P, _P, _P, _P, _P, _L, _L, _L, _L, _L, _L, _L, ctypes.c_float, _P, ctypes.c_int]
        self._fn.restype = ctypes.c_int

    @staticmethod
    def supports(dtype: torch.dtype, device: torch.device) -> bool:
        return dtype == torch.float32 and device.type == "cpu"

    def __call__(self, q, k_pool, v_pool, table, first, end, block_size: int, chunk: int | None):
        B, KV, G, D = q.shape
        if not (self.supports(q.dtype, q.device) and k_pool.dtype == v_pool.dtype == torch.float32
                and k_pool.is_contiguous() and v_pool.is_contiguous() and k_pool.shape[1:] == (KV, D)):
            raise ValueError("paged decode kernel needs fp32 CPU q (B, KV, G, D) and contiguous pools (rows, KV, D)")
        q = q.contiguous()
        table, first, end = (t if t.dtype == torch.int64 and t.is_contiguous() else t.to(torch.int64).contiguous()
                             for t in (table, first, end))   # KVView's are int64 already: no op dispatched
        out = torch.empty_like(q)
        rc = self._fn(q.data_ptr(), k_pool.data_ptr(), v_pool.data_ptr(), table.data_ptr(), first.data_ptr(),
                      end.data_ptr(), B, table.shape[1], KV, G, D, block_size, chunk or 0, 1.0 / math.sqrt(D),
                      out.data_ptr(), torch.get_num_threads())
        if rc == 1:
            raise ValueError(f"paged decode kernel: {G} query heads per kv head is beyond its buffers")
        if rc:
            raise MemoryError("paged decode kernel: a thread could not allocate its score buffer")
        return out


def paged_decode_kernel() -> PagedDecodeKernel | None:
    """The compiled kernel, or None when it cannot be built here (logged; callers use torch)."""
    lib = load("paged_attention")
    return PagedDecodeKernel(lib) if lib is not None else None

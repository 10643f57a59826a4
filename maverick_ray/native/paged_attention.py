"""Python side of paged_attention.c: attention read in place from the paged KV cache, for decode
steps and for prompt chunks that continue a cached sequence.

Shape legend: B sequences, T new tokens (all sequences back to back), KV kv heads, G query heads
per kv head, D head_dim, nb blocks per sequence (padded), P pages, Bs block size.
"""

from __future__ import annotations

import ctypes
import math

import torch

from .build import load

_P, _L = ctypes.c_void_p, ctypes.c_int64


def _int64(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.int64 and t.is_contiguous() else t.to(torch.int64).contiguous()


class PagedAttentionKernel:
    """Callable: (q (T, KV, G, D), k_pool, v_pool (P * Bs, KV, D), table (B, nb), first (B,),
    end (B,), block size, chunk or None, qlen (B,) new tokens per sequence or None for one each)
    -> (T, KV, G, D), fp32 CPU, no autograd. The new tokens' keys and values must already be in
    the cache (end counts them); each token sees the keys up to its own position."""

    def __init__(self, lib: ctypes.CDLL):
        self._fn = lib.paged_attention_f32
        self._fn.argtypes = [_P] * 7 + [_L] * 8 + [ctypes.c_float, _P, ctypes.c_int]
        self._fn.restype = ctypes.c_int

    @staticmethod
    def supports(dtype: torch.dtype, device: torch.device) -> bool:
        return dtype == torch.float32 and device.type == "cpu"

    def __call__(self, q, k_pool, v_pool, table, first, end, block_size: int, chunk: int | None,
                 qlen: torch.Tensor | None = None):
        T, KV, G, D = q.shape
        # Plain attribute checks: this runs once per layer per step, where a helper call or a
        # dispatched op costs more than the check (issue 21).
        if not (q.dtype == k_pool.dtype == v_pool.dtype == torch.float32 and q.is_cpu
                and k_pool.is_contiguous() and v_pool.is_contiguous() and k_pool.shape[1:] == (KV, D)):
            raise ValueError("paged attention kernel needs fp32 CPU q (T, KV, G, D) and contiguous pools (rows, KV, D)")
        qlen = None if qlen is None else _int64(qlen)   # None: one new token per sequence (decode)
        if not q.is_contiguous():
            q = q.contiguous()
        table, first, end = _int64(table), _int64(first), _int64(end)  # KVView's are int64: no op dispatched
        out = torch.empty_like(q)
        rc = self._fn(q.data_ptr(), k_pool.data_ptr(), v_pool.data_ptr(), table.data_ptr(), first.data_ptr(),
                      end.data_ptr(), None if qlen is None else qlen.data_ptr(), T, table.shape[0], table.shape[1],
                      KV, G, D, block_size, chunk or 0, 1.0 / math.sqrt(D), out.data_ptr(), torch.get_num_threads())
        if rc == 3:
            raise ValueError(f"paged attention kernel: {T} query tokens, but the sequences add up to "
                             f"{table.shape[0] if qlen is None else int(qlen.sum())}")
        if rc == 1:
            raise ValueError(f"paged attention kernel: {G} query heads per kv head is beyond its buffers")
        if rc:
            raise MemoryError("paged attention kernel: could not allocate its work list or buffers")
        return out


def paged_attention_kernel() -> PagedAttentionKernel | None:
    """The compiled kernel, or None when it cannot be built here (logged; callers use torch)."""
    lib = load("paged_attention")
    return PagedAttentionKernel(lib) if lib is not None else None

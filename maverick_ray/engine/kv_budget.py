"""How many KV pages a rank gets, and the context length that follows from them."""

from __future__ import annotations

import torch

from ..config import ConfigError, EngineConfig, TextConfig
from ..model.kv_cache import KVLayout

CPU_DEFAULT_LEN = 2048  # CPU, no memory set: room for max_num_seqs sequences of this many tokens


def wanted_context(engine: EngineConfig, text: TextConfig) -> int:
    """max_model_len as configured, else the checkpoint's context."""
    return engine.max_model_len or text.max_position_embeddings


def kv_pages(engine: EngineConfig, text: TextConfig, layout: KVLayout, dtype: torch.dtype,
             device: torch.device, free_bytes: int | None = None) -> int:
    """Pages of the rank's KV cache: kv_cache_memory_gb when set; on GPU kv_cache_fraction of
    `free_bytes` (device memory free after the weights); on CPU room for max_num_seqs sequences
    of min(context, CPU_DEFAULT_LEN) tokens (the footprint the slot cache had)."""
    page = layout.page_bytes(dtype)
    if engine.kv_cache_memory_gb:
        return max(1, int(engine.kv_cache_memory_gb * 2**30) // page)
    if device.type == "cuda" and free_bytes is not None:
        return max(1, int(free_bytes * engine.kv_cache_fraction) // page)
    return engine.max_num_seqs * layout.pages_for_length(min(wanted_context(engine, text), CPU_DEFAULT_LEN),
                                                         engine.max_prefill_tokens)


def resolve_max_model_len(engine: EngineConfig, text: TextConfig, layout: KVLayout, pages: int,
                          dtype: torch.dtype = torch.float32) -> int:
    """The context one sequence may use: the wanted one when one sequence fits in `pages`;
    otherwise, when max_model_len was left automatic, the longest that fits. ConfigError when
    an explicit max_model_len does not fit."""
    want, step = wanted_context(engine, text), engine.max_prefill_tokens
    if layout.pages_for_length(want, step) <= pages:
        return want
    gib = pages * layout.page_bytes(dtype) / 2**30
    if engine.max_model_len:
        raise ConfigError(f"max_model_len {want} needs {layout.pages_for_length(want, step)} KV pages for one "
                          f"sequence; each rank's KV cache has {pages} ({gib:.2f} GiB): raise kv_cache_memory_gb or "
                          "lower max_model_len")
    lo, hi = 1, want  # the longest length whose pages fit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if layout.pages_for_length(mid, step) <= pages else (lo, mid - 1)
    return lo

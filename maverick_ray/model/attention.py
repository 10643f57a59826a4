"""Llama 4 attention: GQA, RoPE or NoPE per layer, chunked masks, QK norm, temperature tuning.

Shape legend: T new tokens (all sequences flattened), B sequences, H query heads,
KV key/value heads, D head_dim, C hidden, N context length (cached + new).
Order inside one layer (as transformers' Llama4TextAttention runs it): RoPE (RoPE layers) ->
QK L2 norm (RoPE layers, if use_qk_norm) -> temperature tuning (NoPE layers) -> cache write ->
softmax(q k^T / sqrt(D)) v.
RoPE layers attend within chunks of `attention_chunk_size`; NoPE layers see the whole prefix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TextConfig
from .batch import ForwardBatch
from .kv_cache import PagedKVCache
from . import prefill_attention
from .fused import matmul, project
from .norm import rms_normalize
from .rope import apply_rope, rotation


def attention_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, chunk: int | None) -> torch.Tensor:
    """Boolean (Tq, Tk) mask, True where query at q_pos may attend key at k_pos."""
    allowed = k_pos[None, :] <= q_pos[:, None]
    if chunk is not None:
        allowed &= (k_pos[None, :] // chunk) == (q_pos[:, None] // chunk)
    return allowed


def paged_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, chunk: int | None) -> torch.Tensor:
    """q_pos (B,) one query per sequence, k_pos (B, N) its gathered keys' positions (-1: none)
    -> boolean (B, N), True where the query may attend the key."""
    allowed = (k_pos >= 0) & (k_pos <= q_pos[:, None])
    if chunk is not None:
        allowed &= (k_pos // chunk) == (q_pos[:, None] // chunk)
    return allowed


def _padding_is_cheap(lengths: list[int]) -> bool:
    """Several prompts padded to the longest cost at most twice their exact attention work."""
    return len(lengths) > 1 and len(lengths) * max(lengths) ** 2 <= 2 * sum(n * n for n in lengths)


# Sequences adding at most this many tokens go through the native kernel in a mixed batch; longer
# chunks through flash SDPA (model/prefill_attention.py), which wins beyond it. At 16k cached keys,
# 2 threads, global layer: 2.1 / 4.4 / 7.4 / 13.5 ms for 1 / 4 / 8 / 16 new tokens against 3.9 /
# 6.0 / 7.3 / 12.1 (benchmarks/bench_prefill_attention.py, BENCHMARKS.md).
KERNEL_MAX_NEW = 8


def _native_kernel(q: torch.Tensor, cache: PagedKVCache | None) -> bool:
    """The cache carries the native kernel (fp32 CPU rank) and q is what it takes."""
    kernel = cache.attention_kernel if cache is not None else None
    return kernel is not None and kernel.supports(q.dtype, q.device)


def temperature_scale(positions: torch.Tensor, floor_scale: float, attn_scale: float) -> torch.Tensor:
    """(T,) multiplier for NoPE-layer queries: log1p(floor((pos + 1) / floor_scale)) * attn_scale + 1."""
    return torch.log1p(torch.floor((positions.float() + 1.0) / floor_scale)) * attn_scale + 1.0


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.use_rope = cfg.uses_rope(layer)
        self.qk_norm = cfg.use_qk_norm and self.use_rope
        self.temperature = cfg.attn_temperature_tuning and not self.use_rope
        self.chunk = cfg.attention_chunk_size if self.use_rope else None
        self.eps, self.floor_scale, self.attn_scale = cfg.rms_norm_eps, cfg.floor_scale, cfg.attn_scale
        C = cfg.hidden_size
        self.q_proj = nn.Linear(C, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(C, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(C, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, C, bias=False)
        self.qkv: torch.Tensor | None = None  # (C, (H + 2 KV) D) once fused (model/fused.py)
        self.group = 0  # this layer's group in the paged KV cache (set from the cache on use)
        self.prologue = None  # native/attention_prologue.py kernel, see use_prologue

    def use_prologue(self, kernel) -> bool:
        """Runs RoPE, QK norm, temperature and the cache write of fp32 CPU inference calls with
        a cache in `kernel` (one call instead of ~15 dispatched ops); returns whether it will."""
        self.prologue = kernel
        return kernel is not None

    def fuse_projections(self) -> None:
        """One matmul for q, k and v at inference (model/fused.py); idempotent."""
        if self.qkv is None:
            from .fused import fuse_columns

            self.qkv = fuse_columns([self.q_proj, self.k_proj, self.v_proj])

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (T, C) -> qk (T, H + KV, D) (query heads, then key heads), v (T, KV, D).

        Queries and keys stay side by side so RoPE and the QK norm run once over both."""
        T, H, KV, D = x.shape[0], self.n_heads, self.n_kv, self.head_dim
        if self.qkv is None:
            qk = torch.cat([self.q_proj(x), self.k_proj(x)], dim=-1)
            v = self.v_proj(x)
        else:
            qk, v = matmul(x, self.qkv).split([(H + KV) * D, KV * D], dim=-1)
        return qk.view(T, H + KV, D), v.view(T, KV, D)

    def forward(self, x: torch.Tensor, batch: ForwardBatch, inv_freq: torch.Tensor,
                cache: PagedKVCache | None, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x (T, C) normalized hidden states -> (T, C) attention output (+ residual, when given,
        added in the output projection's matmul). inv_freq (D/2,): the model's RoPE frequencies."""
        T = x.shape[0]
        if cache is not None:
            self.group = cache.group_of(self.layer)
        if self._prologue_applies(x, cache):
            q, k, v = self._native_prologue(x, batch, inv_freq, cache)
        else:
            q, k, v = self._torch_prologue(x, batch, inv_freq, cache)
        if cache is not None and batch.is_decode:
            out = self._decode(q, batch, cache)  # (B, H, D) with B == T
        else:
            out = self._mixed(q, k(), v(), batch, cache)
        return project(out.reshape(T, self.n_heads * self.head_dim), self.o_proj, residual)

    def _prologue_applies(self, x: torch.Tensor, cache: PagedKVCache | None) -> bool:
        return (self.prologue is not None and self.qkv is not None and cache is not None
                and self.prologue.supports(x.dtype, x.device) and not torch.is_grad_enabled())

    def _native_prologue(self, x, batch: ForwardBatch, inv_freq, cache: PagedKVCache):
        """One matmul and one native call; k and v (stored in the cache) as views on demand."""
        T, H, KV, D = x.shape[0], self.n_heads, self.n_kv, self.head_dim
        qkv = matmul(x, self.qkv)  # (T, (H + 2 KV) D), rotated and normed in place below
        q = self.prologue(qkv, batch.positions, H, KV, D, inv_freq if self.use_rope else None,
                          self.eps if self.qk_norm else None, self.floor_scale if self.temperature else None,
                          self.attn_scale, *cache.pools(self.layer), batch.kv.write_rows[self.group])
        heads = lambda: qkv.view(T, H + 2 * KV, D)  # noqa: E731  (T, H + 2 KV, D)
        return q, lambda: heads()[:, H:H + KV], lambda: heads()[:, H + KV:]

    def _torch_prologue(self, x, batch: ForwardBatch, inv_freq, cache: PagedKVCache | None):
        """RoPE, QK norm, temperature and cache write as torch ops -> q (T, H, D) and k, v getters."""
        qk, v = self._project(x)  # (T, H + KV, D), (T, KV, D)
        if self.use_rope:
            qk = apply_rope(qk, batch.memo("rot", lambda: rotation(batch.positions, inv_freq)))  # (T, D/2)
        if self.qk_norm:
            qk = rms_normalize(qk, self.eps)
        q, k = qk.split([self.n_heads, self.n_kv], dim=1)  # (T, H, D), (T, KV, D)
        if self.temperature:
            scale = batch.memo(("temperature_scale", self.floor_scale, self.attn_scale), lambda: temperature_scale(
                batch.positions, self.floor_scale, self.attn_scale)[:, None, None])  # (T, 1, 1) fp32, once per forward
            q = (q * scale).to(q.dtype)
        if cache is not None:
            cache.write(self.layer, batch.kv.write_rows[self.group], k, v)
        return q, lambda: k, lambda: v

    def _mixed(self, q, k, v, batch: ForwardBatch, cache: PagedKVCache | None) -> torch.Tensor:
        """Prefill or mixed batches -> (T, H, D). With the native kernel, sequences adding at most
        KERNEL_MAX_NEW tokens over the cache (decodes, small paced prompt chunks) go through one
        kernel call that reads their pages in place; without it, sequences adding one token go
        through one batched decode. Fresh prompts (start 0) go through one padded SDPA when
        padding costs little; the rest (and everything when none applies) one sequence at a time."""
        live = [i for i, n in enumerate(batch.lengths) if n]
        if _native_kernel(q, cache):
            return self._mixed_native(q, k, v, batch, cache, live)
        single = [i for i in live if batch.lengths[i] == 1 and cache is not None] if len(live) > 1 else []
        return self._mixed_torch(q, k, v, batch, cache, live, single)

    def _mixed_torch(self, q, k, v, batch: ForwardBatch, cache: PagedKVCache | None, live: list[int],
                     single: list[int] = ()) -> torch.Tensor:
        """_mixed's torch paths for the sequences `live`: `single` ones in one batched decode."""
        fresh = [i for i in live if batch.lengths[i] > 1 and batch.starts[i] == 0]
        pad_fresh = _padding_is_cheap([batch.lengths[i] for i in fresh])
        if not (len(single) > 1 or pad_fresh):
            return self._per_sequence(q, k, v, batch, cache)
        out = q.new_empty(q.shape)  # (T, H, D)
        done = set()
        if len(single) > 1:
            sub, rows = batch.subset(single)
            out[rows] = self._decode(q[rows], sub, cache)
            done.update(single)
        if pad_fresh:
            sub, rows = batch.subset(fresh)
            out[rows] = self._fresh_padded(q, k, v, rows, sub.lengths)
            done.update(fresh)
        rest = [i for i in live if i not in done]
        if rest:
            sub, rows = batch.subset(rest)
            out[rows] = self._per_sequence(q[rows], k[rows], v[rows], sub, cache)
        return out

    def _mixed_native(self, q, k, v, batch: ForwardBatch, cache: PagedKVCache, live: list[int]) -> torch.Tensor:
        """_mixed with the native kernel: the short sequences in one in-place call, the long
        chunks through the torch paths."""
        if max(batch.lengths, default=0) <= KERNEL_MAX_NEW:
            qlen = batch.memo("qlen", lambda: torch.tensor(batch.lengths, dtype=torch.long))
            return self._native(q, batch, cache, qlen)
        short = [i for i in live if batch.lengths[i] <= KERNEL_MAX_NEW]
        rest = [i for i in live if batch.lengths[i] > KERNEL_MAX_NEW]
        if not short:
            return self._mixed_torch(q, k, v, batch, cache, rest)
        out = q.new_empty(q.shape)  # (T, H, D)
        sub, rows = batch.memo(("subset", tuple(short)), lambda: batch.subset(short))
        qlen = batch.memo(("qlen", tuple(short)), lambda: torch.tensor(sub.lengths, dtype=torch.long))
        out[rows] = self._native(q[rows], sub, cache, qlen)
        sub, rows = batch.memo(("subset", tuple(rest)), lambda: batch.subset(rest))
        out[rows] = self._mixed_torch(q[rows], k[rows], v[rows], sub, cache, list(range(len(rest))))
        return out

    def _native(self, q, batch: ForwardBatch, cache: PagedKVCache, qlen: torch.Tensor | None) -> torch.Tensor:
        """q (T, H, D) of the batch's sequences, their keys and values already in the cache
        (qlen: new tokens per sequence; None: one each) -> (T, H, D), read in place from the
        pages (native/paged_attention.c)."""
        kv, T = batch.kv, q.shape[0]
        out = cache.attention_kernel(q.reshape(T, self.n_kv, self.n_heads // self.n_kv, self.head_dim),
                                     *cache.pools(self.layer), kv.table[self.group], kv.first[self.group], kv.end,
                                     kv.block_size, self.chunk, qlen)
        return out.reshape(T, self.n_heads, self.head_dim)

    def _fresh_padded(self, q, k, v, rows: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        """F fresh prompts (positions 0..n-1) whose rows of q, k, v are `rows` (back to back, in
        order) in one SDPA over (F, H, N, D), N the longest prompt -> (len(rows), H, D)."""
        N, dev = max(lengths), q.device
        j = torch.arange(N, device=dev)
        n = torch.tensor(lengths, device=dev)[:, None]                        # (F, 1)
        first = torch.cumsum(n, 0) - n                                        # (F, 1)
        idx = rows[first + torch.minimum(j[None, :], n - 1)]                  # (F, N) padding repeats a row
        # Fresh prompts sit at positions 0..n-1 and padding comes after every real key, so the
        # causal mask alone keeps real queries off it (padded queries are dropped); within one
        # attention chunk SDPA applies it itself (is_causal).
        mask = self._fresh_mask(j)                                            # (N, N), or None: causal
        o = F.scaled_dot_product_attention(
            q[idx].transpose(1, 2), k[idx].transpose(1, 2), v[idx].transpose(1, 2),  # (F, H|KV, N, D)
            attn_mask=mask, is_causal=mask is None, enable_gqa=self.n_heads != self.n_kv)
        return o.transpose(1, 2)[j[None, :] < n]                              # (rows, H, D), in order

    def _fresh_mask(self, pos: torch.Tensor) -> torch.Tensor | None:
        """The mask of a fresh prompt's tokens at positions `pos` = 0..n-1 over each other: None
        within one attention chunk, where it is plain causal and SDPA applies it itself (is_causal,
        skipping the masked blocks instead of reading a mask: 2x faster at 2048 tokens on CPU,
        BENCHMARKS.md); else the chunked causal (n, n) mask."""
        if self.chunk is None or pos.shape[0] <= self.chunk:
            return None
        return attention_mask(pos, pos, self.chunk)

    def _fresh(self, q_i: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor) -> torch.Tensor:
        """One fresh prompt at positions 0..n-1: q_i (1, H, n, D), k, v (n, KV, D) -> (n, H, D)."""
        mask = self._fresh_mask(q_pos)
        o = F.scaled_dot_product_attention(q_i, k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                           attn_mask=None if mask is None else mask[None, None],
                                           is_causal=mask is None, enable_gqa=self.n_heads != self.n_kv)
        return o[0].transpose(0, 1)

    def _decode(self, q: torch.Tensor, batch: ForwardBatch, cache: PagedKVCache) -> torch.Tensor:
        """One new token per sequence: one batched SDPA over the sequences' gathered blocks.

        The G = H / KV query heads that share a key/value head go in as G query rows of that
        head, (B, KV, G, D) over (B, KV, N, D): SDPA then never expands k/v per query head
        (about half the time of enable_gqa at decode sizes on CPU). Keys past a sequence's
        length, padding blocks and (chunked layers) keys of an earlier chunk are masked."""
        B = q.shape[0]
        group = self.n_heads // self.n_kv
        kv = batch.kv
        if _native_kernel(q, cache):
            return self._native(q, batch, cache, None)   # keys and values read in place from their pages
        k, v = cache.gather(self.layer, kv.read_rows[self.group])  # (B, N, KV, D)
        mask = paged_mask(batch.positions, kv.key_pos[self.group], self.chunk)[:, None, None, :]  # (B, 1, 1, N)
        out = F.scaled_dot_product_attention(
            q.reshape(B, self.n_kv, group, self.head_dim),  # (B, KV, G, D): query head h -> kv head h // G
            k.transpose(1, 2), v.transpose(1, 2),           # (B, KV, N, D)
            attn_mask=mask)
        return out.reshape(B, self.n_heads, self.head_dim)  # (B, H, D)

    def _per_sequence(self, q, k, v, batch: ForwardBatch, cache: PagedKVCache | None) -> torch.Tensor:
        """Prefill or mixed batches: each sequence attends over its own prefix."""
        outs, offset = [], 0
        for i, n in enumerate(batch.lengths):
            if n == 0:
                continue
            start = batch.starts[i]
            if cache is not None and start > 0 and prefill_attention.supported(q):
                # a chunk continuing a cached prompt: past and new keys apart, no gather of the new
                # ones, no mask (model/prefill_attention.py)
                def past_kv(lo: int, hi: int, i=i):
                    return cache.gather(self.layer, batch.kv.rows_between(self.group, i, lo, hi)[None])
                outs.append(prefill_attention.continued_prefill(q[offset:offset + n], k[offset:offset + n],
                                                                v[offset:offset + n], start, self.chunk, past_kv))
                offset += n
                continue
            q_i = q[offset:offset + n].transpose(0, 1)[None]  # (1, H, n, D)
            q_pos = batch.positions[offset:offset + n]
            if start == 0:
                # a fresh prompt: its own keys, no gather from the pages it has just written
                outs.append(self._fresh(q_i, k[offset:offset + n], v[offset:offset + n], q_pos))
                offset += n
                continue
            if cache is not None:
                k_i, v_i = cache.gather(self.layer, batch.kv.read_rows[self.group][i:i + 1])  # (1, N, KV, D)
                k_pos = batch.kv.key_pos[self.group][i]                                       # (N,), -1: none
                mask = attention_mask(q_pos, k_pos, self.chunk) & (k_pos >= 0)[None, :]      # (n, N)
            else:
                raise ValueError("a sequence continuing from cached tokens needs a KV cache")
            o = F.scaled_dot_product_attention(q_i, k_i.transpose(1, 2), v_i.transpose(1, 2),
                                               attn_mask=mask[None, None], enable_gqa=self.n_heads != self.n_kv)
            outs.append(o[0].transpose(0, 1))  # (n, H, D)
            offset += n
        if not outs:
            return q.new_zeros(0, self.n_heads, self.head_dim)
        return torch.cat(outs, 0)

"""Whole decode steps replayed from CUDA graphs (EP = 1 on a GPU).

Shape legend: B sequences of a step, Bg its bucket (B <= Bg), nb the bucket's block-table width
(blocks per sequence and layer group), Bs block size, N = nb * Bs gathered keys, G layer groups,
C hidden, V vocab, k experts per token.

A decode step on a GPU is host-bound: about 1300 dispatched ops and 210 kernel launches per
step keep the host busy 15-27x longer than the GPU (BENCHMARKS.md). A CUDA graph records the
kernels of one step once and launches them all with one call. A graph has fixed shapes and
fixed addresses, so steps are padded to a bucket, (Bg, nb): Bg from BATCH_BUCKETS up to the
engine's max_num_seqs, nb the next power of two of the widest block table. Each bucket's graph
is captured on first use and reads its inputs from buffers of its own:

    flat int64 (one host-to-device copy per step):
        positions (Bg,) | end (Bg,) | first (G, Bg) | write rows (G, Bg) | tables (G, Bg, nb)
    x (Bg, C) the step's embeddings

and leaves the logits (Bg, V) and each MoE layer's routed ids (Bg, k) in buffers of its own.
Everything a layer derives from the tables (the gathered rows, each key's position and mask)
is computed on the GPU inside the graph (_StaticView). Padded rows sit at position 0 of the
cache's scratch page (PagedKVCache(scratch_page=True)), which no sequence owns: they write
there, attend to that one key and are dropped from the outputs.

Only steps without a host sync can be captured: the routed experts must run as grouped GEMMs
(Hopper, bf16 or FP8), and the ranks must not exchange tokens (EP = 1). The same code runs
without capture (capture=False: each step runs the padded forward directly), which is how the
CPU tests check the padding and the static view against the ordinary path.
"""

from __future__ import annotations

import array
import logging
import math
from dataclasses import dataclass, field

import torch

from .batch import ForwardBatch
from .kv_cache import PagedKVCache, _PerGroup

log = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


def batch_bucket(B: int, max_batch: int) -> int | None:
    """The smallest bucket that holds B sequences (max_batch itself past the last listed one
    below it); None when B > max_batch."""
    if B > max_batch:
        return None
    return next((b for b in BATCH_BUCKETS if B <= b <= max_batch), max_batch)


def blocks_bucket(width: int) -> int:
    """Table width -> the next power of two (at least 1)."""
    return 1 << max(0, math.ceil(math.log2(max(width, 1))))


class _StaticView:
    """A KVView over a graph's fixed buffers (model/kv_cache.py KVView's attributes), with the
    gather rows and key positions computed on the device from the tables."""

    def __init__(self, block_size: int, end: torch.Tensor, first: list[torch.Tensor],
                 write_rows: list[torch.Tensor], table: list[torch.Tensor]):
        self.block_size, self.end, self.first, self.write_rows, self.table = block_size, end, first, write_rows, table
        self.device = end.device
        self._rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _gather_index(self, g: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(Bg, N) cache rows of group g's gathered keys and their positions (-1: not a key).
        Table entries past a sequence's blocks hold positions >= its end, so end alone masks them."""
        if g not in self._rows:
            bs, table = self.block_size, self.table[g]
            Bg, nb = table.shape
            offsets = torch.arange(nb * bs, device=self.device)                       # (N,)
            rows = (table[:, :, None] * bs + offsets[:bs]).view(Bg, nb * bs)
            kpos = self.first[g][:, None] * bs + offsets                              # (Bg, N)
            self._rows[g] = rows, torch.where(kpos < self.end[:, None], kpos, -1)
        return self._rows[g]

    @property
    def read_rows(self) -> _PerGroup:
        return _PerGroup(lambda g: self._gather_index(g)[0])

    @property
    def key_pos(self) -> _PerGroup:
        return _PerGroup(lambda g: self._gather_index(g)[1])


@dataclass
class _Bucket:
    """One (Bg, nb) bucket: its input and output buffers and, once captured, its graph."""

    Bg: int
    nb: int
    flat: torch.Tensor                      # int64, see the module docstring
    x: torch.Tensor                         # (Bg, C)
    graph: object = None                    # torch.cuda.CUDAGraph (capture=True)
    logits: torch.Tensor | None = None      # (Bg, V) after a replay
    routed: list = field(default_factory=list)  # per MoE layer (Bg, k)
    replays: int = 0


class DecodeGraphs:
    """Runs decode steps of `model` over `cache` padded to buckets, from CUDA graphs when
    `capture` (see the module docstring). `run` returns None when a step does not qualify; the
    caller then runs the ordinary forward."""

    def __init__(self, model, cache: PagedKVCache, max_batch: int, capture: bool = True):
        if cache.scratch_page is None:
            raise ValueError("decode graphs need a KV cache with a scratch page (PagedKVCache(scratch_page=True))")
        self.model, self.cache, self.max_batch, self.capture = model, cache, max_batch, capture
        layout = cache.layout
        self.G, self.bs = layout.num_groups, layout.block_size
        self.device = cache.k[0].device
        self._buckets: dict[tuple[int, int], _Bucket] = {}
        self._pool = torch.cuda.graph_pool_handle() if capture else None
        self.failed: str | None = None   # why capturing failed (graphs are then off for good)
        self._moe = [(b.layer, b.top_k) for b in model.moe_blocks]

    @property
    def num_graphs(self) -> int:
        return sum(1 for b in self._buckets.values() if b.graph is not None)

    def clear(self) -> None:
        """Drops every bucket: call after the weights' tensors change (an expert swap), since a
        graph replays the addresses it was captured with."""
        self._buckets.clear()

    def stats(self) -> dict:
        return {"graphs": self.num_graphs, "buckets": sorted(self._buckets),
                "replays": sum(b.replays for b in self._buckets.values()), "failed": self.failed}

    def qualifies(self, lengths: list[int]) -> bool:
        """A step of one new token per sequence, at most max_batch of them, with no routing test
        hook set (a graph would replay the routing it was captured with)."""
        return (self.failed is None and 0 < len(lengths) <= self.max_batch and all(n == 1 for n in lengths)
                and all(b.force_expert is None and b.route_bias is None for b in self.model.moe_blocks))

    def run(self, x: torch.Tensor, starts: list[int], lengths: list[int], first: list[list[int]],
            pages: list[list[list[int]]], routed_ids: list | None = None) -> torch.Tensor | None:
        """One step: x (B, C) embeddings of the new tokens, lengths[i] of them for sequence i at
        position starts[i]; first[g][i] and pages[g][i] its kept blocks in group g (as a RankPlan's
        work carries them) -> (B, V) logits (a view of the bucket's buffer, valid until the next
        run), or None when the step does not qualify (the caller runs the ordinary forward)."""
        if not self.qualifies(lengths):
            return None
        B = len(starts)
        width = max(len(p) for group in pages for p in group)
        key = (batch_bucket(B, self.max_batch), blocks_bucket(width))
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._new_bucket(*key)
            if bucket is None:
                return None
        bucket.flat.copy_(torch.frombuffer(self._inputs(bucket, starts, first, pages), dtype=torch.long),
                          non_blocking=True)
        bucket.x[:B].copy_(x)
        if bucket.graph is not None:
            bucket.graph.replay()
        else:
            bucket.logits = self._forward(bucket)
        bucket.replays += 1
        if routed_ids is not None:
            routed_ids.extend(r[:B] for r in bucket.routed)
        stats = self.model.moe_blocks[0].dispatcher.stats if self._moe else None
        for layer, k in self._moe:   # what the dispatcher would have counted without padding
            stats.received_per_layer[layer] = B * k
        return bucket.logits[:B]

    def _inputs(self, bucket: _Bucket, starts, first, pages) -> array.array:
        """The step's flat int64 inputs, padded to the bucket (layout in the module docstring)."""
        Bg, nb, bs, G = bucket.Bg, bucket.nb, self.bs, self.G
        scratch, pad = self.cache.scratch_page, Bg - len(starts)
        flat = array.array("q", starts)
        flat.extend([0] * pad)                                        # positions: padding at 0
        flat.extend([s + 1 for s in starts])
        flat.extend([1] * pad)                                        # end: the padding's one key
        for g in range(G):
            flat.extend(first[g])
            flat.extend([0] * pad)
        for g in range(G):
            for s, f, p in zip(starts, first[g], pages[g]):
                flat.append(p[s // bs - f] * bs + s % bs)
            flat.extend([scratch * bs] * pad)
        for g in range(G):
            for p in pages[g]:
                flat.extend(p)
                flat.extend([scratch] * (nb - len(p)))
            flat.extend([scratch] * (nb * pad))
        return flat

    def _new_bucket(self, Bg: int, nb: int) -> _Bucket | None:
        G, dev = self.G, self.device
        n = Bg * (2 + 2 * G + G * nb)
        C = self.model.model.embed_tokens.weight.shape[1]
        dtype = self.model.model.embed_tokens.weight.dtype
        bucket = _Bucket(Bg, nb, torch.zeros(n, dtype=torch.long, device=dev), torch.zeros(Bg, C, dtype=dtype, device=dev))
        # Until the first step's inputs arrive, every row is padding (warm-up and capture write
        # only to the scratch page).
        bucket.flat.copy_(torch.frombuffer(self._inputs(bucket, [], [[]] * G, [[]] * G), dtype=torch.long))
        if self.capture:
            try:
                self._capture(bucket)
            except Exception as e:   # a step that syncs, an op that cannot be captured: run eagerly from now on
                self.failed = f"{type(e).__name__}: {e}"
                log.warning("CUDA graph capture failed, decode steps run without graphs: %s", self.failed)
                return None
        self._buckets[(Bg, nb)] = bucket
        return bucket

    def _forward(self, bucket: _Bucket) -> torch.Tensor:
        """The padded step over the bucket's buffers -> (Bg, V) logits; fills bucket.routed."""
        Bg, nb, G = bucket.Bg, bucket.nb, self.G
        parts = bucket.flat.split([Bg, Bg, G * Bg, G * Bg, G * Bg * nb])
        positions, end = parts[0], parts[1]
        view = _StaticView(self.bs, end, list(parts[2].view(G, Bg).unbind(0)), list(parts[3].view(G, Bg).unbind(0)),
                           list(parts[4].view(G, Bg, nb).unbind(0)))
        batch = ForwardBatch([0] * Bg, [1] * Bg, positions, kv=view)
        bucket.routed = []
        return self.model(batch=batch, cache=self.cache, inputs_embeds=bucket.x, routed_ids=bucket.routed)

    def _capture(self, bucket: _Bucket) -> None:
        """Warms the bucket's step up on a side stream (lazy library set-up must not land in the
        graph), then records it into a graph sharing one memory pool with the others (buckets
        never run at the same time, and a step's outputs are read before the next runs)."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward(bucket)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            logits = self._forward(bucket)
        bucket.graph, bucket.logits = graph, logits

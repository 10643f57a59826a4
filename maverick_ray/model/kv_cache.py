"""Paged KV cache with Llama 4's two kinds of attention layer.

Shape legend: P pages, Bs block size (tokens per block), KV kv heads, D head_dim, T new tokens,
B sequences, N gathered context (blocks x Bs), G layer groups, S layers per group.

A sequence's keys and values live in fixed-size blocks of Bs tokens. Layers are split into
groups of S layers each (KVLayout): the global (NoPE) layers form one group and the
chunked-attention (RoPE) layers the others, S layers at a time, as vLLM's hybrid allocator does.
Each group gives a sequence its own block table (logical block -> page). A page is one block for
the S layers of whichever group holds it: buffer i (i < S) serves the i-th layer of every group,
so pages are interchangeable between groups and one free list serves them all. Chunked layers
only attend within the current attention chunk, so their tables keep only the blocks of the
current chunk (the scheduler frees the rest, engine/kv_blocks.py); global tables keep every block.
Keys are stored after RoPE / QK norm, as attention consumes them.
"""

from __future__ import annotations

import array
import math
from dataclasses import dataclass

import torch

from ..config import TextConfig

DEFAULT_BLOCK_SIZE = 16


@dataclass(frozen=True)
class KVLayout:
    """Which layer uses which group and buffer; whether a group is chunked (local)."""

    block_size: int
    groups: tuple[tuple[int, ...], ...]   # the layers of each group
    local: tuple[bool, ...]               # per group: chunked attention (only the current chunk is kept)
    chunk: int | None                     # attention chunk of the local groups
    kv_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, cfg: TextConfig, block_size: int = DEFAULT_BLOCK_SIZE) -> "KVLayout":
        layers = range(cfg.num_hidden_layers)
        chunk = cfg.attention_chunk_size
        local = [layer for layer in layers if chunk and cfg.uses_rope(layer)]
        glob = [layer for layer in layers if layer not in local]
        size = len(glob) or len(local)
        groups = ([tuple(glob)] if glob else []) + [tuple(local[i:i + size]) for i in range(0, len(local), size)]
        return cls(block_size, tuple(groups), tuple(bool(g[0] in local) for g in groups), chunk or None,
                   cfg.num_key_value_heads, cfg.head_dim)

    @property
    def layers_per_group(self) -> int:
        return max(len(g) for g in self.groups)

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    def group_of(self, layer: int) -> int:
        return next(g for g, members in enumerate(self.groups) if layer in members)

    def buffer_of(self, layer: int) -> int:
        return self.groups[self.group_of(layer)].index(layer)

    def page_bytes(self, dtype: torch.dtype) -> int:
        """Bytes of one page: keys and values of one block for the S layers of a group."""
        itemsize = torch.empty(0, dtype=dtype).element_size()
        return 2 * self.layers_per_group * self.block_size * self.kv_heads * self.head_dim * itemsize

    def first_kept_block(self, group: int, length: int) -> int:
        """The first logical block a sequence of `length` cached tokens still needs in `group`:
        0 for global groups; for local ones, the block holding the start of the chunk that
        position `length` (the next token) falls in."""
        if not self.local[group]:
            return 0
        return (length // self.chunk) * self.chunk // self.block_size

    def blocks_for(self, group: int, start: int, end: int) -> range:
        """Logical blocks a step needs that runs positions start..end-1 (its earliest query,
        at `start`, sees the chunk holding `start` on local layers)."""
        return range(self.first_kept_block(group, start), math.ceil(end / self.block_size))

    def pages_for_length(self, length: int, step_tokens: int = 1) -> int:
        """Pages one sequence of `length` tokens holds at most (all groups), when a step runs at
        most `step_tokens` of its tokens (a prefill chunk: its first query still sees the chunk it
        starts in, so chunked groups then hold that chunk's blocks up to the step's last token)."""
        total = 0
        for g in range(self.num_groups):
            if self.local[g]:
                # from the start of the chunk the step begins in to its last token, plus the block
                # a chunk boundary may share with the one before
                span = math.ceil((self.chunk - 1 + step_tokens) / self.block_size) + 1
                total += min(math.ceil(length / self.block_size), span)
            else:
                total += math.ceil(length / self.block_size)
        return total


class PagedKVCache:
    def __init__(self, layout: KVLayout, num_pages: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", scratch_page: bool = False):
        """scratch_page: one more page past the `num_pages` the block manager hands out, page
        `scratch_page` (= num_pages), where padded rows of a fixed-shape step write and read
        (model/decode_graphs.py)."""
        rows = (num_pages + int(scratch_page)) * layout.block_size
        shape = (rows, layout.kv_heads, layout.head_dim)  # pages x Bs rows, flat
        self.layout, self.num_pages = layout, num_pages
        self.scratch_page = num_pages if scratch_page else None
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layout.layers_per_group)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layout.layers_per_group)]
        self._group = [layout.group_of(layer) for layer in range(sum(len(g) for g in layout.groups))]
        self._buffer = [layout.buffer_of(layer) for layer in range(len(self._group))]

    @classmethod
    def for_sequences(cls, cfg: TextConfig, num_seqs: int, max_len: int, dtype: torch.dtype = torch.float32,
                      device: torch.device | str = "cpu", block_size: int = DEFAULT_BLOCK_SIZE) -> "PagedKVCache":
        """A cache for `num_seqs` sequences of up to `max_len` tokens each, sequence i of every
        batch in pages i * ceil(max_len / Bs) + (logical block): single-process use without a
        block manager (references, tests). The model makes that view when a batch has none."""
        layout = KVLayout.from_config(cfg, block_size)
        per_group = math.ceil(max_len / block_size)
        cache = cls(layout, num_seqs * per_group * layout.num_groups, dtype, device)
        cache.pages_per_group = per_group
        return cache

    pages_per_group: int | None = None  # set by for_sequences

    def contiguous_view(self, starts: list[int], lengths: list[int], device, slots: list[int] | None = None) -> "KVView":
        """The for_sequences layout's view of a batch: the sequence in slot i (default: the
        i-th of the batch), group g, in pages from (i * G + g) * ceil(max_len / Bs)."""
        per, G = self.pages_per_group, self.layout.num_groups
        slots = list(range(len(starts))) if slots is None else slots
        if per is None or (max(slots, default=0) + 1) * per * G > self.num_pages:
            raise ValueError("a batch without a KV view needs a cache made by PagedKVCache.for_sequences, "
                             "with room for every sequence of the batch")
        if any(s + n > per * self.layout.block_size for s, n in zip(starts, lengths)):
            raise IndexError(f"position {max(s + n for s, n in zip(starts, lengths)) - 1} is beyond the KV cache "
                             f"length {per * self.layout.block_size}")
        base = [[(i * G + g) * per for i in slots] for g in range(G)]
        return KVView.contiguous(self.layout, starts, lengths, base, device)

    attention_kernel = None  # native/paged_attention.py PagedAttentionKernel (fp32 CPU), attached by the rank

    def pools(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's key and value rows, (P * Bs, KV, D) each."""
        b = self._buffer[layer]
        return self.k[b], self.v[b]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def group_of(self, layer: int) -> int:
        return self._group[layer]

    def write(self, layer: int, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Stores k, v (T, KV, D) at flat rows (T,) = page * Bs + offset (KVView.write_rows)."""
        b = self._buffer[layer]
        self.k[b].index_copy_(0, rows, k)
        self.v[b].index_copy_(0, rows, v)

    def gather(self, layer: int, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v at flat rows (B, N) -> (B, N, KV, D) each."""
        b = self._buffer[layer]
        flat = rows.reshape(-1)
        shape = (*rows.shape, self.k[b].shape[1], self.k[b].shape[2])
        return self.k[b].index_select(0, flat).view(shape), self.v[b].index_select(0, flat).view(shape)


class KVView:
    """Where one forward's tokens go in the paged cache and where each sequence reads from,
    per layer group; built once per forward from the sequences' block tables and shared by
    every layer of a group.

    tables[g][i]: sequence i's pages in group g for its logical blocks first[g][i] onwards.
    Per group: table (B, nb) those pages padded with page 0, first (B,); end (B,) = start +
    length (tokens cached once the forward has written its own). read_rows / key_pos (the
    torch path's gather) are made on first use.
    """

    def __init__(self, layout: KVLayout, starts: list[int], lengths: list[int],
                 first: list[list[int]], tables: list[list[list[int]]], device: torch.device | str = "cpu"):
        # Every index of the step in one int64 array and one tensor, split into views: a decode
        # step's host time is mostly per-op dispatch (issue 21), and a tensor per list costs
        # ~7 us (30 us for 4 groups' first blocks alone, against 10 us for the whole view).
        bs, B, G = layout.block_size, len(starts), layout.num_groups
        self.block_size = bs
        writes = [_write_rows(tables[g], first[g], starts, lengths, bs) for g in range(G)]
        T = len(writes[0]) if G else 0
        flat = array.array("q", [s + n for s, n in zip(starts, lengths)])
        for g in range(G):
            flat.extend(first[g])
        for g in range(G):
            flat.extend(writes[g])
        widths = [_append_padded(flat, tables[g]) for g in range(G)]
        parts = torch.frombuffer(flat, dtype=torch.long).split([B, G * B, G * T] + [B * w for w in widths]) \
            if len(flat) else [torch.zeros(0, dtype=torch.long)] * (3 + G)
        self.end = parts[0]                                                              # (B,)
        self.first = list(parts[1].view(G, B).unbind(0)) if G else []  # per group: (B,) first logical block
        write = parts[2] if torch.device(device).type == "cpu" else parts[2].to(device)
        self.write_rows = list(write.view(G, T).unbind(0)) if G else []  # per group: (T,) flat rows of the new tokens
        self.table = [parts[3 + g].view(B, w) for g, w in enumerate(widths)]  # per group: (B, nb) pages, padded with 0
        self._block_counts = [[len(t) for t in tables[g]] for g in range(G)]
        self._nblocks: list[torch.Tensor] | None = None   # made from _block_counts on first use
        self.device = device
        self._rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def nblocks(self) -> list[torch.Tensor]:
        """Per group: (B,) real blocks of each row of table (the torch gather path's)."""
        if self._nblocks is None:
            self._nblocks = [torch.tensor(c, dtype=torch.long) for c in self._block_counts]
        return self._nblocks

    def _gather_index(self, g: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N) flat rows of every gathered key of group g, and each key's position (-1: none)."""
        if g not in self._rows:
            bs, table, f = self.block_size, self.table[g], self.first[g]
            B, nb = table.shape
            rows = (table[:, :, None] * bs + torch.arange(bs)).view(B, nb * bs)
            kpos = f[:, None] * bs + torch.arange(nb * bs)
            real = torch.arange(nb)[None, :] < self.nblocks[g][:, None]
            valid = real.repeat_interleave(bs, dim=1) & (kpos < self.end[:, None])
            self._rows[g] = rows.to(self.device), torch.where(valid, kpos, -1).to(self.device)
        return self._rows[g]

    def rows_between(self, g: int, i: int, lo: int, hi: int) -> torch.Tensor:
        """(hi - lo,) flat cache rows of sequence i's keys at positions lo..hi-1 in group g (kept
        blocks only: lo must not be before the sequence's first kept block)."""
        bs, f = self.block_size, int(self.first[g][i])
        blocks = torch.arange(lo // bs, -(-hi // bs)) - f                       # indexes into its table row
        pages = self.table[g][i][blocks]
        rows = (pages[:, None] * bs + torch.arange(bs)).reshape(-1)
        return rows[lo % bs:lo % bs + hi - lo].to(self.device)

    @property
    def read_rows(self) -> "_PerGroup":
        return _PerGroup(lambda g: self._gather_index(g)[0])

    @property
    def key_pos(self) -> "_PerGroup":
        return _PerGroup(lambda g: self._gather_index(g)[1])

    def subset(self, seqs: list[int], rows: torch.Tensor) -> "KVView":
        """The view of sequences `seqs` (indices) whose new tokens are `rows` of this one's."""
        out = KVView.__new__(KVView)
        idx = torch.tensor(seqs, dtype=torch.long)
        out.block_size, out.device, out._rows = self.block_size, self.device, {}
        out.end = self.end[idx]
        out.table = [t[idx] for t in self.table]
        out._nblocks = [n[idx] for n in self.nblocks]
        out.first = [f[idx] for f in self.first]
        out.write_rows = [w[rows] for w in self.write_rows]
        return out

    @classmethod
    def contiguous(cls, layout: KVLayout, starts: list[int], lengths: list[int], base_page: list[list[int]],
                   device: torch.device | str = "cpu") -> "KVView":
        """Sequence i owns pages base_page[g][i] + (its logical block index) in group g (a simple
        layout for single-process use: tests, references)."""
        bs = layout.block_size
        first = [[layout.first_kept_block(g, s) for s in starts] for g in range(layout.num_groups)]
        tables = [[list(range(base_page[g][i] + f, base_page[g][i] + math.ceil((s + n) / bs)))
                   for i, (f, s, n) in enumerate(zip(first[g], starts, lengths))] for g in range(layout.num_groups)]
        return cls(layout, starts, lengths, first, tables, device)


def _append_padded(flat: array.array, rows: list[list[int]]) -> int:
    """Appends the rows padded with page 0 to a common width to flat; returns that width. (An
    int64 array: 16 rows of 1025 pages in 0.98 ms, against 1.45 ms for torch.tensor of the
    nested lists.)"""
    nb = max((len(t) for t in rows), default=0)
    for t in rows:
        flat.extend(t)
        if len(t) < nb:
            flat.extend([0] * (nb - len(t)))
    return nb


def _write_rows(tables: list[list[int]], first: list[int], starts: list[int], lengths: list[int],
                bs: int) -> list[int]:
    """Flat cache rows (page * bs + offset) of every new token, sequence after sequence, walked
    block by block: positions start..start+n-1 of sequence i sit in logical blocks from
    start // bs on, and tables[i][block - first[i]] holds each one's page."""
    out: list[int] = []
    for table, f, start, n in zip(tables, first, starts, lengths):
        p, end = start, start + n
        while p < end:
            block = p // bs
            stop = min(end, (block + 1) * bs)
            base = (table[block - f] - block) * bs  # row of position p = base + p
            out.extend(range(base + p, base + stop))
            p = stop
    return out


class _PerGroup:
    """Indexable by layer group, computing each entry on first use."""

    def __init__(self, get):
        self._get = get

    def __getitem__(self, g: int) -> torch.Tensor:
        return self._get(g)

"""Describes which tokens of which sequences one forward pass processes.

Shape legend: B sequences, T = sum(lengths) new tokens, flattened in sequence order.
A sequence with `start` tokens already in its KV cache contributes `length` new tokens at
positions start .. start+length-1. `kv` says where those tokens go in the paged cache and
where each sequence's keys are (model/kv_cache.py KVView).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch


@dataclass
class ForwardBatch:
    starts: list[int]         # (B,) tokens already cached for each sequence
    lengths: list[int]        # (B,) new tokens of each sequence
    positions: torch.Tensor   # (T,) absolute position of every new token
    kv: Any = None            # KVView: cache rows per layer group (None: no cache, or a contiguous one made on use)
    slots: list[int] | None = None  # (B,) without a KVView: which region of a for_sequences cache each sequence owns
    _memo: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def build(cls, starts: list[int], lengths: list[int], device: torch.device | str = "cpu",
              kv: Any = None, slots: list[int] | None = None) -> "ForwardBatch":
        if len(starts) != len(lengths) or (slots is not None and len(slots) != len(starts)):
            raise ValueError("starts, lengths (and slots) must have one entry per sequence")
        if any(n < 0 for n in lengths) or any(s < 0 for s in starts):
            raise ValueError("starts and lengths must be non-negative")
        pos = [p for s, n in zip(starts, lengths) for p in range(s, s + n)]
        return cls(list(starts), list(lengths), torch.tensor(pos, dtype=torch.long, device=device), kv,
                   None if slots is None else list(slots))

    @classmethod
    def single(cls, length: int, start: int = 0, slot: int = 0,
               device: torch.device | str = "cpu") -> "ForwardBatch":
        return cls.build([start], [length], device, slots=[slot])

    def subset(self, seqs: list[int]) -> tuple["ForwardBatch", torch.Tensor]:
        """Sequences `seqs` (indices, in order) as a batch of their own, and their rows among
        this batch's T new tokens."""
        firsts, total = [], 0
        for n in self.lengths:
            firsts.append(total)
            total += n
        rows = torch.tensor([r for i in seqs for r in range(firsts[i], firsts[i] + self.lengths[i])],
                            dtype=torch.long, device=self.positions.device)
        kv = self.kv.subset(seqs, rows) if self.kv is not None else None
        slots = None if self.slots is None else [self.slots[i] for i in seqs]
        return ForwardBatch([self.starts[i] for i in seqs], [self.lengths[i] for i in seqs],
                            self.positions[rows], kv, slots), rows

    def memo(self, key, make: Callable[[], Any]) -> Any:
        """A value derived from this batch alone, made on first use and shared by every layer of
        one forward (e.g. the NoPE layers' per-position temperature scale)."""
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    @property
    def num_tokens(self) -> int:
        return sum(self.lengths)

    @property
    def is_decode(self) -> bool:
        """Every sequence adds exactly one token (the batched decode fast path applies)."""
        return len(self.lengths) > 0 and all(n == 1 for n in self.lengths)

    def last_token_index(self) -> torch.Tensor:
        """(B,) index into the T rows of each sequence's last new token (sequences with length > 0)."""
        ends, total = [], 0
        for n in self.lengths:
            total += n
            if n:
                ends.append(total - 1)
        return torch.tensor(ends, dtype=torch.long, device=self.positions.device)

"""Slot-based KV cache: each running sequence owns one slot of max_len positions.

Shape legend: L layers, S slots, M max_len, KV kv heads, D head_dim, T new tokens.
Keys are stored after RoPE / QK norm, as attention consumes them.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int, num_slots: int, max_len: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (num_slots, max_len, kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]  # L x (S, M, KV, D)
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_slots = num_slots
        self.max_len = max_len

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def write(self, layer: int, token_slots: torch.Tensor, positions: torch.Tensor,
              k: torch.Tensor, v: torch.Tensor) -> None:
        """Stores k, v (T, KV, D) at (slot, position) of each token (positions checked by check_fits)."""
        self.k[layer].index_put_((token_slots, positions), k)
        self.v[layer].index_put_((token_slots, positions), v)

    def check_fits(self, starts: list[int], lengths: list[int]) -> None:
        """Raises IndexError when a sequence's new tokens would run past max_len. Checked once per
        forward from host-side lengths (a check on the position tensor would sync the device per layer)."""
        end = max((s + n for s, n in zip(starts, lengths) if n), default=0)
        if end > self.max_len:
            raise IndexError(f"position {end - 1} is beyond the KV cache length {self.max_len}")

    def read(self, layer: int, slots: list[int] | torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns k, v of the given slots' first `length` positions: (B, length, KV, D) each.

        Consecutive ascending slots come back as views of the cache (no copy); others are
        gathered with index_select on the first `length` positions only."""
        k, v = self.k[layer][:, :length], self.v[layer][:, :length]
        first = int(slots[0]) if len(slots) else 0
        if len(slots) and all(int(s) == first + i for i, s in enumerate(slots)):
            return k[first:first + len(slots)], v[first:first + len(slots)]
        idx = torch.as_tensor(slots, dtype=torch.long, device=k.device)
        return k.index_select(0, idx), v.index_select(0, idx)

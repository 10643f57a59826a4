"""Which expert-parallel rank owns which routed expert.

The loader (which experts a rank reads from disk) and the dispatcher (where a routed row
goes) both read this object; nothing else computes `expert // experts_per_rank`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ExpertPlacement:
    owner: tuple[int, ...]   # owner[e] = rank holding expert e
    world_size: int

    def __post_init__(self):
        if self.world_size <= 0:
            raise ValueError(f"world_size must be positive, got {self.world_size}")
        bad = [e for e, r in enumerate(self.owner) if not 0 <= r < self.world_size]
        if bad:
            raise ValueError(f"experts {bad} are placed on ranks outside [0, {self.world_size})")

    @classmethod
    def contiguous(cls, num_experts: int, world_size: int) -> "ExpertPlacement":
        """Rank r owns a contiguous block; blocks differ in size by at most one expert."""
        if world_size > num_experts:
            raise ValueError(f"cannot spread {num_experts} experts over {world_size} ranks: "
                             "every rank must own at least one expert")
        base, extra = divmod(num_experts, world_size)
        owner = []
        for r in range(world_size):
            owner += [r] * (base + (r < extra))
        return cls(tuple(owner), world_size)

    @classmethod
    def from_map(cls, owner: list[int], world_size: int) -> "ExpertPlacement":
        return cls(tuple(int(r) for r in owner), world_size)

    @property
    def num_experts(self) -> int:
        return len(self.owner)

    def experts_of(self, rank: int) -> list[int]:
        return [e for e, r in enumerate(self.owner) if r == rank]

    def owner_tensor(self, device=None) -> torch.Tensor:
        """(E,) owning rank of each expert."""
        return torch.tensor(self.owner, dtype=torch.long, device=device)

    def local_index_tensor(self, device=None) -> torch.Tensor:
        """(E,) index of each expert inside its owner's sorted list of experts."""
        seen = [0] * self.world_size
        idx = []
        for r in self.owner:
            idx.append(seen[r])
            seen[r] += 1
        return torch.tensor(idx, dtype=torch.long, device=device)

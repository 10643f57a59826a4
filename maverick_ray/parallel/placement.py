"""Which expert-parallel rank holds which routed expert: logical experts on physical slots.

Each rank holds a list of physical slots; slot j of rank r holds one logical expert
(`slots[r][j]`). An expert held in several slots (on several ranks) has replicas: exact copies
of its weights, so the dispatcher may send each of its rows to any one of them
(parallel/all_to_all.py spreads a hot expert's rows over its replicas). Without redundant
experts every expert has one slot and this is the plain expert -> rank map.

A slot's global id (what the dispatcher sends with each row) numbers the slots rank after rank:
rank r's slot j is `offsets[r] + j`.

The loader (which experts a rank reads from disk: `experts_of`), the model (one local expert
per slot) and the dispatcher (where a routed row goes) all read this object; nothing else
computes a rank from an expert id.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class ExpertPlacement:
    """slots[r][j]: the logical expert in rank r's local slot j. `num_experts`: how many logical
    experts the model routes to; each must have at least one slot."""

    slots: tuple[tuple[int, ...], ...]
    num_experts: int

    def __post_init__(self):
        if not self.slots:
            raise ValueError("an expert placement needs at least one rank")
        bad = sorted({e for rank in self.slots for e in rank if not 0 <= e < self.num_experts})
        if bad:
            raise ValueError(f"slots name experts {bad} outside [0, {self.num_experts})")
        held = {e for rank in self.slots for e in rank}
        missing = [e for e in range(self.num_experts) if e not in held]
        if missing:
            raise ValueError(f"experts {missing} have no slot on any rank: tokens routed to them could not run")

    # ---- constructors ----------------------------------------------------------------------
    @classmethod
    def contiguous(cls, num_experts: int, world_size: int, redundant: int = 0) -> "ExpertPlacement":
        """Rank r holds a contiguous block. Without redundant experts the blocks differ in size by
        at most one expert. With `redundant` extra slots, physical slot i holds expert
        i % num_experts (experts 0..redundant-1 get a second copy), and every rank holds
        (num_experts + redundant) / world_size slots, which must divide evenly."""
        if world_size <= 0:
            raise ValueError(f"world_size must be positive, got {world_size}")
        if redundant < 0:
            raise ValueError(f"redundant experts must be >= 0, got {redundant}")
        if world_size > num_experts:
            raise ValueError(f"cannot spread {num_experts} experts over {world_size} ranks: "
                             "every rank must own at least one expert")
        if redundant:
            per_rank = slots_per_rank(num_experts, world_size, redundant)
            phys = [i % num_experts for i in range(num_experts + redundant)]
            return cls(tuple(tuple(phys[r * per_rank:(r + 1) * per_rank]) for r in range(world_size)), num_experts)
        base, extra = divmod(num_experts, world_size)
        out, start = [], 0
        for r in range(world_size):
            n = base + (r < extra)
            out.append(tuple(range(start, start + n)))
            start += n
        return cls(tuple(out), num_experts)

    @classmethod
    def from_map(cls, owner: Sequence[int], world_size: int) -> "ExpertPlacement":
        """owner[e] = the one rank holding expert e (no replicas); each rank's experts in id order."""
        owner = [int(r) for r in owner]
        bad = [e for e, r in enumerate(owner) if not 0 <= r < world_size]
        if bad:
            raise ValueError(f"experts {bad} are placed on ranks outside [0, {world_size})")
        return cls(tuple(tuple(e for e, r in enumerate(owner) if r == rank) for rank in range(world_size)),
                   len(owner))

    @classmethod
    def from_slots(cls, slots: Sequence[Sequence[int]], num_experts: int) -> "ExpertPlacement":
        return cls(tuple(tuple(int(e) for e in rank) for rank in slots), int(num_experts))

    # ---- queries ---------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return len(self.slots)

    @property
    def num_slots(self) -> int:
        return sum(len(rank) for rank in self.slots)

    @property
    def offsets(self) -> list[int]:
        """Global id of each rank's first slot."""
        out, n = [], 0
        for rank in self.slots:
            out.append(n)
            n += len(rank)
        return out

    def experts_of(self, rank: int) -> list[int]:
        """The logical expert of each of `rank`'s slots, in slot order (an expert may repeat)."""
        return list(self.slots[rank])

    def replica_counts(self) -> list[int]:
        """(E,) slots holding each expert."""
        counts = [0] * self.num_experts
        for rank in self.slots:
            for e in rank:
                counts[e] += 1
        return counts

    def replica_slots(self) -> list[list[int]]:
        """Per expert, the global ids of its slots, in rank then slot order."""
        out: list[list[int]] = [[] for _ in range(self.num_experts)]
        g = 0
        for rank in self.slots:
            for e in rank:
                out[e].append(g)
                g += 1
        return out

    def slot_ranks(self) -> list[int]:
        """(S,) rank holding each global slot."""
        return [r for r, rank in enumerate(self.slots) for _ in rank]

    def slot_locals(self) -> list[int]:
        """(S,) index of each global slot inside its rank."""
        return [j for rank in self.slots for j in range(len(rank))]

    def rank_loads(self, load: Sequence[float]) -> list[float]:
        """Tokens each rank would run for a per-expert `load` (E,), each expert's tokens split
        evenly over its replicas (what the dispatcher's round robin does)."""
        counts = self.replica_counts()
        return [sum(load[e] / counts[e] for e in rank) for rank in self.slots]

    def balancedness(self, load: Sequence[float]) -> float:
        """Mean over max of rank_loads (1.0: even; 1/EP: one rank runs everything)."""
        ranks = self.rank_loads(load)
        top = max(ranks)
        return sum(ranks) / len(ranks) / top if top else 1.0

    def to_json(self) -> dict:
        return {"num_experts": self.num_experts, "slots": [list(rank) for rank in self.slots]}


def slots_per_rank(num_experts: int, world_size: int, redundant: int) -> int:
    """(num_experts + redundant) / world_size; a ValueError naming the numbers when it is not whole."""
    total = num_experts + redundant
    if total % world_size:
        raise ValueError(f"{num_experts} experts + {redundant} redundant = {total} slots cannot be split evenly "
                         f"over {world_size} ranks: choose redundant_experts so that the sum is a multiple of "
                         f"{world_size}")
    return total // world_size

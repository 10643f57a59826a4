"""Expert-parallel load balancing policy (EPLB): where the physical slots go, from a measured load.

The policy of DeepSeek's EPLB, as vLLM and SGLang run it, plus minimal movement:

1. `replicate`: every expert gets one slot; each extra (redundant) slot then goes, one at a
   time, to the expert with the most tokens per replica (ties: the lower expert id), up to one
   copy per rank.
2. `pack`: replicas, heaviest first (load / replicas), each onto the rank with the least load
   so far that still has a free slot and holds no copy of that expert yet (ties: the lower
   rank). Every rank ends with the same number of slots.
3. Hierarchical (`place` with `rank_node` naming several nodes): logical experts are first
   packed onto nodes (E / nodes each, balanced by load), then each node replicates its own
   experts into its slots and packs them onto its ranks: replicas stay within a node and
   inter-node traffic is balanced. Falls back to the flat policy when nodes hold unequal
   numbers of ranks or the experts do not divide evenly over the nodes.
4. Minimal movement (`place` with `previous`): the packed ranks (and nodes) are
   interchangeable, so each is matched to the rank (node) of the previous placement that
   already holds most of its experts; on each rank, an expert it already held keeps its slot,
   and only the freed slots take new experts.

`RebalanceTrigger` says when to rebalance: the measured imbalance must pass a threshold, and
no more often than every `interval_steps`. The load comes from the routing window
(parallel/expert_load.py).

Shape legend: E logical experts, S physical slots (all ranks), W ranks, N nodes,
load (E,) tokens routed to each expert.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Sequence

from .placement import ExpertPlacement


def replicate(load: Sequence[float], num_slots: int, max_replicas: int | None = None) -> list[int]:
    """(E,) load -> (E,) replica count per expert, summing to num_slots (>= E). An expert gets at
    most max_replicas copies (the number of ranks: a second copy on one rank spreads nothing)."""
    E = len(load)
    cap = num_slots if max_replicas is None else max_replicas
    if num_slots < E or E * cap < num_slots:
        raise ValueError(f"{num_slots} slots cannot hold {E} experts with 1 to {cap} copies each")
    counts = [1] * E
    heap = [(-float(load[e]), e) for e in range(E)]   # (-load per replica, expert)
    heapq.heapify(heap)
    for _ in range(num_slots - E):
        _, e = heapq.heappop(heap)
        counts[e] += 1
        if counts[e] < cap:
            heapq.heappush(heap, (-float(load[e]) / counts[e], e))
    return counts


def pack(load: Sequence[float], counts: Sequence[int], num_bins: int) -> list[list[int]]:
    """Replicas onto `num_bins` ranks of sum(counts) / num_bins slots each, balanced by load:
    the heaviest replica first (load[e] / counts[e]; ties: the lower expert id), each onto the
    least-loaded rank with a free slot that holds no copy of it yet (ties: the lower rank; a
    rank that holds a copy only when no other has room). Returns each rank's experts."""
    total = sum(counts)
    if total % num_bins:
        raise ValueError(f"{total} replicas cannot be split evenly over {num_bins} ranks")
    capacity = total // num_bins
    items = sorted(((float(load[e]) / counts[e], e) for e in range(len(counts)) for _ in range(counts[e])),
                   key=lambda item: (-item[0], item[1]))
    bins: list[list[int]] = [[] for _ in range(num_bins)]
    weight = [0.0] * num_bins
    for w, e in items:
        free = [b for b in range(num_bins) if len(bins[b]) < capacity]
        fresh = [b for b in free if e not in bins[b]] or free
        b = min(fresh, key=lambda b: (weight[b], b))
        bins[b].append(e)
        weight[b] += w
    return bins


def _match(groups: list[list[int]], previous: list[list[int]]) -> list[int]:
    """A target index for each group: greedily the pairs sharing the most experts first (ties:
    lower group, then lower target), so groups that mostly equal a previous one stay there."""
    def overlap(a: list[int], b: list[int]) -> int:
        rest = list(b)
        n = 0
        for e in a:
            if e in rest:
                rest.remove(e)
                n += 1
        return n

    pairs = sorted(((overlap(g, p), i, j) for i, g in enumerate(groups) for j, p in enumerate(previous)),
                   key=lambda t: (-t[0], t[1], t[2]))
    target: dict[int, int] = {}
    taken: set[int] = set()
    for _, i, j in pairs:
        if i not in target and j not in taken:
            target[i] = j
            taken.add(j)
    return [target[i] for i in range(len(groups))]


def _slot_order(experts: list[int], old: Sequence[int] | None) -> tuple[int, ...]:
    """A rank's new experts in slot order: an expert it held keeps its old slot; new ones fill
    the freed slots in ascending order (expert id order when there is no old placement)."""
    if old is None or len(old) != len(experts):
        return tuple(sorted(experts))
    rest = sorted(experts)
    slots: list[int | None] = [None] * len(old)
    for j, e in enumerate(old):
        if e in rest:
            slots[j] = e
            rest.remove(e)
    fill = iter(rest)
    return tuple(e if e is not None else next(fill) for e in slots)


def _nodes(rank_node: Sequence | None, num_ranks: int, num_experts: int) -> list[list[int]] | None:
    """The ranks of each node (nodes in order of their first rank) when hierarchical placement
    applies: several nodes, as many ranks on each, and the experts divide evenly over them."""
    if rank_node is None:
        return None
    if len(rank_node) != num_ranks:
        raise ValueError(f"rank_node names {len(rank_node)} ranks, the placement has {num_ranks}")
    groups: dict = {}
    for r, n in enumerate(rank_node):
        groups.setdefault(n, []).append(r)
    nodes = list(groups.values())
    if len(nodes) < 2 or len({len(g) for g in nodes}) != 1 or num_experts % len(nodes):
        return None
    return nodes


def place(load: Sequence[float], num_ranks: int, slots_per_rank: int, rank_node: Sequence | None = None,
          previous: ExpertPlacement | None = None) -> ExpertPlacement:
    """The balanced placement of len(load) experts on num_ranks ranks of slots_per_rank slots.
    rank_node: the node of each rank (any hashable; hierarchical when several). previous: the
    placement now served (minimal movement, module docstring)."""
    E = len(load)
    if E == 0:
        raise ValueError("no experts to place")
    if any(not x >= 0 for x in load):
        raise ValueError("expert load must be non-negative numbers")
    if num_ranks * slots_per_rank < E:
        raise ValueError(f"{num_ranks} ranks of {slots_per_rank} slots cannot hold {E} experts")
    if previous is not None and (previous.world_size != num_ranks or previous.num_experts != E):
        raise ValueError(f"the previous placement has {previous.world_size} ranks and {previous.num_experts} "
                         f"experts, not {num_ranks} and {E}")
    old = [list(s) for s in previous.slots] if previous is not None else None
    nodes = _nodes(rank_node, num_ranks, E)
    ranks: list[list[int]] = [[] for _ in range(num_ranks)]
    if nodes is None:
        bins = pack(load, replicate(load, num_ranks * slots_per_rank, num_ranks), num_ranks)
        targets = _match(bins, old) if old else list(range(num_ranks))
        for b, r in zip(bins, targets):
            ranks[r] = b
    else:
        N, per_node = len(nodes), len(nodes[0])
        node_bins = pack(load, [1] * E, N)   # logical experts, E / N per node
        if old:
            node_targets = _match(node_bins, [[e for r in g for e in old[r]] for g in nodes])
        else:
            node_targets = list(range(N))
        for experts, n in zip(node_bins, node_targets):
            sub = [load[e] for e in experts]                      # the node's own experts, in order
            counts = replicate(sub, per_node * slots_per_rank, per_node)
            bins = [[experts[i] for i in b] for b in pack(sub, counts, per_node)]
            members = nodes[n]
            targets = _match(bins, [old[r] for r in members]) if old else list(range(per_node))
            for b, t in zip(bins, targets):
                ranks[members[t]] = b
    return ExpertPlacement(tuple(_slot_order(ranks[r], old[r] if old else None) for r in range(num_ranks)), E)


def rebalance(load: Sequence[float], current: ExpertPlacement,
              rank_node: Sequence | None = None) -> ExpertPlacement:
    """The placement to serve next for this load: `place` over the current placement's slots with
    minimal movement, or `current` itself when that is at least as balanced."""
    sizes = {len(s) for s in current.slots}
    if len(sizes) != 1:
        raise ValueError(f"ranks hold different numbers of slots ({sorted(sizes)}): rebalancing needs equal ones")
    new = place(load, current.world_size, sizes.pop(), rank_node, previous=current)
    return new if max(new.rank_loads(load)) < max(current.rank_loads(load)) else current


def imbalance(rank_load: Sequence[Sequence[float]]) -> float:
    """rank_load[layer][rank] (RoutingWindow.summary()["rank_load"]) -> what lockstep costs over an
    even split: sum over layers of the busiest rank's tokens / sum of the mean rank's (1.0: even)."""
    top = sum(max(layer) for layer in rank_load if layer)
    mean = sum(sum(layer) / len(layer) for layer in rank_load if layer)
    return top / mean if mean else 1.0


@dataclass
class RebalanceTrigger:
    """Whether to rebalance now: the measured imbalance (max / mean tokens per rank, `imbalance`)
    is at least min_imbalance, and at least interval_steps steps passed since the last time
    (since step 0 for the first: the window must fill first)."""

    min_imbalance: float = 1.15
    interval_steps: int = 1000
    last_step: int = 0

    def __post_init__(self):
        if not self.min_imbalance >= 1.0:
            raise ValueError(f"min_imbalance is max / mean tokens per rank, at least 1.0; got {self.min_imbalance}")
        if not (isinstance(self.interval_steps, int) and self.interval_steps > 0):
            raise ValueError(f"interval_steps must be a positive integer, got {self.interval_steps!r}")

    def due(self, step: int, measured: float) -> bool:
        """True (and remembers `step`) when a rebalance should run at `step`."""
        if step - self.last_step < self.interval_steps:
            return False
        if measured < self.min_imbalance:
            return False
        self.last_step = step
        return True

"""The placement an expert-parallel engine starts with, from its ParallelConfig knobs.

In order: `expert_owner` (an explicit expert -> rank map, no replicas); `init_expert_location`
(a recorded expert-load file, parallel/expert_load.py: the EPLB policy's balanced placement
for that load, with `redundant_experts` replicas, hierarchical when the ranks span several
nodes); `redundant_experts` alone (contiguous blocks, experts 0..N-1 copied once more);
else contiguous blocks.
"""

from __future__ import annotations

from typing import Sequence

from ..config import ConfigError, ParallelConfig
from .placement import ExpertPlacement, slots_per_rank


def initial_placement(parallel: ParallelConfig, num_experts: int,
                      rank_node: Sequence | None = None) -> ExpertPlacement:
    """rank_node: the node each rank was placed on (bundle_nodes), for the hierarchical policy;
    None when unknown. Raises ConfigError for knobs that do not fit the model, LoadFileError
    (a ValueError) for an unusable load file."""
    p, ep = parallel, parallel.ep_size
    if p.expert_owner:
        if p.redundant_experts or p.init_expert_location:
            raise ConfigError("expert_owner: an explicit expert -> rank map cannot be combined with "
                              "redundant_experts or init_expert_location (they place the experts themselves)")
        placement = ExpertPlacement.from_map(list(p.expert_owner), ep)
        if placement.num_experts != num_experts:
            raise ValueError(f"expert_owner names {placement.num_experts} experts; the model has {num_experts}")
        return placement
    if not (p.redundant_experts or p.init_expert_location):
        return ExpertPlacement.contiguous(num_experts, ep)
    try:
        per_rank = slots_per_rank(num_experts, ep, p.redundant_experts)
    except ValueError as e:
        raise ConfigError(f"redundant_experts: {e}") from None
    if not p.init_expert_location:
        return ExpertPlacement.contiguous(num_experts, ep, p.redundant_experts)
    from .eplb import place
    from .expert_load import ExpertLoad, LoadFileError

    load = ExpertLoad.load(p.init_expert_location)
    if load.num_experts != num_experts:
        raise LoadFileError(f"expert-load file {p.init_expert_location}: records {load.num_experts} experts; "
                            f"the model has {num_experts}")
    return place(load.per_expert(), ep, per_rank, rank_node)


def bundle_nodes(pg, first: int, count: int) -> list | None:
    """The Ray node id of placement-group bundles first..first+count-1 (None when Ray does not say)."""
    import ray

    try:
        table = ray.util.placement_group_table(pg).get("bundles_to_node_id") or {}
    except Exception:  # an older Ray or a group that is gone: place as if on one node
        return None
    nodes = [table.get(first + r) for r in range(count)]
    return nodes if all(nodes) else None

"""Physical expert slots (parallel/placement.py): layouts, replicas, validation; which replica the
dispatcher picks; a rank's weights in slot order; the placement an engine starts with."""

from __future__ import annotations

import json

import pytest
import torch

from maverick_ray.config import ConfigError, ParallelConfig
from maverick_ray.parallel.initial_placement import bundle_nodes, initial_placement
from maverick_ray.parallel.placement import ExpertPlacement
from maverick_ray.parallel.slot_weights import to_slot_order


def test_contiguous_layouts_with_and_without_redundant_slots():
    p = ExpertPlacement.contiguous(5, 2)
    assert p.slots == ((0, 1, 2), (3, 4)) and p.replica_counts() == [1] * 5
    r = ExpertPlacement.contiguous(8, 2, redundant=2)
    assert r.slots == ((0, 1, 2, 3, 4), (5, 6, 7, 0, 1))
    assert r.replica_counts() == [2, 2, 1, 1, 1, 1, 1, 1]
    assert r.replica_slots()[0] == [0, 8] and r.replica_slots()[1] == [1, 9] and r.replica_slots()[5] == [5]
    assert r.slot_ranks() == [0] * 5 + [1] * 5 and r.slot_locals() == list(range(5)) * 2
    assert r.offsets == [0, 5] and r.num_slots == 10
    # Expert 0's 12 tokens split over its 2 copies: rank 0 runs 6 + 1 + 1 + 1 + 1, rank 1 the rest.
    assert r.rank_loads([12, 2, 1, 1, 1, 1, 1, 1]) == [10, 10]
    with pytest.raises(ValueError, match="8 experts \\+ 1 redundant = 9 slots cannot be split evenly over 2"):
        ExpertPlacement.contiguous(8, 2, redundant=1)


def test_from_map_and_bad_placements():
    p = ExpertPlacement.from_map([1, 0, 1, 0], 2)
    assert p.slots == ((1, 3), (0, 2)) and p.experts_of(0) == [1, 3]
    with pytest.raises(ValueError, match="outside \\[0, 2\\)"):
        ExpertPlacement.from_map([0, 2], 2)
    with pytest.raises(ValueError, match="experts \\[2\\] have no slot"):
        ExpertPlacement(((0, 1), (1, 3)), 4)
    with pytest.raises(ValueError, match="outside \\[0, 4\\)"):
        ExpertPlacement(((0, 1), (2, 7)), 4)


def _dispatcher(placement, rank):
    from maverick_ray.parallel.all_to_all import AllToAllDispatcher

    return AllToAllDispatcher(placement, rank)   # no collective is called here


def test_rows_of_a_hot_expert_alternate_over_its_replicas_starting_at_the_rank():
    p = ExpertPlacement.contiguous(8, 2, redundant=2)            # expert 0 in slots 0 (rank 0) and 8 (rank 1)
    ids = torch.tensor([0, 5, 0, 0, 1, 0])
    assert _dispatcher(p, 0).choose_slots(ids).tolist() == [0, 5, 8, 0, 1, 8]
    # Rank 1 starts one replica later, so single rows from both ranks go to different copies.
    d = _dispatcher(p, 1)
    assert d.choose_slots(ids).tolist() == [8, 5, 0, 8, 9, 0]
    d.begin_step(None)                      # and each step starts one replica later again
    assert d.choose_slots(ids).tolist() == [0, 5, 8, 0, 1, 8]
    assert _dispatcher(p, 1).choose_slots(torch.tensor([], dtype=torch.long)).tolist() == []
    plain = ExpertPlacement.contiguous(8, 2)
    assert _dispatcher(plain, 1).choose_slots(ids).tolist() == [0, 5, 0, 0, 1, 0]
    with pytest.raises(ValueError, match="placement over 4 ranks for a group of 2"):
        _dispatcher(p, 0).set_placement(ExpertPlacement.contiguous(8, 4))


def test_weights_come_in_slot_order_with_copies():
    gate = torch.arange(3.0)[:, None, None].expand(3, 2, 4).clone()   # experts 1, 4, 6 read in id order
    scale = torch.arange(3.0)[:, None].expand(3, 8).clone()             # FP8 experts' per-row scales
    state = {"model.layers.1.feed_forward.experts.gate_up_proj": gate, "model.norm.weight": torch.ones(2),
             "model.layers.1.feed_forward.experts.gate_up_proj_scale": scale}
    out = to_slot_order(state, [4, 1, 6, 1])
    assert out["model.layers.1.feed_forward.experts.gate_up_proj"][:, 0, 0].tolist() == [1.0, 0.0, 2.0, 0.0]
    assert out["model.layers.1.feed_forward.experts.gate_up_proj_scale"][:, 0].tolist() == [1.0, 0.0, 2.0, 0.0]
    assert out["model.norm.weight"] is state["model.norm.weight"]
    assert to_slot_order(state, [1, 4, 6]) is state                   # nothing to reorder: no copy
    with pytest.raises(ValueError, match="3 experts loaded, expected 2"):
        to_slot_order(state, [4, 1, 4])


def _load_file(tmp_path, tokens, **extra):
    path = tmp_path / "load.json"
    path.write_text(json.dumps({"expert_load": tokens, **extra}))
    return str(path)


def test_initial_placement_follows_the_knobs(tmp_path):
    assert initial_placement(ParallelConfig(ep_size=2), 8) == ExpertPlacement.contiguous(8, 2)
    assert initial_placement(ParallelConfig(ep_size=2, redundant_experts=2), 8).slots[1] == (5, 6, 7, 0, 1)
    owner = ParallelConfig(ep_size=2, expert_owner=(1, 0) * 4)
    assert initial_placement(owner, 8).experts_of(1) == [0, 2, 4, 6]
    skew = [[50, 1, 1, 1, 25, 1, 1, 1], [50, 0, 0, 0, 25, 0, 0, 0]]   # summed: the SKEW of test_eplb
    f = _load_file(tmp_path, skew)
    started = initial_placement(ParallelConfig(ep_size=2, redundant_experts=2, init_expert_location=f), 8)
    assert started.slots == ((0, 1, 3, 4, 6), (0, 2, 4, 5, 7))
    # Without redundant slots the policy only packs: the two hot experts go to different ranks.
    hot = [40, 30, 1, 1, 1, 1, 1, 1]
    plain = initial_placement(ParallelConfig(ep_size=2, init_expert_location=_load_file(tmp_path, [hot])), 8)
    assert plain.slots == ((0, 5, 6, 7), (1, 2, 3, 4))   # 40 | 30, then the 1s onto the lighter rank
    assert plain.rank_loads(hot) == [43, 33] and ExpertPlacement.contiguous(8, 2).rank_loads(hot) == [72, 4]
    # On several nodes, each node's experts are replicated on that node only.
    four = initial_placement(ParallelConfig(ep_size=4, redundant_experts=4, init_expert_location=f), 8,
                             rank_node=["n1", "n1", "n2", "n2"])
    node = ["n1", "n1", "n2", "n2"]
    assert all(len({node[four.slot_ranks()[g]] for g in s}) == 1 for s in four.replica_slots())


def test_initial_placement_names_what_does_not_fit(tmp_path):
    with pytest.raises(ConfigError, match="redundant_experts: 8 experts \\+ 3 redundant"):
        initial_placement(ParallelConfig(ep_size=2, redundant_experts=3), 8)
    with pytest.raises(ConfigError, match="expert_owner: .*cannot be combined"):
        initial_placement(ParallelConfig(ep_size=2, expert_owner=(0, 1) * 4, redundant_experts=2), 8)
    with pytest.raises(ValueError, match="expert_owner names 8 experts; the model has 16"):
        initial_placement(ParallelConfig(ep_size=2, expert_owner=(0, 1) * 4), 16)
    f = _load_file(tmp_path, [[1] * 8])
    with pytest.raises(ConfigError, match="records 8 experts; the model has 16"):
        initial_placement(ParallelConfig(ep_size=2, init_expert_location=f), 16)
    with pytest.raises(ConfigError, match="cannot be read"):
        initial_placement(ParallelConfig(ep_size=2, init_expert_location=str(tmp_path / "none.json")), 8)
    with pytest.raises(ConfigError, match="redundant_experts"):
        ParallelConfig(ep_size=2, redundant_experts=-1)


def test_bundle_nodes_reads_the_placement_group_table(monkeypatch):
    import ray

    table = {"bundles_to_node_id": {0: "replica-node", 1: "n1", 2: "n2"}}
    monkeypatch.setattr(ray.util, "placement_group_table", lambda pg: table)
    assert bundle_nodes(object(), 1, 2) == ["n1", "n2"]
    assert bundle_nodes(object(), 1, 3) is None          # bundle 3 unknown: place as on one node

    def gone(pg):
        raise ValueError("no such group")

    monkeypatch.setattr(ray.util, "placement_group_table", gone)
    assert bundle_nodes(object(), 0, 2) is None

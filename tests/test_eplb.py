"""The EPLB policy (parallel/eplb.py) against hand-computed cases: replication follows the load,
balanced packing, unchanged experts keep their slot, hierarchical placement by node, and when
a rebalance is due."""

from __future__ import annotations

import pytest

from maverick_ray.parallel.eplb import RebalanceTrigger, imbalance, pack, place, rebalance, replicate
from maverick_ray.parallel.placement import ExpertPlacement

SKEW = [100, 1, 1, 1, 50, 1, 1, 1]   # two hot experts, both on rank 0 of the contiguous layout


def test_replicas_go_to_the_most_tokens_per_replica_lower_id_on_ties():
    # heap: 6, 3, 2, 1 -> e0 gets a 2nd copy (3 per copy), then e0 and e1 tie at 3: the lower id, e0.
    assert replicate([6, 3, 1, 2], 6) == [3, 1, 1, 1]
    # At most 2 copies (2 ranks): e0 stops at 2, the next slot goes to e1.
    assert replicate([6, 3, 1, 2], 6, max_replicas=2) == [2, 2, 1, 1]
    assert replicate([0, 0, 9, 0], 4) == [1, 1, 1, 1]           # no extra slot: one copy each
    assert replicate([0, 0, 9, 0], 6, max_replicas=3) == [1, 1, 3, 1]
    with pytest.raises(ValueError, match="cannot hold 4 experts"):
        replicate([1, 1, 1, 1], 3)


def test_packing_puts_the_heaviest_first_on_the_lightest_rank():
    # 8 -> r0; 4 -> r1; 2 (e2) -> r1 (4 < 8); e3: r1 is full (2 slots) -> r0.
    assert pack([8, 4, 2, 2], [1, 1, 1, 1], 2) == [[0, 3], [1, 2]]
    # Copies of one expert go to different ranks: 4 (e0) r0, 4 (e0) r1, 1 (e1) r0 (tie: lower),
    # 1 (e1) r1 (r0 already holds e1), e2 r0, e3 r1.
    assert pack([8, 2, 1, 1], [2, 2, 1, 1], 2) == [[0, 1, 2], [0, 1, 3]]
    with pytest.raises(ValueError, match="cannot be split evenly"):
        pack([1, 1, 1], [1, 1, 1], 2)


def test_place_replicates_the_hot_experts_and_balances_the_ranks():
    contiguous = ExpertPlacement.contiguous(8, 2)
    assert contiguous.rank_loads(SKEW) == [103, 53]
    p = place(SKEW, num_ranks=2, slots_per_rank=5)
    # counts: e0 x2 (50 each), e4 x2 (25 each), the rest x1; packed 50|50, 25|25, then the 1s alternate.
    assert p.slots == ((0, 1, 3, 4, 6), (0, 2, 4, 5, 7))
    assert p.replica_counts() == [2, 1, 1, 1, 2, 1, 1, 1]
    assert p.rank_loads(SKEW) == [78, 78]
    assert p.balancedness(SKEW) == 1.0 and contiguous.balancedness(SKEW) < 0.76


def test_experts_that_stay_on_a_rank_keep_their_slot():
    current = ExpertPlacement.contiguous(8, 2, redundant=2)    # (0 1 2 3 4) (5 6 7 0 1)
    new = rebalance(SKEW, current)
    # rank 0 keeps 0 1 3 4 in their slots and takes 6 in the slot 2 held; rank 1 keeps 5 7 0
    # and takes 2, 4 in the freed slots 1 and 4: three of ten slots change.
    assert new.slots == ((0, 1, 6, 3, 4), (5, 2, 7, 0, 4))
    moved = sum(a != b for old, nw in zip(current.slots, new.slots) for a, b in zip(old, nw))
    assert moved == 3
    assert max(new.rank_loads(SKEW)) == 78 < max(current.rank_loads(SKEW))
    # The same load again: nothing moves.
    assert place(SKEW, 2, 5, previous=new) == new
    # Ranks are interchangeable for the packing: the result follows the previous labelling.
    swapped = ExpertPlacement(((0, 2, 4, 5, 7), (0, 1, 3, 4, 6)), 8)
    assert place(SKEW, 2, 5, previous=swapped) == swapped


def test_rebalance_keeps_the_current_placement_when_it_is_not_worse():
    current = ExpertPlacement.contiguous(8, 2, redundant=2)
    assert rebalance([1] * 8, current) is current


def test_hierarchical_placement_keeps_each_experts_copies_on_one_node():
    load = [8, 1, 1, 1, 4, 4, 1, 1]
    p = place(load, num_ranks=4, slots_per_rank=3, rank_node=["a", "a", "b", "b"])
    # Nodes first (4 experts each, balanced): a = {0, 1, 3, 7} (11 tokens), b = {2, 4, 5, 6} (10).
    # Node a's 6 slots: e0 x2 (4 each), e1 x2; node b's: e4 x2, e5 x2 (2 each).
    assert p.slots == ((0, 1, 3), (0, 1, 7), (2, 4, 5), (4, 5, 6))
    assert p.rank_loads(load) == [5.5, 5.5, 5, 5]
    node = {0: "a", 1: "a", 2: "b", 3: "b"}
    for e, slots in enumerate(p.replica_slots()):
        assert len({node[p.slot_ranks()[g]] for g in slots}) == 1, f"expert {e} spans nodes"
    # Ranks of one node need not be neighbours.
    q = place(load, 4, 3, rank_node=["a", "b", "a", "b"])
    assert (q.slots[0], q.slots[2]) == ((0, 1, 3), (0, 1, 7)) and (q.slots[1], q.slots[3]) == p.slots[2:]
    # Flat placement mixes them.
    flat = place(load, 4, 3)
    assert any(len({node[flat.slot_ranks()[g]] for g in s}) > 1 for s in flat.replica_slots())
    # Unequal nodes: the flat policy.
    assert place(load, 4, 3, rank_node=["a", "b", "b", "b"]) == flat


def test_place_refuses_bad_input():
    with pytest.raises(ValueError, match="non-negative"):
        place([1, -1], 2, 1)
    with pytest.raises(ValueError, match="cannot hold 8 experts"):
        place([1] * 8, 2, 3)
    with pytest.raises(ValueError, match="previous placement has 2 ranks"):
        place([1] * 8, 4, 2, previous=ExpertPlacement.contiguous(8, 2))


def test_imbalance_is_the_lockstep_cost_over_an_even_split():
    # Layer 0: max 10 over mean 5; layer 1: even. (10 + 5) / (5 + 5).
    assert imbalance([[10, 0], [5, 5]]) == 1.5
    assert imbalance([[0, 0]]) == 1.0


def test_trigger_waits_for_the_interval_and_the_threshold():
    t = RebalanceTrigger(min_imbalance=1.2, interval_steps=100)
    assert not t.due(50, 3.0)           # the window is still filling
    assert not t.due(100, 1.1)          # balanced enough
    assert t.due(120, 1.5) and t.last_step == 120
    assert not t.due(200, 3.0)          # only 80 steps since
    assert t.due(220, 3.0)
    with pytest.raises(ValueError, match="min_imbalance"):
        RebalanceTrigger(min_imbalance=0.5)
    with pytest.raises(ValueError, match="interval_steps"):
        RebalanceTrigger(interval_steps=0)


def test_zipf_load_at_ep4_reaches_the_issue_balance_target():
    """Zipf-shaped load over 16 experts at EP = 4 with 4 redundant slots: balancedness from below
    0.6 (contiguous) to at least 0.9."""
    load = [round(1000 / (e + 1)) for e in range(16)]
    assert ExpertPlacement.contiguous(16, 4).balancedness(load) < 0.6
    assert place(load, 4, 5).balancedness(load) >= 0.9

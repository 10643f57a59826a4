"""Expert shards spread over the nodes of a local multi-node Ray cluster (ray.cluster_utils)."""

from __future__ import annotations

import pytest

from maverick_ray.config import EngineConfig, ParallelConfig
from maverick_ray.engine.engine import Engine
from maverick_ray.engine.sampling import SamplingParams

from engine_helpers import greedy_reference, prompts_for, settle_rebalance


@pytest.fixture(scope="module")
def three_node_cluster():
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1",
                                                            "include_dashboard": False})
    for _ in range(2):
        cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, _node_ip_address="127.0.0.1", log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_workers_on_distinct_nodes_give_identical_results(tiny_ckpt, three_node_cluster):
    import ray

    assert len([n for n in ray.nodes() if n["Alive"]]) == 3
    prompts = prompts_for(tiny_ckpt)
    reference = greedy_reference(tiny_ckpt, prompts, 10, use_hf=False)
    parallel = ParallelConfig(ep_size=3, placement_strategy="STRICT_SPREAD")
    with Engine(tiny_ckpt, parallel, EngineConfig(max_num_seqs=4, max_model_len=256)) as eng:
        # Start returns with a warm spare on each of the three nodes, not still importing beside
        # the first requests (spares are started with the ranks and waited for).
        assert eng.stats()["spare_ranks_ready"] == 3
        assert sorted(s["node_id"] for s in eng.ranks.spares.warm_info()) == sorted(i["node_id"] for i in eng.ranks.infos)
        infos = eng.ranks.call("info")
        nodes = [i["node_id"] for i in infos]
        assert len(set(nodes)) == 3, f"workers share nodes: {nodes}"
        got = [eng.generate(p, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))["token_ids"]
               for p in prompts]
    assert got == reference


def test_a_live_rebalance_moves_experts_across_nodes(tiny_ckpt, three_node_cluster):
    """EP = 3, one rank per node, a Zipf-skewed router whose hot experts start on one node: the
    rebalance (the policy placing experts node by node) moves experts between nodes while
    serving, and the outputs stay those of the placement before."""
    parallel = ParallelConfig(ep_size=3, placement_strategy="STRICT_SPREAD", redundant_experts=2, eplb="on",
                              eplb_interval_steps=10**6, spare_ranks=0)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    prompts = prompts_for(tiny_ckpt) * 3
    with Engine(tiny_ckpt, parallel, EngineConfig(max_num_seqs=12, max_model_len=256)) as eng:
        eng.skew_routing(3.0, hottest=2)

        def run():
            return [[ev.token_id for ev in s if ev.token_id is not None]
                    for s in [eng.add_request(p, params) for p in prompts]]

        reference = run()
        node_of = {i["rank"]: i["node_id"] for i in eng.ranks.infos}
        before = {node_of[r]: set(eng.ranks.placement.experts_of(r)) for r in range(3)}
        eng.eplb.request()
        assert run() == reference
        settle_rebalance(eng)
        assert eng.stats()["eplb"]["rebalances"] == 1
        after = {node_of[r]: set(eng.ranks.placement.experts_of(r)) for r in range(3)}
        assert len(set(node_of.values())) == 3 and after != before
        assert any(after[n] - before[n] for n in after)   # a node took experts it did not hold
        assert [i["experts"] for i in eng.ranks.call("info")] == [list(eng.ranks.placement.experts_of(r))
                                                                  for r in range(3)]
        assert run() == reference


def test_a_lost_node_costs_a_pause_and_its_rank_is_placed_elsewhere(tiny_ckpt, three_node_cluster):
    """Runs last in this module: it removes a node. EP = 2 over 3 nodes (one spare); the node
    holding a rank goes away mid-generation; the rank comes back on another node and every
    request completes with the fault-free output."""
    parallel = ParallelConfig(ep_size=2, placement_strategy="STRICT_SPREAD")
    params = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)
    prompts = prompts_for(tiny_ckpt)
    with Engine(tiny_ckpt, parallel, EngineConfig(max_num_seqs=4, max_model_len=256)) as eng:
        reference = [eng.generate(p, params)["token_ids"] for p in prompts]
        head = three_node_cluster.head_node.node_id
        rank, node_id = next((i["rank"], i["node_id"]) for i in eng.ranks.infos if i["node_id"] != head)
        streams = [iter(eng.add_request(p, params)) for p in prompts]
        outs = [[next(s).token_id] for s in streams]
        node = next(n for n in three_node_cluster.worker_nodes if n.node_id == node_id)
        three_node_cluster.remove_node(node)
        for out, s in zip(outs, streams):
            events = list(s)
            assert events[-1].finish_reason == "length", events[-1].error
            out += [e.token_id for e in events if e.token_id is not None]
        assert outs == reference
        stats = eng.stats()
        assert stats["rank_failures"] == {"died": 1} and stats["recoveries"]["ok"] == 1
        moved = next(i["node_id"] for i in eng.ranks.infos if i["rank"] == rank)
        assert moved != node_id and len({i["node_id"] for i in eng.ranks.infos}) == 2

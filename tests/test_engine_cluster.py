"""Expert shards spread over the nodes of a local multi-node Ray cluster (ray.cluster_utils)."""

from __future__ import annotations

import pytest

from maverick_ray.config import EngineConfig, ParallelConfig
from maverick_ray.engine.engine import Engine
from maverick_ray.engine.sampling import SamplingParams

from engine_helpers import greedy_reference, prompts_for


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
        infos = eng.ranks.call("info")
        nodes = [i["node_id"] for i in infos]
        assert len(set(nodes)) == 3, f"workers share nodes: {nodes}"
        got = [eng.generate(p, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))["token_ids"]
               for p in prompts]
    assert got == reference

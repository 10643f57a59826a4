"""Expert-parallel layout options: worker bundles with custom resources, collective interface,
the dispatch message layout."""

from __future__ import annotations

import pytest
import torch

from maverick_ray.config import ConfigError, ParallelConfig
from maverick_ray.parallel.network import interface_for_ip, pin_collective_interface
from maverick_ray.serve.settings import ServeSettings


def test_worker_bundle_carries_custom_resources():
    p = ParallelConfig(ep_size=2, num_gpus_per_worker=1, num_cpus_per_worker=4, worker_resources={"expert_host": 1})
    assert p.worker_bundle() == {"CPU": 4, "GPU": 1, "expert_host": 1}
    assert ParallelConfig(ep_size=2).worker_bundle() == {"CPU": 1}


@pytest.mark.parametrize("bad", [{"CPU": 1}, {"expert_host": 0}, {"expert_host": "one"}, ["expert_host"]])
def test_bad_worker_resources_name_the_field(bad):
    with pytest.raises(ConfigError, match="worker_resources"):
        ParallelConfig(ep_size=2, worker_resources=bad)


def test_serve_bundles_put_custom_resources_on_worker_bundles_only():
    s = ServeSettings.from_args({"ep_size": 2, "worker_resources": {"expert_host": 1}, "replica_num_cpus": 2})
    assert s.placement_group_bundles() == [{"CPU": 2}, {"CPU": 1, "expert_host": 1}, {"CPU": 1, "expert_host": 1}]


def test_collectives_pinned_to_the_interface_of_the_node_ip(monkeypatch):
    assert interface_for_ip("127.0.0.1") == "lo"
    assert interface_for_ip("192.0.2.123") is None  # TEST-NET-1: on no interface here
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    monkeypatch.delenv("NCCL_SOCKET_IFNAME", raising=False)
    assert pin_collective_interface("127.0.0.1") == "lo"
    import os

    assert os.environ["GLOO_SOCKET_IFNAME"] == "lo" and os.environ["NCCL_SOCKET_IFNAME"] == "lo"
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth7")  # a user's explicit choice wins
    pin_collective_interface("127.0.0.1")
    assert os.environ["GLOO_SOCKET_IFNAME"] == "eth7"


def test_replica_bundles_that_cannot_hold_a_worker_fail_with_the_fix():
    from maverick_ray.engine.ranks import check_worker_bundles

    need = ParallelConfig(ep_size=2, num_gpus_per_worker=1, worker_resources={"expert_host": 1}).worker_bundle()
    check_worker_bundles([{"CPU": 1.0, "GPU": 1.0, "expert_host": 1.0}] * 2, need)  # fits
    with pytest.raises(ValueError, match=r"placement_group_bundles\[2\].*GPU"):
        check_worker_bundles([{"CPU": 1.0, "GPU": 1.0, "expert_host": 1.0}, {"CPU": 1.0}], need)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [5, 1, 0])
def test_dispatch_packs_rows_and_expert_ids_into_one_message(dtype, rows):
    from maverick_ray.parallel.all_to_all import _pack, _unpack

    x, ids = torch.randn(rows, 7).to(dtype), torch.randint(0, 128, (rows,))
    packed = _pack(x, ids)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, 7 * x.element_size() + 8)
    got_x, got_ids = _unpack(packed, dtype, 7)
    assert torch.equal(got_x, x) and torch.equal(got_ids, ids)

"""Serve's autoscaler takes an EP = 2 deployment from 1 to 2 replicas under load and back to 1 when
idle, and every replica brings its own group of 2 rank actors, placed in its own placement group
(the replica's bundle + one per rank). EP = 2 covers everything an EP = 1 run would (the replica
count going up and down) plus the rank groups, so there is no separate EP = 1 case."""

from __future__ import annotations

import threading
import time

import pytest
import requests

from serve_fixtures import start_serve, stop_serve

APP = "autoscale"
EP = 2
REPLICA_CLASS = f"ServeReplica:{APP}:MaverickServer"
RANK_CLASS = "_RankActor"   # maverick_ray.engine.ranks._RankActor
# 2 replicas x (1 replica bundle + EP rank bundles) of 1 CPU = 6 logical CPUs; 8 leaves room for
# Serve's own actors. Logical CPUs, not cores: the test machine may have far fewer.
NUM_CPUS = 8


def deployment_status():
    from ray import serve

    return serve.status().applications[APP].deployments["MaverickServer"]


def replica_count() -> int:
    return deployment_status().replica_states.get("RUNNING", 0)


def alive_actors(class_name: str) -> list[dict]:
    """ALIVE actors of one class, from the GCS actor table (ray.util.state needs the dashboard,
    which the test cluster runs without)."""
    from ray._private import state

    return [a for a in state.actors().values() if a["ActorClassName"] == class_name and a["State"] == "ALIVE"]


def rank_groups() -> tuple[dict[tuple, list[dict]], list[dict]]:
    """Alive rank actors by the alive replica that created (owns) them, and any rank owned by no
    alive replica."""
    def addr(a, key):
        return a[key]["IPAddress"], a[key]["Port"]

    groups: dict[tuple, list[dict]] = {addr(a, "Address"): [] for a in alive_actors(REPLICA_CLASS)}
    strays = []
    for rank in alive_actors(RANK_CLASS):
        groups.get(addr(rank, "OwnerAddress"), strays).append(rank)
    return groups, strays


def replica_placement_groups() -> list[dict]:
    import ray

    return [pg for pg in ray.util.placement_group_table().values() if pg["state"] == "CREATED"]


def assert_own_rank_groups(replicas: int) -> None:
    groups, strays = rank_groups()
    assert len(groups) == replicas, f"{len(groups)} alive replica actors, expected {replicas}"
    assert not strays, f"rank actors owned by no alive replica: {strays}"
    for owner, ranks in groups.items():   # its EP ranks, plus the warm spare it starts on its node (spare_ranks 1)
        assert EP <= len(ranks) <= EP + 1, f"replica at {owner} owns {len(ranks)} rank actors, expected {EP} + a spare"
    pids = [r["Pid"] for ranks in groups.values() for r in ranks]
    assert len(set(pids)) == len(pids), f"rank actors share processes: {pids}"
    assert not set(pids) & {a["Pid"] for a in alive_actors(REPLICA_CLASS)}
    # Each replica's placement group holds its own bundle and its ranks' (no separate rank groups).
    pgs = replica_placement_groups()
    assert [len(pg["bundles"]) for pg in pgs] == [EP + 1] * replicas, pgs


@pytest.fixture(scope="module")
def autoscaled(tiny_ckpt):
    args = {"model": str(tiny_ckpt), "served_model_name": "tiny", "ep_size": EP, "max_model_len": 512,
            "autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1,
                                   "upscale_delay_s": 1, "downscale_delay_s": 4, "metrics_interval_s": 0.5,
                                   "look_back_period_s": 2}}
    url = start_serve({"/" + APP: args}, num_cpus=NUM_CPUS)
    yield url + "/" + APP
    stop_serve()


def test_scales_up_under_load_and_back_down_when_idle(autoscaled):
    assert replica_count() == 1
    assert_own_rank_groups(1)
    stop = threading.Event()
    errors, done = [], []

    def load():
        body = {"model": "tiny", "messages": [{"role": "user", "content": "go"}], "max_tokens": 200,
                "temperature": 0}
        # A tiny request takes about a second, and the second replica (its engine and 2 ranks) may
        # take a minute or more to start on a busy machine: the load goes on until it is up, bounded
        # in count here and in time by `stop` (set at 2 replicas, or at the deadline below).
        for _ in range(300):
            if stop.is_set():
                return
            try:
                r = requests.post(autoscaled + "/v1/chat/completions", json=body, timeout=120)
            except requests.RequestException as e:
                errors.append(repr(e))
                continue
            (done if r.status_code == 200 else errors).append(r.text)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        # A generous deadline: on a loaded machine (other Ray clusters beside this one) the second
        # replica's start alone has taken over a minute.
        peak, deadline, status = 1, time.monotonic() + 180, None
        while time.monotonic() < deadline and peak < 2:
            status = deployment_status()
            peak = max(peak, status.replica_states.get("RUNNING", 0))
            time.sleep(0.5)
        assert peak == 2, (f"the deployment never scaled to 2 replicas under load: {status.status} "
                           f"{dict(status.replica_states)} {status.message!r}; {len(done)} requests done, "
                           f"errors: {errors[:2]}")
        assert_own_rank_groups(2)  # checked under load: the new replica started its own ranks
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "load threads still running"
    assert not errors, errors[:2]
    assert done, "no request completed"

    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and (replica_count() != 1 or len(rank_groups()[0]) != 1
                                           or len(alive_actors(RANK_CLASS)) != EP
                                           or len(replica_placement_groups()) != 1):
        time.sleep(0.5)
    assert replica_count() == 1, "the deployment did not scale back to 1 replica when idle"
    assert_own_rank_groups(1)  # the removed replica's ranks and placement group went with it
    r = requests.post(autoscaled + "/v1/chat/completions", timeout=120,
                      json={"model": "tiny", "messages": [{"role": "user", "content": "go"}], "max_tokens": 4})
    assert r.status_code == 200, r.text

"""Serve's autoscaler takes the deployment from 1 to 2 replicas under load and back to 1 when idle."""

from __future__ import annotations

import threading
import time

import pytest
import requests

from serve_fixtures import start_serve, stop_serve


def replica_count() -> int:
    from ray import serve

    status = serve.status().applications["autoscale"].deployments["MaverickServer"]
    return status.replica_states.get("RUNNING", 0)


@pytest.fixture(scope="module")
def autoscaled(tiny_ckpt):
    args = {"model": str(tiny_ckpt), "served_model_name": "tiny", "ep_size": 1, "max_model_len": 512,
            "autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1,
                                   "upscale_delay_s": 1, "downscale_delay_s": 4, "metrics_interval_s": 0.5,
                                   "look_back_period_s": 2}}
    url = start_serve({"/autoscale": args}, num_cpus=4)
    yield url + "/autoscale"
    stop_serve()


def test_scales_up_under_load_and_back_down_when_idle(autoscaled):
    assert replica_count() == 1
    stop = threading.Event()
    errors = []

    def load():
        body = {"model": "tiny", "messages": [{"role": "user", "content": "go"}], "max_tokens": 200,
                "temperature": 0}
        for _ in range(20):  # bounded
            if stop.is_set():
                return
            r = requests.post(autoscaled + "/v1/chat/completions", json=body, timeout=120)
            if r.status_code != 200:
                errors.append(r.text)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    peak, deadline = 1, time.monotonic() + 90
    while time.monotonic() < deadline and peak < 2:
        peak = max(peak, replica_count())
        time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors[:2]
    assert peak == 2, "the deployment never scaled to 2 replicas under load"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and replica_count() != 1:
        time.sleep(0.5)
    assert replica_count() == 1, "the deployment did not scale back to 1 replica when idle"

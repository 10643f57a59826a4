"""cluster/netns-cluster.sh: a head and two worker hosts in network namespaces, each running
`ray start` on its own IP; expert shards on the worker hosts; requests through the head; every
host's metrics scraped by a real Prometheus server on the hosts' own IPs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import requests

from prom_helpers import prometheus, query, wait_for

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "cluster" / "netns-cluster.sh"
NET, PREFIX = "10.77.232", "mrt"  # not the defaults: a user's own run of the script is left alone
HEAD, W1, W2 = f"{NET}.10", f"{NET}.11", f"{NET}.12"


def script(*args, env, timeout=900):
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def netns_cluster():
    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.skip("needs root and iproute2 (network namespaces); CI has both")
    state = tempfile.mkdtemp(prefix="mrn", dir="/tmp")  # short: Ray's socket paths live under it
    env = dict(os.environ, PYTHON=sys.executable, MR_NETNS_DIR=state, MR_NETNS_SUBNET=NET, MR_NETNS_PREFIX=PREFIX)
    up = script("up", env=env)
    try:
        assert up.returncode == 0, f"up failed:\n{up.stdout}\n{up.stderr[-6000:]}"
        yield {"env": env, "stdout": up.stdout, "state": Path(state)}
    finally:
        down = script("down", env=env, timeout=300)
        assert down.returncode == 0, down.stderr
        hosts = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        links = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True).stdout
        assert f"{PREFIX}-" not in hosts and f"{PREFIX}br0" not in links and f"v{PREFIX}-" not in links, (hosts, links)
        assert not Path(state).exists()


def test_expert_shards_live_on_the_two_worker_hosts(netns_cluster):
    assert "chat: 8 tokens" in netns_cluster["stdout"]  # the script's own request through the head
    ranks = requests.get(f"http://{HEAD}:8000/v1/engine/stats", timeout=30).json()["ranks"]
    assert sorted(r["node_ip"] for r in ranks) == [W1, W2]
    a, b = (set(r["experts"]) for r in ranks)
    assert a and b and not a & b and a | b == set(range(16)), ranks
    # The hosts do not share /dev/shm, so the ranks found they cannot share a segment: gloo over the bridge.
    assert [r["collectives"] for r in ranks] == ["gloo", "gloo"], ranks


def test_chat_through_the_head_matches_a_single_process_run(netns_cluster):
    from openai import OpenAI

    client = OpenAI(base_url=f"http://{HEAD}:8000/v1", api_key="unused", max_retries=0, timeout=120)
    prompt = "Tell me about experts on other hosts"
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": prompt}],
                                           max_tokens=10, temperature=0)
    assert reply.choices[0].finish_reason in ("length", "stop") and reply.usage.completion_tokens > 0
    ckpt = netns_cluster["state"] / "tiny-ckpt"
    local = subprocess.run([sys.executable, "-m", "maverick_ray.cli", "generate", "--model", str(ckpt),
                            "--prompt", prompt, "--max-tokens", "10", "--json"],
                           capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert local.returncode == 0, local.stderr
    assert reply.choices[0].message.content == json.loads(local.stdout.strip().splitlines()[-1])["text"]


def test_prometheus_scrapes_every_host_on_its_own_ip(netns_cluster, tmp_path):
    with prometheus([f"{ip}:8080" for ip in (HEAD, W1, W2)], tmp_path) as url:
        up = wait_for(lambda: (r := query(url, 'up{job="ray"} == 1')) and len(r) == 3 and r, timeout=90)
        assert sorted(s["metric"]["instance"] for s in up) == [f"{ip}:8080" for ip in (HEAD, W1, W2)]
        # The EP workers' processes report from the worker hosts' own metrics endpoints...
        rank_actors = 'count by (instance) (ray_component_rss_mb{Component=~"ray::_RankActor.*"})'
        workers = wait_for(lambda: (r := query(url, rank_actors)) and len(r) == 2 and r, timeout=90)
        assert sorted(s["metric"]["instance"] for s in workers) == [f"{W1}:8080", f"{W2}:8080"]
        # ...and the routing metrics come from the replica on the head.
        routed = wait_for(lambda: query(url, "sum(ray_maverick_expert_tokens_total) > 0"), timeout=90)
        assert float(routed[0]["value"][1]) > 0

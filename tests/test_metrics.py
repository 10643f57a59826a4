"""Routing-balance, serving and recovery metrics, scraped by a real Prometheus server, plus the live
dashboard. The module's tests share one deployment; the last one kills a rank of it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time

import pytest
import requests

from page_helpers import dashboard_screenshot
from prom_helpers import RECOVERY_SERIES, dashboard_exprs, prometheus, query, wait_for
from serve_fixtures import free_port, start_serve, stop_serve

EP = 2
SERIES = ["expert_tokens_total", "rank_tokens_total", "balancedness_ratio", "imbalance_ratio",
          "idle_experts_ratio", "all_to_all_seconds_bucket", "all_to_all_bytes_total", "step_seconds_bucket",
          "requests_total", "time_to_first_token_seconds_bucket", "time_per_output_token_seconds_bucket",
          "request_latency_seconds_bucket", "prompt_tokens_total", "generation_tokens_total",
          "running_sequences", "waiting_sequences", "kv_cache_usage_ratio"]


@pytest.fixture(scope="module")
def stack(tiny_ckpt, tmp_path_factory):
    metrics_port = free_port()
    url = start_serve({"/": {"model": str(tiny_ckpt), "served_model_name": "tiny", "ep_size": EP,
                             "enable_test_hooks": True, "max_model_len": 256}}, num_cpus=4, metrics_port=metrics_port)
    work = tmp_path_factory.mktemp("prom")
    try:
        with prometheus([f"127.0.0.1:{metrics_port}"], work) as prom_url:
            yield {"url": url, "metrics": f"http://127.0.0.1:{metrics_port}/metrics", "prom": prom_url, "work": work}
    finally:
        stop_serve()


def load(url: str, n: int = 6) -> int:
    """n greedy requests; returns the tokens that went through every MoE layer."""
    fed = 0
    for i in range(n):
        body = {"model": "tiny", "messages": [{"role": "user", "content": f"Request number {i}: go"}],
                "max_tokens": 6 + i, "temperature": 0}
        r = requests.post(url + "/v1/chat/completions", json=body, timeout=60).json()
        u, reason = r["usage"], r["choices"][0]["finish_reason"]
        # Every prompt token not found in the prefix cache (the chat template's shared opening is)
        # and every sampled token but the last is fed through; an eos is not counted in
        # completion_tokens but its predecessor was fed.
        cached = u["prompt_tokens_details"]["cached_tokens"]
        assert 0 <= cached < u["prompt_tokens"]
        fed += u["prompt_tokens"] - cached + u["completion_tokens"] - (1 if reason == "length" else 0)
    return fed


def test_prometheus_scrapes_every_series_with_consistent_values(stack, tiny_ckpt):
    from maverick_ray.config import ModelConfig

    fed = load(stack["url"])
    moe_layers = ModelConfig.from_pretrained(tiny_ckpt).text.moe_layers

    def counts_match():
        per_layer = {r["metric"]["layer"]: float(r["value"][1])
                     for r in query(stack["prom"], "sum by (layer) (ray_maverick_expert_tokens_total)")}
        return per_layer if per_layer == {str(layer): float(fed) for layer in moe_layers} else None

    per_layer = wait_for(counts_match)
    assert sum(per_layer.values()) == fed * len(moe_layers)
    for name in SERIES:
        assert query(stack["prom"], f"ray_maverick_{name}"), f"ray_maverick_{name} missing in Prometheus"
    ranks = query(stack["prom"], "sum by (layer) (ray_maverick_rank_tokens_total)")
    assert {r["metric"]["layer"]: float(r["value"][1]) for r in ranks} == per_layer
    for r in query(stack["prom"], "ray_maverick_balancedness_ratio"):
        assert 0 < float(r["value"][1]) <= 1
    done = wait_for(lambda: query(stack["prom"], 'sum(ray_maverick_requests_total{status=~"length|stop"})'))
    assert float(done[0]["value"][1]) >= 6


def test_promtool_accepts_the_exposition(stack):
    text = requests.get(stack["metrics"], timeout=10).text
    assert "ray_maverick_balancedness_ratio" in text
    out = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    # Ray stamps every exported series with its own CamelCase labels (SessionName, NodeAddress, ...), which
    # promtool's style lint flags; anything else it reports about our series is a real problem.
    ray_labels = {"SessionName", "NodeAddress", "WorkerId", "Component", "Version", "JobId", "ActorId"}
    import re

    ours = [line for line in text.splitlines() if line.startswith("ray_maverick_")]
    camel = {name for line in ours for name in re.findall(r'[{,]([A-Za-z_]+)="', line) if name != name.lower()}
    assert camel <= ray_labels, camel - ray_labels
    problems = [line for line in (out.stdout + out.stderr).splitlines()
                if "maverick" in line and "should be written in 'snake_case'" not in line]
    assert not problems, problems


def dashboard_queries_return_data(prom: str, exprs: list[str]) -> None:
    for expr in exprs:
        expr = expr.replace("$__rate_interval", "30s").replace("$replica", ".*")
        wait_for(lambda: query(prom, expr), timeout=60)


def recovery_exprs() -> list[str]:
    return [e for e in dashboard_exprs() if any(f"ray_maverick_{s}" in e for s in RECOVERY_SERIES)]


def test_dashboard_promql_returns_data(stack):
    # Recovery series need a rank failure (the last test); preemptions a KV budget that runs out
    # (engine level: test_kv_scheduling); live-rebalance series parallel.eplb on (test_live_eplb).
    exprs = [e for e in dashboard_exprs()
             if e not in recovery_exprs() and "preemptions_total" not in e and "eplb_" not in e]
    assert len(exprs) >= 8
    load(stack["url"], 2)
    dashboard_queries_return_data(stack["prom"], exprs)


def test_forced_single_expert_drops_balancedness_to_one_over_ep(stack):
    url = stack["url"]
    assert requests.post(url + "/v1/debug/force-expert", json={"expert": 3}).status_code == 200
    try:
        load(url, 3)
        data = requests.get(url + "/v1/expert-load").json()
        assert data["balancedness"] and all(abs(b - 1 / EP) < 1e-9 for b in data["balancedness"])
        assert all(sum(1 for c in row if c) == 1 and row[3] > 0 for row in data["expert_load"])

        def gauge_low():
            vals = [float(r["value"][1]) for r in query(stack["prom"], "ray_maverick_balancedness_ratio")]
            return vals if vals and all(abs(v - 1 / EP) < 1e-6 for v in vals) else None
        wait_for(gauge_low)
        shot = dashboard_screenshot(url, stack["work"], "forced")
        assert shot["nonzero_cells"] == len(data["expert_load"])
    finally:
        requests.post(url + "/v1/debug/force-expert", json={"expert": None})


def test_dashboard_draws_heatmap_under_load(stack):
    import threading

    stop = threading.Event()

    def background():
        for _ in range(10):  # bounded load while the page renders
            if stop.is_set():
                return
            load(stack["url"], 1)

    t = threading.Thread(target=background)
    t.start()
    try:
        shot = dashboard_screenshot(stack["url"], stack["work"], "load")
    finally:
        stop.set()
        t.join(timeout=120)
    assert shot["png"].exists() and shot["png"].stat().st_size > 5000
    assert shot["nonzero_cells"] > 1, "the heatmap drew no routed tokens"
    assert "balancedness" in shot["dom"] and "EP=2" in shot["dom"]
    # the KV card: pages of the cache, and the prefix cache found the chat template's shared opening
    assert "<th>pages in use</th>" in shot["dom"] and "<th>preemptions</th><td>0</td>" in shot["dom"]
    assert re.search(r"<th>prefix cache hit rate</th><td>[0-9.]+% of [0-9]+ prompt tokens</td>", shot["dom"])
    # the EPLB card: live rebalancing is off here, and each rank's slots are listed
    assert "<th>live rebalancing</th><td>off (parallel.eplb)</td>" in shot["dom"]
    assert re.search(r"<th>rank 1 slots</th><td>[0-9 ]+</td>", shot["dom"])
    assert "<th>experts with copies</th><td>none</td>" in shot["dom"]


def test_top_shows_the_same_view_in_the_terminal(stack):
    import sys

    load(stack["url"], 1)
    out = subprocess.run([sys.executable, "-m", "maverick_ray.cli", "top", "--url", stack["url"], "--once"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "EP=2" in out.stdout and "balanced" in out.stdout and "rank load: r0=" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "maverick_ray.cli", "top", "--url", "http://127.0.0.1:9", "--once"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "cannot reach" in bad.stderr


# Keep this test last: it replaces the ranks of the deployment the tests above share.
def test_killed_rank_counts_one_failure_and_one_recovery_in_prometheus(stack):
    import openai

    url, prom = stack["url"], stack["prom"]

    def value(q: str) -> float:
        r = query(prom, q)
        return float(r[0]["value"][1]) if r else 0.0

    totals = {"died": 'sum(ray_maverick_rank_failures_total{cause="died"})',
              "failures": "sum(ray_maverick_rank_failures_total)",
              "ok": 'sum(ray_maverick_recoveries_total{outcome="ok"})',
              "recoveries": "sum(ray_maverick_recoveries_total)",
              "observations": "sum(ray_maverick_recovery_seconds_count)",
              "replayed": "sum(ray_maverick_replayed_sequences_total)"}

    def buckets() -> dict[float, float]:
        return {float(r["metric"]["le"]): float(r["value"][1])
                for r in query(prom, "sum by (le) (ray_maverick_recovery_seconds_bucket)")}
    before, buckets_before = {k: value(q) for k, q in totals.items()}, buckets()
    recovering_causes: list = []  # what the live page read (/v1/expert-load) while the ranks were replaced
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            d = requests.get(url + "/v1/expert-load", timeout=10).json()
            if d["stats"]["recovering"]:
                recovering_causes.append(d["last_failure_cause"])
            time.sleep(0.1)

    watcher = threading.Thread(target=watch)
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    t0 = time.monotonic()
    chunks = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Story number 0, please."}], max_tokens=40, temperature=0,
        stream=True)
    finish = None
    try:
        for n, chunk in enumerate(chunks):  # an error chunk raises
            if n == 5:  # kill the rank the stream runs on: it is replayed (the other rank keeps its sequences)
                ranks = requests.get(url + "/v1/engine/stats").json()["ranks"]
                pid = next(r["pid"] for r in ranks if r["running"])
                watcher.start()
                os.kill(pid, signal.SIGKILL)
            finish = chunk.choices[0].finish_reason if chunk.choices else finish
    finally:
        stop.set()
        if watcher.is_alive():
            watcher.join(timeout=30)
    assert finish in ("length", "stop") and watcher.ident is not None, "the stream ended before the kill"
    stats = requests.get(url + "/v1/engine/stats").json()
    assert stats["healthy"] and stats["recoveries"]["ok"] >= 1 and not stats["recovering"]
    assert recovering_causes and set(recovering_causes) == {"died"}, recovering_causes

    counters = ("died", "failures", "ok", "recoveries", "observations")

    def counted():  # every series, not some: a series new to Ray's export can reach Prometheus a scrape later
        now = {k: value(q) for k, q in totals.items()}
        return now if all(now[k] >= before[k] + 1 for k in counters) else None
    after = wait_for(counted)
    t_prom = time.monotonic() - t0
    for key in counters:
        assert after[key] == before[key] + 1, (key, before, after)
    # Ray exports an approximate _sum (bucket midpoints): the observation's bucket is what to check.
    seconds, grown = stats["last_recovery_seconds"], buckets()
    assert {le: n - buckets_before.get(le, 0.0) for le, n in grown.items()} == {
        le: float(seconds <= le) for le in grown}, (seconds, grown)
    assert after["replayed"] >= before["replayed"] + 1  # the stream above, at least
    wait_for(lambda: query(prom, "max(ray_maverick_recovery_in_progress) == 0"))
    dashboard_queries_return_data(prom, recovery_exprs())
    page = dashboard_screenshot(url, stack["work"], "recovered", screenshot=False)
    assert page["data"].get("recovering") == "0" and 'id="recovery-banner" hidden' in page["dom"]
    assert "<th>failures: died</th><td>1</td>" in page["dom"] and "<th>recoveries: ok</th><td>1</td>" in page["dom"]
    print(f"kill -9 to counted in Prometheus: {t_prom:.1f} s; ranks replaced in {stats['last_recovery_seconds']:.1f} s")

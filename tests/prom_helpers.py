"""A real Prometheus server for tests: start it on loopback against static targets, query it;
the Grafana dashboard's queries."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests

from serve_fixtures import free_port

DASHBOARD = Path(__file__).resolve().parents[1] / "k8s" / "monitoring" / "grafana-dashboard.json"
# The recovery series the dashboard charts. All but the gauge appear only once a rank has failed:
# Ray exports a counter or a histogram from its first record.
RECOVERY_SERIES = ("rank_failures_total", "recoveries_total", "recovery_seconds_bucket", "replayed_sequences_total",
                   "recovery_in_progress")


def dashboard_exprs() -> list[str]:
    """Every PromQL expression of the dashboard's panels."""
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


@contextmanager
def prometheus(targets: list[str], work: Path):
    """Runs Debian's prometheus scraping `targets` (host:port) every second; yields its URL."""
    if not shutil.which("prometheus"):
        pytest.fail("Debian's prometheus package is required (make test installs it)")
    port = free_port()
    listed = ", ".join(f"'{t}'" for t in targets)
    (work / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"scrape_configs:\n  - job_name: ray\n    static_configs: [{{targets: [{listed}]}}]\n")
    proc = subprocess.Popen(["prometheus", f"--config.file={work / 'prometheus.yml'}",
                             f"--storage.tsdb.path={work / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def query(prom: str, q: str) -> list:
    r = requests.get(prom + "/api/v1/query", params={"query": q}, timeout=10)
    r.raise_for_status()
    return r.json()["data"]["result"]


def wait_for(fn, timeout=90, interval=0.25):  # a query is milliseconds: poll often, return soon
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        try:
            last = fn()
            if last:
                return last
        except (requests.RequestException, KeyError, ValueError) as e:
            last = e
        time.sleep(interval)
    raise AssertionError(f"condition not met in {timeout}s (last: {last})")

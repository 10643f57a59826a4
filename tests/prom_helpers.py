"""A real Prometheus server for tests: start it on loopback against static targets, query it."""

from __future__ import annotations

import shutil
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests

from serve_fixtures import free_port


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


def wait_for(fn, timeout=90, interval=1.0):
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

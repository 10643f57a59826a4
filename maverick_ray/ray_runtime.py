"""Starting or joining Ray the same way from every entry point (CLI, server, tests, benchmarks)."""

from __future__ import annotations

import os


def init_ray(address: str | None = None, num_cpus: int | None = None, metrics_port: int | None = None) -> None:
    """Joins the cluster at `address` (or $RAY_ADDRESS), else starts a fresh local Ray on 127.0.0.1.

    A local start passes address="local" on purpose: without it Ray silently tries to join the
    cluster recorded in /tmp/ray/ray_current_cluster by an earlier `ray start`, even one that is
    long dead, and then fails (or refuses num_cpus). No-op when Ray is already initialised.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address and address != "local":
        ray.init(address=address, log_to_driver=False)
        return
    kw = {"_metrics_export_port": metrics_port} if metrics_port else {}
    ray.init(address="local", _node_ip_address="127.0.0.1", num_cpus=num_cpus or os.cpu_count(),
             include_dashboard=False, log_to_driver=False, **kw)

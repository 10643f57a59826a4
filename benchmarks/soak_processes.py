"""bench_soak's memory watch: the deployment's processes, their RSS, the engine's stats, and the
growth slope per 1000 requests."""

from __future__ import annotations

import statistics

ROLES = (("ServeReplica", "replica"), ("ProxyActor", "proxy"), ("ServeController", "controller"),
         ("_RankActor", "rank"))


def deployment_processes(rank_pids: dict[int, str]) -> dict[str, int]:
    """name -> pid for the deployment's processes: this driver's descendants (the local Ray it
    started) whose title is a Serve replica, rank actor, proxy or controller. Ranks are named by
    the pids /v1/engine/stats reports; several processes of one kind get their pid appended."""
    import psutil

    found: dict[str, int] = {}
    for p in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if not cmd.startswith("ray::"):
            continue
        if p.pid in rank_pids:
            found[rank_pids[p.pid]] = p.pid
            continue
        for marker, name in ROLES:
            if marker in cmd:
                found[f"{name}:{p.pid}" if name in found or name == "rank" else name] = p.pid
                break
    return dict(sorted(found.items()))


def rss_of(pid: int) -> int | None:
    import psutil

    try:
        return psutil.Process(pid).memory_info().rss
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


def engine_stats(url: str) -> dict | None:
    import requests

    try:
        r = requests.get(url + "/v1/engine/stats", timeout=10)
        return r.json() if r.status_code == 200 else None
    except (requests.RequestException, ValueError):
        return None


def slope_per_1000(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of y over x, times 1000 (MiB per 1000 requests)."""
    if len(points) < 2:
        return None
    mx = statistics.fmean(x for x, _ in points)
    my = statistics.fmean(y for _, y in points)
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        return None
    return 1000 * sum((x - mx) * (y - my) for x, y in points) / sxx

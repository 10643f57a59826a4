"""A real Ray Serve deployment of maverick-ray on loopback, shared by the API tests of a module."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import requests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def app_on_loopback(app, join_timeout: float = 30.0):
    """Serves an ASGI app (uvicorn in a thread) on a free loopback port; yields its base URL
    once the server is listening, and stops it on exit."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.started, "the HTTP server did not start in 30 s"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=join_timeout)


def wait_healthy(url: str, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            r = requests.get(url + "/health", timeout=5)
            if r.status_code == 200:
                return
            last = r.text
        except requests.RequestException as e:
            last = str(e)
        time.sleep(0.2)
    raise TimeoutError(f"{url} not healthy after {timeout}s: {last}")


def start_serve(apps: dict[str, dict], num_cpus: int = 4, metrics_port: int | None = None) -> str:
    """Starts a local Ray + Serve on 127.0.0.1 and deploys {route_prefix: app args}; returns the base URL."""
    from ray import serve

    from maverick_ray.ray_runtime import init_ray
    from maverick_ray.serve.app import build_app

    init_ray(num_cpus=num_cpus, metrics_port=metrics_port)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    for prefix, args in apps.items():
        name = prefix.strip("/") or "maverick"
        serve.run(build_app(args), name=name, route_prefix=prefix, blocking=False)
    url = f"http://127.0.0.1:{port}"
    for prefix in apps:
        wait_healthy(url + prefix.rstrip("/"))
    return url


def stop_serve() -> None:
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()

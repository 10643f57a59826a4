"""Shared fixtures: tiny checkpoints written by the project's own writer (no model hub)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # test helper modules (hf_reference, serve_fixtures, ...)
# Ray rewrites "127.0.0.1:port" cluster addresses to the machine's external IP unless this is off;
# tests keep every Ray process on loopback. Must be set before ray is imported.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Keeps the default tiny checkpoint (created on first use) inside the test session."""
    os.environ["MAVERICK_RAY_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    from maverick_ray.checkpoint.writer import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("tiny"), "tiny", progress=False)


@pytest.fixture(scope="session")
def tiny_split_ckpt(tmp_path_factory) -> Path:
    """Same weights as tiny_ckpt, experts stored split and the weights spread over several shards."""
    from maverick_ray.checkpoint.writer import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("tiny_split"), "tiny", progress=False,
                            experts_layout="split", max_shard_bytes=200_000)


RAY_LOCAL_CPUS = 5


def _uses_ray_local(path: Path, _seen: dict = {}) -> bool:  # noqa: B006 (a cache)
    if path not in _seen:
        _seen[path] = "ray_local" in path.read_text()
    return _seen[path]


def pytest_collection_modifyitems(session, config, items):
    """Runs the modules that use `ray_local` one after another, from where the first of them
    stands (each keeps its tests' order, the other modules theirs), so that they share one local
    Ray instead of starting and stopping one each (~10 s apiece on the 2-core CI machines)."""
    modules: dict[Path, list] = {}
    for item in items:
        modules.setdefault(item.path, []).append(item)
    order = list(modules)
    ray_modules = [m for m in order if _uses_ray_local(m)]
    if len(ray_modules) < 2:
        return
    first = order.index(ray_modules[0])
    others = [m for m in order if m not in ray_modules]
    items[:] = [item for m in others[:first] + ray_modules + others[first:] for item in modules[m]]


def _next_module_uses_ray_local(module: pytest.Module) -> bool:
    items = module.session.items
    mine = [i for i, item in enumerate(items) if item.path == module.path]
    following = items[mine[-1] + 1:] if mine else []
    return bool(following) and _uses_ray_local(following[0].path)


def _ray_local_is_clean(ray, timeout: float = 15.0) -> bool:
    """No CPU of the shared Ray is held (the previous module's actors and placement groups are
    gone; Ray frees them asynchronously)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        try:
            if ray.available_resources().get("CPU") == RAY_LOCAL_CPUS:
                return True
        except Exception:  # the cluster died under us
            return False
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray on 127.0.0.1 for the module's EP > 1 engines. Shut down after the module
    (_ray_local_handover), unless the next module uses it too (pytest_collection_modifyitems puts
    them in a row): that one then reuses it, once every CPU of it is free again (else it starts a
    fresh one)."""
    import ray

    from maverick_ray.ray_runtime import init_ray

    if ray.is_initialized() and not _ray_local_is_clean(ray):
        ray.shutdown()
    init_ray("local", num_cpus=RAY_LOCAL_CPUS)  # a no-op when the previous module handed its Ray over
    return ray


@pytest.fixture(scope="module", autouse=True)
def _ray_local_handover(request):
    """After a module that uses ray_local (after its own fixtures, engines included, are torn
    down): the local Ray is shut down unless the next module uses ray_local too."""
    yield
    if "ray" in sys.modules and _uses_ray_local(request.node.path) and not _next_module_uses_ray_local(request.node):
        import ray

        if ray.is_initialized():
            ray.shutdown()


@pytest.fixture(scope="session")
def tokenizer(tiny_ckpt):
    """The tiny checkpoint's ChatTokenizer (chat template, encode, decode)."""
    from maverick_ray.checkpoint.tokenizer import ChatTokenizer

    return ChatTokenizer.from_pretrained(tiny_ckpt)


@pytest.fixture
def fake(tiny_ckpt, tokenizer):
    """A FakeEngine (tests/fake_engine.py) behind the HTTP layer: scripted replies, no model."""
    from fake_engine import FakeEngine

    engine = FakeEngine(tiny_ckpt, tokenizer)
    yield engine
    engine.close()

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


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray on 127.0.0.1 for the module's EP > 1 engines, shut down after the module."""
    import ray

    from maverick_ray.ray_runtime import init_ray

    init_ray("local", num_cpus=5)
    yield ray
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

"""`maverick-ray serve` on a broken checkpoint: the user's terminal shows the cause, not only
Ray's "Failed to update the deployments"."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from serve_fixtures import free_port

ROOT = Path(__file__).resolve().parents[1]


def serve(ckpt: Path, tmp_path: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    # Serve marks a deployment failed after 3 failed starts of its replica (the same failure each
    # time here: a broken checkpoint); the terminal shows the same error after one.
    env = dict(os.environ, MAVERICK_RAY_CACHE=str(tmp_path / "cache"), RAY_SERVE_MAX_PER_REPLICA_RETRY_COUNT="1")
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "maverick_ray.cli", "serve", "--model", str(ckpt), "--ep", "1",
                           "--port", str(free_port()), "--metrics-port", str(free_port())],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT,
                          stdin=subprocess.DEVNULL)


def test_serve_without_a_tokenizer_names_the_missing_file_before_starting_ray(tiny_ckpt, tmp_path):
    ck = tmp_path / "no_tokenizer"
    shutil.copytree(tiny_ckpt, ck)
    (ck / "tokenizer.json").unlink()
    t0 = time.monotonic()
    r = serve(ck, tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "error: tokenizer.json: not found in" in r.stderr and str(ck) in r.stderr
    assert "Failed to update the deployments" not in r.stderr
    assert time.monotonic() - t0 < 60  # checked before Ray starts


def test_a_replica_that_fails_to_start_shows_its_own_error(tiny_ckpt, tmp_path):
    """Config, tokenizer and weight index are fine; the replica fails loading a tensor whose
    shape the config contradicts. The terminal shows the replica's own error."""
    ck = tmp_path / "wrong_shape"
    shutil.copytree(tiny_ckpt, ck)
    cfg = json.loads((ck / "config.json").read_text())
    cfg["text_config"]["intermediate_size_mlp"] += 8  # the dense MLP weights on disk disagree
    (ck / "config.json").write_text(json.dumps(cfg))
    r = serve(ck, tmp_path, timeout=300)
    assert r.returncode == 1 and "\nerror: " in r.stderr, r.stderr[-3000:]
    err = r.stderr[r.stderr.index("\nerror: "):]
    assert "cause: deployment MaverickServer:" in err and "CheckpointError" in err
    assert "feed_forward" in err  # the error names the tensor

"""`serve deploy` of the shipped tiny config onto a `ray start --head` cluster (KubeRay's path, minus Kubernetes)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

from serve_fixtures import free_port, wait_healthy

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")
SERVE = str(Path(sys.executable).parent / "serve")


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """One `ray start --head` cluster for the module (starting and stopping one costs ~20 s)."""
    import secrets

    # Ray's token authentication: the cluster and the `serve deploy` client share one token.
    env = dict(os.environ, MAVERICK_RAY_CACHE=str(tmp_path_factory.mktemp("deploy") / "cache"),
               RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))
    gcs, dash = free_port(), free_port()
    subprocess.run([RAY, "stop", "--force"], capture_output=True, env=env)
    start = subprocess.run([RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
                            "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=4",
                            "--disable-usage-stats"], capture_output=True, text=True, env=env, timeout=120)
    assert start.returncode == 0, start.stderr
    yield env, f"http://127.0.0.1:{dash}"
    subprocess.run([RAY, "stop", "--force"], capture_output=True, env=env, timeout=120)


@pytest.fixture
def ray_head(ray_cluster):
    """The module's cluster with no Serve on it, as right after `ray start`: each test's `serve
    deploy` starts Serve afresh (its own HTTP port), and Serve is shut down after the test."""
    env, dashboard = ray_cluster
    yield ray_cluster
    # What `serve shutdown -y` does (the dashboard's REST API), without a CLI process per call.
    auth = {"Authorization": f"Bearer {env['RAY_AUTH_TOKEN']}"}
    r = requests.delete(dashboard + "/api/serve/applications/", headers=auth, timeout=300)
    assert r.status_code == 200, r.text
    deadline, details = time.monotonic() + 120, None
    while time.monotonic() < deadline:
        details = requests.get(dashboard + "/api/serve/applications/", headers=auth, timeout=30).json()
        if details["controller_info"].get("node_id") is None and not details.get("applications"):
            break
        time.sleep(0.2)
    assert details["controller_info"].get("node_id") is None and not details.get("applications"), \
        f"Serve did not shut down: {details}"


def serve_deploy(cfg_file: Path, dashboard: str, env: dict) -> None:
    deadline = time.monotonic() + 60
    while True:  # the dashboard's REST API takes a moment after `ray start`
        out = subprocess.run([SERVE, "deploy", str(cfg_file), "-a", dashboard], capture_output=True, text=True,
                             env=env, timeout=120)
        if out.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert out.returncode == 0, out.stderr


def load_config(source: str) -> dict:
    if source == "configs/tiny-cpu.yaml":
        return yaml.safe_load((ROOT / source).read_text())
    rayservice = yaml.safe_load((ROOT / source).read_text())  # the tiny RayService's serveConfigV2
    return yaml.safe_load(rayservice["spec"]["serveConfigV2"])


@pytest.mark.parametrize("source", ["configs/tiny-cpu.yaml", "k8s/tiny/rayservice-tiny-cpu.yaml"])
def test_serve_deploy_tiny_config_serves_a_chat_request(ray_head, tmp_path, source):
    env, dashboard = ray_head
    config = load_config(source)
    port = free_port()
    config["http_options"] = {"host": "127.0.0.1", "port": port}  # loopback only in tests
    cfg_file = tmp_path / "tiny.yaml"
    cfg_file.write_text(yaml.safe_dump(config))
    serve_deploy(cfg_file, dashboard, env)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, timeout=240)
    r = requests.post(url + "/v1/chat/completions", timeout=60,
                      json={"model": "tiny", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 5,
                            "temperature": 0})  # greedy: a sampled first token may be a stop token
    assert r.status_code == 200, r.text
    body = r.json()
    choice, usage = body["choices"][0], body["usage"]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] in ("length", "stop")
    assert 1 <= usage["completion_tokens"] <= 5 and usage["prompt_tokens"] > 0


def test_serve_status_names_the_missing_tokenizer_of_a_deployed_config(ray_head, tmp_path, tiny_ckpt):
    """`serve deploy` returns at once; the app's build checks the checkpoint, so `serve status`
    says what is wrong instead of only "Failed to update the deployments"."""
    import shutil

    env, dashboard = ray_head
    ck = tmp_path / "no_tokenizer"
    shutil.copytree(tiny_ckpt, ck)
    (ck / "tokenizer.json").unlink()
    config = load_config("configs/tiny-cpu.yaml")
    config["http_options"] = {"host": "127.0.0.1", "port": free_port()}
    config["applications"][0]["args"]["model"] = str(ck)
    cfg_file = tmp_path / "broken.yaml"
    cfg_file.write_text(yaml.safe_dump(config))
    serve_deploy(cfg_file, dashboard, env)
    deadline, status = time.monotonic() + 120, ""
    while time.monotonic() < deadline:
        out = subprocess.run([SERVE, "status", "-a", dashboard], capture_output=True, text=True, env=env, timeout=60)
        status = out.stdout
        if "DEPLOY_FAILED" in status:
            break
        time.sleep(0.5)
    assert "DEPLOY_FAILED" in status, status
    assert "tokenizer.json: not found" in status and str(ck) in status

"""Through the real Serve app at EP = 2: a rank dies and its replacement cannot load its weights
(the checkpoint became unreadable). The engine gives up after max_recoveries: the open stream
and new requests fail with a clear 503 within bounded time, the replica reports unhealthy, and
Serve replaces it with a fresh replica that serves again once the checkpoint is back."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time

import openai
import pytest
import requests

from serve_fixtures import start_serve, stop_serve, wait_healthy

GIVE_UP_WITHIN_S = 120  # kill -> the stream's error: detection, max_recoveries failed starts
REPLACED_WITHIN_S = 240  # checkpoint back -> Serve's health check, a new replica, its ranks up


@pytest.fixture()
def server(tmp_path, tiny_ckpt):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, ckpt)
    url = start_serve({"/": {"model": str(ckpt), "served_model_name": "tiny", "ep_size": 2, "max_model_len": 256,
                             "max_num_seqs": 4, "max_recoveries": 1, "retry_after_s": 2}},
                      num_cpus=8)  # room for the replacement replica while the old one stops
    yield url, ckpt
    stop_serve()


def test_unloadable_replacement_rank_fails_requests_with_503_and_serve_replaces_the_replica(server):
    url, ckpt = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=GIVE_UP_WITHIN_S)
    before = requests.get(url + "/v1/engine/stats").json()
    streaming, outcome = threading.Event(), {}

    def stream():
        try:
            for chunk in client.chat.completions.create(
                    model="tiny", messages=[{"role": "user", "content": "A long story, please."}],
                    max_tokens=200, temperature=0, stream=True):
                streaming.set()
            outcome["done"] = True
        except openai.APIError as e:
            outcome["error"] = e
        finally:
            outcome["at"] = time.monotonic()
            streaming.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert streaming.wait(60) and "error" not in outcome
    hidden = [f.rename(f.with_suffix(".hidden")) for f in ckpt.glob("*.safetensors")]
    t_kill = time.monotonic()
    os.kill(before["ranks"][1]["pid"], signal.SIGKILL)
    reader.join(GIVE_UP_WITHIN_S + 10)
    assert not reader.is_alive(), "the open stream never ended"
    err = outcome.get("error")
    assert err is not None, "the stream finished although the engine gave up"
    assert outcome["at"] - t_kill < GIVE_UP_WITHIN_S
    body = err.body if isinstance(err.body, dict) else {}
    # The stream's error event carries what a 503 would: retry, the replica is being replaced.
    assert body.get("code") == "engine_unavailable" and "temporarily unavailable" in body["message"], body
    assert "127.0.0.1" not in str(err) and "rank" not in str(err).lower()  # no internals for clients

    health = requests.get(url + "/health", timeout=10)
    assert health.status_code == 503
    r = requests.post(url + "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 4}, timeout=30)
    # Refused by the failed engine (503 + Retry-After) or, once Serve has taken the replica out, by Serve (503).
    assert r.status_code == 503, r.text
    assert "Retry-After" in r.headers or "engine_unavailable" not in r.text

    for f in hidden:  # the checkpoint is back: the replacement replica can load it
        f.rename(f.with_suffix(".safetensors"))
    wait_healthy(url, timeout=REPLACED_WITHIN_S)
    after = requests.get(url + "/v1/engine/stats").json()
    assert after["healthy"] and after["recoveries"] == {"ok": 0, "failed": 0}  # a fresh engine
    assert not {r["pid"] for r in after["ranks"]} & {r["pid"] for r in before["ranks"]}
    out = client.completions.create(model="tiny", prompt="Hello", max_tokens=4, temperature=0)
    assert out.choices[0].finish_reason in ("length", "stop") and out.usage.completion_tokens >= 1

"""Through the real Serve endpoint at EP = 2 and 4: kill -9 a rank mid-generation while 32 streams are open.
Every stream completes with no error chunk, and every output equals the fault-free run's."""

from __future__ import annotations

import os
import signal
import threading
import time

import openai
import pytest
import requests

from serve_fixtures import start_serve, stop_serve

STREAMS = 32


EPS = (2, 4)


@pytest.fixture(scope="module")
def serve_url(tiny_ckpt):
    """One Ray + Serve for the module with an app per EP size at /ep2 and /ep4: one Ray and Serve
    start instead of one per EP size. Each app has its own replica, ranks and engine stats, and
    the logical CPUs of two separate clusters (ep + 3 each)."""
    url = start_serve({f"/ep{ep}": {"model": str(tiny_ckpt), "served_model_name": "tiny", "ep_size": ep,
                                    "max_model_len": 256, "max_num_seqs": 32 // ep, "step_deadline_floor_s": 3.0}
                       for ep in EPS}, num_cpus=sum(ep + 3 for ep in EPS))
    yield url
    stop_serve()


@pytest.fixture(params=EPS, ids=lambda ep: f"ep{ep}")
def server(request, serve_url):
    return f"{serve_url}/ep{request.param}"


def stream_all(url: str, fault=None) -> tuple[list[str], list[str]]:
    """STREAMS concurrent streaming chat requests, greedy and seeded sampling mixed; `fault()`
    runs once stream 0 has 5 chunks. Returns each stream's text and any error seen."""
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    texts, errors = [""] * STREAMS, []
    fired = threading.Event()

    def one(i):
        sampling = {"temperature": 0} if i % 2 == 0 else {"temperature": 1.0, "seed": 1000 + i}
        try:
            chunks = client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": f"Story number {i}, please."}],
                max_tokens=40, stream=True, **sampling)
            for n, chunk in enumerate(chunks):
                if chunk.choices and chunk.choices[0].delta.content:
                    texts[i] += chunk.choices[0].delta.content
                if fault and i == 0 and n == 5 and not fired.is_set():
                    fired.set()
                    fault()
        except Exception as e:  # an error chunk or a failed request
            errors.append(f"stream {i}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(STREAMS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return texts, errors


def test_kill_a_rank_mid_generation_no_stream_fails_and_outputs_are_unchanged(server):
    reference, errors = stream_all(server)
    assert not errors and any(reference)
    stats = requests.get(server + "/v1/engine/stats").json()
    pid = stats["ranks"][-1]["pid"]  # the last rank
    t0 = time.monotonic()
    texts, errors = stream_all(server, lambda: os.kill(pid, signal.SIGKILL))
    assert not errors, errors[:3]
    assert texts == reference
    after = requests.get(server + "/v1/engine/stats").json()
    assert after["rank_failures"] == {"died": 1} and after["recoveries"]["ok"] == 1 and after["healthy"]
    assert pid not in [r["pid"] for r in after["ranks"]]
    print(f"{STREAMS} streams at EP={stats['ep_size']} with a kill -9: {time.monotonic() - t0:.1f} s; ranks replaced in "
          f"{after['last_recovery_seconds']:.1f} s")

"""The HTTP app over the in-process fake engine (tests/fake_engine.py), for the HTTP tests
(test_http_completions.py, test_http_errors.py, test_http_images.py, test_sampling_api.py): the
`make_client` and `http` fixtures, and helpers to send chat requests, read SSE bodies, look at what
reached the engine and check OpenAI's error shape. No model, no Ray, no server process.

A test module uses the fixtures by binding them to module names:

    import http_helpers
    make_client, http = http_helpers.make_client, http_helpers.http
"""

from __future__ import annotations

import json

import openai
import pytest
from fastapi.testclient import TestClient

from fake_engine import FakeEngine
from maverick_ray.serve.http_api import Backend, make_api
from maverick_ray.serve.openai_service import OpenAIService, image_prompt_builder
from maverick_ray.serve.settings import API_KEY_ENV, ServeSettings

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three experts."}]


@pytest.fixture
def make_client(fake, tiny_ckpt, tokenizer, monkeypatch):
    """make_client(**app args) -> a TestClient on the HTTP app over `fake`."""
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    clients = []

    def make(images: bool = True, metrics=None, raise_server_exceptions: bool = True, **kw) -> TestClient:
        settings = ServeSettings.from_args({"model": str(tiny_ckpt), "served_model_name": "tiny", "ep_size": 1,
                                            "max_model_len": 256, "default_max_tokens": 16,
                                            "max_request_bytes": 200_000, **kw})
        fake.max_model_len = settings.engine().max_model_len  # as an engine resolves an explicit one
        builder = image_prompt_builder(tiny_ckpt, fake, tokenizer, settings) if images else None
        backend = Backend(OpenAIService(fake, tokenizer, settings, "tiny", builder), metrics)
        client = TestClient(make_api(lambda: backend), raise_server_exceptions=raise_server_exceptions)
        clients.append(client)
        return client

    yield make
    for c in clients:
        c.close()


@pytest.fixture
def http(make_client) -> TestClient:
    return make_client()


def openai_client(http: TestClient, api_key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key=api_key, http_client=http, max_retries=0)


def chat(http: TestClient, headers: dict | None = None, **body):
    return http.post("/v1/chat/completions", headers=headers, json={"model": "tiny", "messages": MESSAGES, **body})


def sse(response) -> list:
    """The SSE body as a list of decoded `data:` payloads ("[DONE]" kept as the string)."""
    events = []
    for line in response.iter_lines():
        if not line:
            continue
        assert line.startswith("data: "), line
        data = line[len("data: "):]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


def stream_chat(http: TestClient, headers: dict | None = None, **body) -> list:
    with http.stream("POST", "/v1/chat/completions", headers=headers,
                     json={"model": "tiny", "messages": MESSAGES, "stream": True, **body}) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return sse(r)


def last_request(fake: FakeEngine):
    return list(fake.requests.values())[-1]


def only_request(fake: FakeEngine):
    assert len(fake.requests) == 1, list(fake.requests)
    return next(iter(fake.requests.values()))


def assert_openai_error(r, status: int, param=None, code=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"] and len(err["message"]) > 10
    assert err["param"] == param
    if code is not None:
        assert err["code"] == code
    return err

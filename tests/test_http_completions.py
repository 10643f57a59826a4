"""The HTTP layer's requests that succeed, over the in-process fake engine (no model, no Ray):
chat and completions replies (chat template, max_tokens defaults, eos and stop strings, usage and
cached tokens), the streaming chunk shapes, request ids, a client going away mid-stream, /v1/models,
/health, the stats and expert-load routes, and the official openai client. Errors are in
test_http_errors.py, images in test_http_images.py; the end-to-end tests on a real Ray Serve
deployment in test_serve_api.py.
"""

from __future__ import annotations

import inspect

import http_helpers
from fake_engine import FakeEngine
from http_helpers import (MESSAGES, assert_openai_error, chat, last_request, only_request, openai_client, sse,
                          stream_chat)
from maverick_ray.serve.engine_protocol import EngineProtocol

make_client, http = http_helpers.make_client, http_helpers.http  # the HTTP app fixtures; tokenizer, fake: conftest


def test_the_real_engine_and_the_fake_have_the_engine_protocol(tiny_ckpt, fake):
    from maverick_ray.engine.engine import Engine

    assert isinstance(fake, EngineProtocol)
    assert isinstance(Engine(tiny_ckpt), EngineProtocol)  # not started: no model, no threads
    want = list(inspect.signature(EngineProtocol.add_request).parameters)
    for engine in (Engine, FakeEngine):
        assert list(inspect.signature(engine.add_request).parameters) == want, engine


# ---- requests that succeed ---------------------------------------------------------------------
def test_chat_runs_the_chat_template_and_returns_the_reply(http, fake, tokenizer):
    r = chat(http, max_tokens=6, temperature=0.7, top_p=0.9, top_k=5, seed=7)
    assert r.status_code == 200, r.text
    body = r.json()
    req = only_request(fake)
    assert req.prompt_ids == tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)
    p = req.params
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.seed, p.stop) == (6, 0.7, 0.9, 5, 7, [])
    # the reply's id is vLLM's: from the request id (X-Request-Id); the engine's own id stays unique
    assert body["id"] == "chatcmpl-" + r.headers["x-request-id"] != req.request_id
    assert req.request_id.startswith("chatcmpl-")
    assert body["object"] == "chat.completion" and body["model"] == "tiny"
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": fake.reply_text(6)}
    assert choice["finish_reason"] == "length" and choice["index"] == 0
    assert body["usage"] == {"prompt_tokens": len(req.prompt_ids), "completion_tokens": 6,
                             "total_tokens": len(req.prompt_ids) + 6, "prompt_tokens_details": {"cached_tokens": 0}}


def test_default_max_tokens_is_capped_by_the_context_left(http, fake):
    assert http.post("/v1/completions", json={"model": "tiny", "prompt": "Hi"}).status_code == 200
    assert fake.requests.popitem()[1].params.max_tokens == 16          # default_max_tokens
    r = http.post("/v1/completions", json={"model": "tiny", "prompt": [5] * 250})
    assert r.status_code == 200, r.text
    assert fake.requests.popitem()[1].params.max_tokens == 256 - 250   # what the context has left


def test_model_may_be_omitted_and_max_completion_tokens_wins(http, fake):
    r = http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 9, "max_completion_tokens": 3})
    assert r.status_code == 200, r.text
    assert only_request(fake).params.max_tokens == 3 and r.json()["usage"]["completion_tokens"] == 3


def test_completions_take_a_string_or_token_ids(http, fake, tokenizer):
    r = http.post("/v1/completions", json={"model": "tiny", "prompt": "Once upon a time", "max_tokens": 4})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["choices"][0]["text"] == fake.reply_text(4) and body["choices"][0]["finish_reason"] == "length"
    assert last_request(fake).prompt_ids == tokenizer.encode("Once upon a time", add_bos=True)
    r = http.post("/v1/completions", json={"model": "tiny", "prompt": [3, 4, 5], "max_tokens": 2})
    assert r.json()["id"] == "cmpl-" + r.headers["x-request-id"]
    assert last_request(fake).prompt_ids == [3, 4, 5]


def test_eos_token_ends_with_stop_and_is_not_counted(http, fake, tokenizer):
    eos = sorted(fake.stop_ids)[0]
    fake.script = tokenizer.encode(" Hello there") + [eos] + tokenizer.encode(" never")
    body = chat(http, max_tokens=50).json()
    assert body["choices"][0]["message"]["content"] == tokenizer.decode(tokenizer.encode(" Hello there"))
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == len(tokenizer.encode(" Hello there"))


def test_stop_string_cuts_the_output_streaming_or_not(http, fake):
    full = fake.reply_text(10)
    assert "brown" in full
    body = chat(http, max_tokens=10, stop=["brown"]).json()
    assert only_request(fake).params.stop == ["brown"]
    assert body["choices"][0]["message"]["content"] == full[:full.index("brown")]
    assert body["choices"][0]["finish_reason"] == "stop"
    events = stream_chat(http, max_tokens=10, stop="brown")
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1])
    assert text == full[:full.index("brown")]


def test_models_and_health(http):
    assert http.get("/v1/models").json() == {"object": "list", "data": [
        {"id": "tiny", "object": "model", "created": 0, "owned_by": "maverick-ray"}]}
    r = http.get("/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_engine_stats_dashboard_and_expert_load(make_client, fake):
    class Metrics:
        class window:
            steps = [1, 2]

        def expert_load(self):
            return {"balancedness": 0.5}

    metrics = Metrics()
    http = make_client(metrics=metrics, enable_test_hooks=True)
    chat(http, max_tokens=2)
    assert http.get("/v1/engine/stats").json() == fake.stats() and fake.stats()["finished"] == {"length": 1}
    dash = http.get("/dashboard")
    assert dash.status_code == 200 and dash.headers["content-type"].startswith("text/html")
    assert http.get("/v1/expert-load").json() == {"balancedness": 0.5}
    assert http.post("/v1/debug/force-expert", json={"expert": 3}).json() == {"expert": 3}
    assert fake.forced_expert == 3 and metrics.window.steps == []
    plain = make_client()
    assert_openai_error(plain.get("/v1/expert-load"), 404)
    assert_openai_error(plain.post("/v1/debug/force-expert", json={"expert": 1}), 404)
    assert fake.forced_expert == 3


# ---- streaming -------------------------------------------------------------------------------
def test_chat_stream_chunk_shapes_with_usage(http, fake):
    events = stream_chat(http, headers={"X-Request-Id": "stream-1"}, max_tokens=5,
                         stream_options={"include_usage": True})
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    chunks = events[:-1]
    req = only_request(fake)
    for c in chunks:
        assert set(c) <= {"id", "object", "created", "model", "choices", "usage"}
        assert (c["id"], c["object"], c["model"]) == ("chatcmpl-stream-1", "chat.completion.chunk", "tiny")
    role, *content, finish, usage = chunks
    assert role["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                "finish_reason": None}]
    assert all(c["choices"][0]["finish_reason"] is None and set(c["choices"][0]["delta"]) == {"content"}
               for c in content)
    assert "".join(c["choices"][0]["delta"]["content"] for c in content) == fake.reply_text(5)
    assert finish["choices"][0]["finish_reason"] == "length" and finish["choices"][0]["delta"] == {}
    assert usage["choices"] == [] and usage["usage"] == {
        "prompt_tokens": len(req.prompt_ids), "completion_tokens": 5, "total_tokens": len(req.prompt_ids) + 5,
        "prompt_tokens_details": {"cached_tokens": 0}}
    assert not any("usage" in c for c in chunks[:-1])


def test_stream_without_include_usage_has_no_usage_chunk(http):
    events = stream_chat(http, max_tokens=3)
    assert events[-1] == "[DONE]" and not any("usage" in e for e in events[:-1])
    assert [e["choices"][0]["finish_reason"] for e in events[:-1] if e["choices"][0]["finish_reason"]] == ["length"]


def test_completions_stream_chunk_shapes(http, fake):
    with http.stream("POST", "/v1/completions", json={"model": "tiny", "prompt": "Hi", "max_tokens": 4,
                                                       "stream": True}) as r:
        events = sse(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "text_completion" and set(c["choices"][0]) == {"index", "text", "logprobs",
                                                                             "finish_reason"} for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == fake.reply_text(4)
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]] == ["length"]


def test_streaming_equals_non_streaming(http):
    full = chat(http, max_tokens=12).json()
    events = stream_chat(http, max_tokens=12, stream_options={"include_usage": True})
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1] if e["choices"]) == \
        full["choices"][0]["message"]["content"]
    assert events[-2]["usage"] == full["usage"]


def test_request_id_is_made_when_absent_and_echoed_on_every_response(http, fake):
    ok = chat(http, max_tokens=2)
    made = ok.headers["x-request-id"]
    assert ok.status_code == 200 and len(made) == 32 and ok.json()["id"] == "chatcmpl-" + made
    assert chat(http, max_tokens=2).headers["x-request-id"] != made
    assert http.get("/health", headers={"X-Request-Id": "probe-1"}).headers["x-request-id"] == "probe-1"
    bad = http.post("/v1/chat/completions", json={"messages": []}, headers={"X-Request-Id": "r-400"})
    assert bad.status_code == 400 and bad.headers["x-request-id"] == "r-400"
    too_long = http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2},
                         headers={"X-Request-Id": "x" * 300})
    assert too_long.status_code == 200 and len(too_long.headers["x-request-id"]) == 32  # replaced, not echoed


def test_client_disconnect_mid_stream_aborts_the_request(http, fake):
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 200, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert sum(line.startswith("data: ") for line in got) == 3
        assert fake.running == 1
    req = only_request(fake)
    assert fake.aborted == [req.request_id] and req.finish_reason == "abort" and fake.running == 0
    assert len(req.output_ids) < 200
    assert chat(http, max_tokens=2).status_code == 200


# ---- the official client -------------------------------------------------------------------------
def test_openai_client_chat_stream_completions_models(http, fake):
    client = openai_client(http)
    reply = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6, temperature=0)
    assert reply.choices[0].message.content == fake.reply_text(6) and reply.usage.completion_tokens == 6
    chunks = list(client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == fake.reply_text(6)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage.completion_tokens == 6
    comp = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=4)
    assert comp.choices[0].text == fake.reply_text(4) and comp.usage.completion_tokens == 4
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_usage_reports_the_prompt_tokens_found_in_the_prefix_cache(fake, make_client):
    fake.cached_tokens = 16
    client = make_client()
    body = client.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 3,
                                                     "messages": [{"role": "user", "content": "hello there"}]}).json()
    assert body["usage"]["prompt_tokens_details"] == {"cached_tokens": 16}
    body = client.post("/v1/completions", json={"model": "tiny", "prompt": "hello", "max_tokens": 3}).json()
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == min(16, body["usage"]["prompt_tokens"])

"""The HTTP layer (routes, request parsing, errors, streaming shapes, auth) over an in-process fake
engine: no model, no Ray. The real end-to-end tests on a Ray Serve deployment are in test_serve_api.py.
"""

from __future__ import annotations

import base64
import inspect
import json

import openai
import pytest
from fastapi.testclient import TestClient

from fake_engine import FakeEngine
from maverick_ray.engine.request import EngineFull
from maverick_ray.engine.sampling import InvalidRequest
from maverick_ray.serve.engine_protocol import EngineProtocol
from maverick_ray.serve.http_api import Backend, make_api
from maverick_ray.serve.openai_service import OpenAIService, image_prompt_builder
from maverick_ray.serve.settings import API_KEY_ENV, ServeSettings

API_KEY = "s3cret-test-key"
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


FAILED = "the server failed while generating this response; retry the request (request id {})"
INTERNALS = ("RankFailed", "rank 1", "10.0.3.7", "Ray", "actor", "Traceback", "ConnectionError")


def assert_no_internals(message: str):
    assert not any(word in message for word in INTERNALS), message


def test_error_mid_stream_sends_an_error_event_then_done(http, fake):
    fake.fail_after = 3
    events = stream_chat(http, max_tokens=10, headers={"X-Request-Id": "trace-abc-123"})
    assert events[-1] == "[DONE]"
    assert events[-2] == {"error": {"message": FAILED.format("trace-abc-123"), "type": "server_error",
                                    "param": None, "code": None}}
    assert len(events) == 1 + 3 + 2  # role chunk, 3 tokens, error, [DONE]
    assert not any(e["choices"][0]["finish_reason"] for e in events[:-2])
    assert only_request(fake).finish_reason == "error" and fake.aborted == []


def test_error_without_streaming_is_a_500(http, fake):
    fake.fail_after = 2
    r = chat(http, max_tokens=10)
    err = assert_openai_error(r, 500)
    assert err["type"] == "server_error" and err["message"] == FAILED.format(r.headers["x-request-id"])


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_engine_failure_detail_goes_to_the_log_and_the_client_gets_the_request_id(http, fake, caplog, stream):
    """The engine fails a request with internal detail (rank, node IP, Ray's words): the client sees
    what happened and the id it sent; the server log has the detail under that same id."""
    fake.fail_after = 1
    headers = {"X-Request-Id": "client-req-42"}
    caplog.set_level("INFO", logger="maverick_ray.serve")
    if stream:
        with http.stream("POST", "/v1/chat/completions", headers=headers,
                         json={"model": "tiny", "messages": MESSAGES, "stream": True}) as r:
            message = sse(r)[-2]["error"]["message"]
    else:
        r = http.post("/v1/chat/completions", headers=headers, json={"model": "tiny", "messages": MESSAGES})
        message = assert_openai_error(r, 500)["message"]
    assert r.headers["x-request-id"] == "client-req-42"
    assert message == FAILED.format("client-req-42")
    assert_no_internals(message)
    logged = [rec for rec in caplog.records if "client-req-42" in rec.getMessage()]
    assert len(logged) == 1 and logged[0].levelname == "ERROR"
    assert fake.fail_message in logged[0].getMessage()
    assert only_request(fake).request_id in logged[0].getMessage()  # and the engine's own id


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


def test_client_sees_errors_as_openai_exceptions(http, fake):
    client = openai_client(http)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=MESSAGES)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=-1)
    fake.fail_after = 1
    with pytest.raises(openai.APIError, match="failed while generating this response"):
        list(client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=5, stream=True))
    fake.fail_after = None
    fake.refuse = EngineFull("the engine is full: 64 requests already waiting")
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model="tiny", messages=MESSAGES)
    assert e.value.status_code == 503 and e.value.response.headers["retry-after"] == "5"
    assert e.value.request_id == e.value.response.headers["x-request-id"]  # the client reads the id
    fake.refuse = None
    fake.time_out_after = 1
    with pytest.raises(openai.APIStatusError, match="deadline") as e:
        client.chat.completions.create(model="tiny", messages=MESSAGES, extra_body={"timeout": 2.5})
    assert e.value.status_code == 504 and e.value.code == "request_timeout"
    assert list(fake.requests.values())[-1].timeout_s == 2.5


# ---- bad requests --------------------------------------------------------------------------------
BAD = [
    ("invalid json", b"{not json", 400, None),
    ("body not an object", [1, 2], 400, None),
    ("missing messages", {"model": "tiny"}, 400, "messages"),
    ("empty messages", {"model": "tiny", "messages": []}, 400, "messages"),
    ("messages wrong type", {"model": "tiny", "messages": "hi"}, 400, "messages"),
    ("message not an object", {"model": "tiny", "messages": ["hi"]}, 400, "messages[0]"),
    ("content wrong type", {"model": "tiny", "messages": [{"role": "user", "content": 5}]}, 400,
     "messages[0].content"),
    ("content part of unknown type", {"model": "tiny", "messages": [{"role": "user", "content": [
        {"type": "audio"}]}]}, 400, "messages[0].content[0]"),
    ("unknown role", {"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
    ("model wrong type", {"model": 7, "messages": MESSAGES}, 400, "model"),
    ("unknown model", {"model": "gpt-17", "messages": MESSAGES}, 404, "model"),
    ("max_tokens zero", {"model": "tiny", "messages": MESSAGES, "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens wrong type", {"model": "tiny", "messages": MESSAGES, "max_tokens": "ten"}, 400, "max_tokens"),
    ("negative temperature", {"model": "tiny", "messages": MESSAGES, "temperature": -0.5}, 400, "temperature"),
    ("temperature not finite", b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], '
     b'"temperature": NaN}', 400, "temperature"),
    ("seed wrong type", {"model": "tiny", "messages": MESSAGES, "seed": "x"}, 400, "seed"),
    ("stream wrong type", {"model": "tiny", "messages": MESSAGES, "stream": "yes"}, 400, "stream"),
    ("stream_options wrong type", {"model": "tiny", "messages": MESSAGES, "stream_options": 1}, 400,
     "stream_options"),
    ("too many stop strings", {"model": "tiny", "messages": MESSAGES, "stop": list("abcde")}, 400, "stop"),
    ("n > 16", {"model": "tiny", "messages": MESSAGES, "n": 17}, 400, "n"),
    ("timeout zero", {"model": "tiny", "messages": MESSAGES, "timeout": 0}, 400, "timeout"),
    ("timeout negative", {"model": "tiny", "messages": MESSAGES, "timeout": -5}, 400, "timeout"),
    ("timeout wrong type", {"model": "tiny", "messages": MESSAGES, "timeout": "30s"}, 400, "timeout"),
    ("timeout bool", {"model": "tiny", "messages": MESSAGES, "timeout": True}, 400, "timeout"),
    ("timeout infinite", b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], '
     b'"timeout": Infinity}', 400, "timeout"),
    ("over-large body", {"model": "tiny", "messages": [{"role": "user", "content": "x" * 300_000}]}, 413, None),
]


@pytest.mark.parametrize("name,payload,status,param", BAD, ids=[b[0] for b in BAD])
def test_bad_chat_request_gets_openai_error_and_server_keeps_serving(http, fake, name, payload, status, param):
    if isinstance(payload, bytes):
        r = http.post("/v1/chat/completions", content=payload, headers={"Content-Type": "application/json"})
    else:
        r = http.post("/v1/chat/completions", json=payload)
    assert_openai_error(r, status, param)
    assert fake.requests == {}  # nothing reached the engine
    assert chat(http, max_tokens=3).status_code == 200


BAD_COMPLETIONS = [
    ("missing prompt", {"model": "tiny"}),
    ("empty prompt", {"model": "tiny", "prompt": ""}),
    ("empty token list", {"model": "tiny", "prompt": []}),
    ("bool token id", {"model": "tiny", "prompt": [1, True]}),
    ("several prompts", {"model": "tiny", "prompt": ["a", "b"]}),
]


@pytest.mark.parametrize("name,payload", BAD_COMPLETIONS, ids=[b[0] for b in BAD_COMPLETIONS])
def test_bad_completion_prompt_gets_400(http, fake, name, payload):
    assert_openai_error(http.post("/v1/completions", json=payload), 400, "prompt")
    assert fake.requests == {}


def test_unknown_model_on_completions_gets_404(http):
    err = assert_openai_error(http.post("/v1/completions", json={"model": "gpt-17", "prompt": "x"}), 404, "model")
    assert err["code"] == "model_not_found" and "tiny" in err["message"]


def test_engine_rejecting_the_input_gets_400_with_its_param(http, fake):
    fake.reject = InvalidRequest("prompt (20 tokens) + max_tokens (250) exceeds the context length 256", "max_tokens")
    err = assert_openai_error(chat(http, max_tokens=250), 400, "max_tokens")
    assert "context length" in err["message"] and err["type"] == "invalid_request_error"


def test_body_limit_with_and_without_content_length(http, fake):
    payload = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x" * 300_000}]}).encode()
    r = http.post("/v1/chat/completions", content=payload, headers={"Content-Type": "application/json"})
    err = assert_openai_error(r, 413, code="request_too_large")
    assert f"{len(payload)} bytes" in err["message"]  # refused on the declared length, before reading

    def chunks():  # a chunked body: no Content-Length, refused once what arrived passes the limit
        for i in range(0, len(payload), 16_384):
            yield payload[i:i + 16_384]

    r = http.post("/v1/chat/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert "content-length" not in r.request.headers
    assert assert_openai_error(r, 413, code="request_too_large")["message"] == \
        "request body exceeds the limit of 200000 bytes"
    assert fake.requests == {}


def test_unhandled_error_is_a_500_in_openai_form(make_client, fake, caplog):
    http = make_client(raise_server_exceptions=False)

    def boom(*a, **kw):
        raise RuntimeError("boom at 10.0.3.7")

    fake.add_request = boom
    r = chat(http, headers={"X-Request-Id": "req-boom"})
    err = assert_openai_error(r, 500)
    assert err == {"message": "internal server error (request id req-boom)", "type": "server_error", "param": None,
                   "code": None}
    assert r.headers["x-request-id"] == "req-boom"
    logged = [rec for rec in caplog.records if "req-boom" in rec.getMessage()]
    assert len(logged) == 1 and "boom at 10.0.3.7" in logged[0].exc_text


# ---- engine unavailable ----------------------------------------------------------------------------
def test_full_engine_gets_503_with_retry_after(make_client, fake):
    http = make_client(retry_after_s=2.5)
    fake.refuse = EngineFull("the engine is full: 64 requests already waiting")
    r = chat(http, max_tokens=2)
    err = assert_openai_error(r, 503, code="engine_unavailable")
    assert err["type"] == "server_error" and "too many requests are queued" in err["message"]
    assert err["message"].endswith(f"(request id {r.headers['x-request-id']})")
    assert r.headers["retry-after"] == "3"  # whole seconds, rounded up
    assert http.get("/health").status_code == 200  # full is not unhealthy


def test_unhealthy_engine_gets_503_and_health_says_why(http, fake):
    fake.set_unhealthy("RankFailed: rank 1 failed; Ray: The actor is dead")
    r = http.get("/health")  # the operators' probe keeps the detail
    assert r.status_code == 503 and r.json() == {"status": "unhealthy",
                                                 "error": "RankFailed: rank 1 failed; Ray: The actor is dead"}
    r = chat(http, max_tokens=2)
    err = assert_openai_error(r, 503, code="engine_unavailable")
    assert "temporarily unavailable" in err["message"] and r.headers["retry-after"] == "5"
    assert_no_internals(err["message"])
    assert http.get("/v1/engine/stats").json()["healthy"] is False


# ---- request deadline ------------------------------------------------------------------------------
def test_timeout_reaches_the_engine_from_chat_and_completions(http, fake):
    assert chat(http, max_tokens=2, timeout=1.5).status_code == 200
    assert only_request(fake).timeout_s == 1.5
    fake.requests.clear()
    assert http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "timeout": 30}).status_code == 200
    assert only_request(fake).timeout_s == 30.0
    fake.requests.clear()
    assert chat(http, max_tokens=2).status_code == 200
    assert only_request(fake).timeout_s is None  # the engine's request_deadline_s applies


def test_request_past_its_deadline_gets_504_or_a_timeout_error_event(http, fake, caplog):
    fake.time_out_after = 2
    caplog.set_level("INFO", logger="maverick_ray.serve")
    r = chat(http, max_tokens=10, timeout=3, headers={"X-Request-Id": "slow-1"})
    err = assert_openai_error(r, 504, code="request_timeout")
    assert err == {"message": "the request passed its deadline of 3.0 s (request id slow-1)",
                   "type": "server_error", "param": None, "code": "request_timeout"}
    assert any("slow-1" in rec.getMessage() and "timed out" in rec.getMessage() for rec in caplog.records)
    events = stream_chat(http, max_tokens=10, timeout=3, headers={"X-Request-Id": "slow-2"})
    assert events[-1] == "[DONE]" and len(events) == 1 + 2 + 2  # role chunk, 2 tokens, error, [DONE]
    assert events[-2] == {"error": {"message": "the request passed its deadline of 3.0 s (request id slow-2)",
                                    "type": "server_error", "param": None, "code": "request_timeout"}}
    assert fake.aborted == []  # ended by the engine, not by the client going away


# ---- auth ------------------------------------------------------------------------------------------
def test_api_key_required_when_configured(make_client, fake):
    http = make_client(api_key=API_KEY)
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 2}
    err = assert_openai_error(http.post("/v1/chat/completions", json=body), 401, code="invalid_api_key")
    assert err["type"] == "authentication_error"
    assert_openai_error(http.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer wrong"}), 401)
    assert_openai_error(http.post("/v1/chat/completions", json=body, headers={"Authorization": API_KEY}), 401)
    assert_openai_error(http.post("/v1/completions", json={"prompt": "x"}), 401)
    assert_openai_error(http.get("/v1/models"), 401)
    # auth is checked before the body is read
    assert_openai_error(http.post("/v1/chat/completions", content=b"{not json"), 401)
    assert fake.requests == {}
    assert http.get("/health").status_code == 200  # probes need no key
    ok = http.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"})
    assert ok.status_code == 200, ok.text
    authed = openai_client(http, API_KEY)
    assert authed.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2).choices
    assert [m.id for m in authed.models.list().data] == ["tiny"]
    with pytest.raises(openai.AuthenticationError):
        openai_client(http, "wrong").chat.completions.create(model="tiny", messages=MESSAGES)


# ---- images -------------------------------------------------------------------------------------
def image_message(*urls: str, text: str | None = None) -> list[dict]:
    parts = ([{"type": "text", "text": text}] if text else []) + [
        {"type": "image_url", "image_url": {"url": u}} for u in urls]
    return [{"role": "user", "content": parts}]


def png_url(width: int, height: int, truncate: bool = False) -> str:
    from image_helpers import image_bytes

    png = image_bytes(width, height)
    return "data:image/png;base64," + base64.b64encode(png[: len(png) // 2] if truncate else png).decode()


def test_image_prompt_is_preprocessed_off_the_loop_and_reaches_the_engine(http, fake):
    a = http.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 2,
                                                "messages": image_message(png_url(110, 50), text="What is this?")})
    assert a.status_code == 200, a.text
    b = chat(http, max_tokens=2, messages=[{"role": "user", "content": "What is this?"}])
    assert b.status_code == 200, b.text
    with_image, text_only = list(fake.requests.values())
    assert fake.preprocessed == 1 and with_image.mm_inputs is not None and text_only.mm_inputs is None
    assert len(with_image.prompt_ids) > len(text_only.prompt_ids) + 12  # 3 tiles x 4 patches + markers
    assert a.json()["usage"]["prompt_tokens"] == len(with_image.prompt_ids)


BAD_IMAGES = [
    ("invalid base64", "data:image/png;base64,@@@", "not valid base64"),
    ("non-image data URL", "data:text/plain;base64,aGVsbG8=", "not an image"),
    ("remote URL", "https://example.com/cat.png", "remote image URLs are disabled"),
    ("truncated png", "TRUNCATED", "truncated or corrupt"),
]


@pytest.mark.parametrize("name,url,msg", BAD_IMAGES, ids=[b[0] for b in BAD_IMAGES])
def test_bad_images_get_400(http, fake, name, url, msg):
    if url == "TRUNCATED":
        url = png_url(64, 64, truncate=True)
    r = http.post("/v1/chat/completions", json={"model": "tiny", "messages": image_message(url), "max_tokens": 2})
    err = assert_openai_error(r, 400, "messages", "invalid_image")
    assert msg in err["message"]
    assert fake.requests == {}


def test_too_many_images_get_400(http):
    r = http.post("/v1/chat/completions", json={"model": "tiny", "messages": image_message(*[png_url(20, 20)] * 9),
                                                "max_tokens": 2})
    assert "at most 8" in assert_openai_error(r, 400, "messages")["message"]


def test_images_on_a_text_only_model_get_400(make_client, fake):
    http = make_client(images=False)
    r = http.post("/v1/chat/completions", json={"model": "tiny", "messages": image_message(png_url(20, 20))})
    assert_openai_error(r, 400, "messages", "images_not_supported")
    assert fake.preprocessed == 0


def test_usage_reports_the_prompt_tokens_found_in_the_prefix_cache(fake, make_client):
    fake.cached_tokens = 16
    client = make_client()
    body = client.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 3,
                                                     "messages": [{"role": "user", "content": "hello there"}]}).json()
    assert body["usage"]["prompt_tokens_details"] == {"cached_tokens": 16}
    body = client.post("/v1/completions", json={"model": "tiny", "prompt": "hello", "max_tokens": 3}).json()
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == min(16, body["usage"]["prompt_tokens"])

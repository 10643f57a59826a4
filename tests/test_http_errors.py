"""The HTTP layer's errors, over the in-process fake engine (no model, no Ray): bad requests
(400/404/413 in OpenAI's error shape, nothing reaching the engine), an engine failing a request
(500, or an error event mid-stream, with the internal detail only in the log), an unhandled error,
a full or unhealthy engine (503), request deadlines (the `timeout` field, 504), the API key (401),
and how the official openai client sees these errors.
"""

from __future__ import annotations

import json

import openai
import pytest

import http_helpers
from http_helpers import MESSAGES, assert_openai_error, chat, only_request, openai_client, sse, stream_chat
from maverick_ray.engine.request import EngineFull
from maverick_ray.engine.sampling import InvalidRequest

make_client, http = http_helpers.make_client, http_helpers.http  # the HTTP app fixtures; tokenizer, fake: conftest

API_KEY = "s3cret-test-key"


# ---- the engine failing a request ---------------------------------------------------------------
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


# ---- through the official client ---------------------------------------------------------------
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

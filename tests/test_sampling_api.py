"""Sampling parameters, logprobs, n and response_format through the HTTP layer over the fake
engine (no model): what reaches the engine, the OpenAI reply shapes (streaming and not, the
openai SDK included), and a 400 in OpenAI's error shape for each bad value."""

from __future__ import annotations

import json

import pytest

from fake_engine import FakeEngine, FakeStream
from maverick_ray.engine.sampling import TokenLogprobs
import http_helpers
from http_helpers import MESSAGES, assert_openai_error, chat, openai_client, sse, stream_chat

# The HTTP tests' fixtures: a client over the fake engine.
make_client, http = http_helpers.make_client, http_helpers.http  # the HTTP app fixtures; tokenizer, fake: conftest


def fake_logprobs(token: int, k: int) -> TokenLogprobs:
    """A made-up but recognisable distribution: the token first, then its neighbours."""
    return TokenLogprobs(-0.01 * (token % 7) - 0.1, [(token + j, -0.1 - j) for j in range(k)])


class LogprobStream(FakeStream):
    def _event(self, token, text, reason=None, error=None):
        ev = super()._event(token, text, reason, error)
        k = self.req.params.logprobs
        if token is not None and k is not None:
            ev.logprobs = fake_logprobs(token, k)
        return ev


@pytest.fixture
def lp_fake(fake, monkeypatch):
    add = FakeEngine.add_request

    def add_request(self, *a, **kw):
        stream = add(self, *a, **kw)
        stream.__class__ = LogprobStream
        return stream
    monkeypatch.setattr(FakeEngine, "add_request", add_request)
    return fake


def test_chat_logprobs_shape(http, lp_fake, tokenizer):
    r = chat(http, max_tokens=6, logprobs=True, top_logprobs=3)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    ids = lp_fake.reply_ids(6)
    content = choice["logprobs"]["content"]
    assert [e["token"] for e in content] == [tokenizer.decode([t], skip_special_tokens=False) for t in ids]
    assert "".join(e["token"] for e in content) == choice["message"]["content"]
    for e, t in zip(content, ids):
        assert set(e) == {"token", "logprob", "bytes", "top_logprobs"}
        assert e["logprob"] == pytest.approx(fake_logprobs(t, 3).logprob)
        assert e["bytes"] == list(e["token"].encode())
        assert len(e["top_logprobs"]) == 3 and set(e["top_logprobs"][0]) == {"token", "logprob", "bytes"}
        assert e["top_logprobs"][1]["logprob"] == pytest.approx(-1.1)
    assert list(lp_fake.requests.values())[-1].params.logprobs == 3
    # Without logprobs: null, and nothing asked of the engine.
    r = chat(http, max_tokens=2)
    assert r.json()["choices"][0]["logprobs"] is None
    assert list(lp_fake.requests.values())[-1].params.logprobs is None


def test_chat_logprobs_stream_carry_one_entry_per_token(http, lp_fake):
    whole = chat(http, max_tokens=5, logprobs=True, top_logprobs=1).json()["choices"][0]["logprobs"]["content"]
    events = stream_chat(http, max_tokens=5, logprobs=True, top_logprobs=1)
    streamed = [e for c in events[:-1] if c["choices"] and c["choices"][0]["logprobs"]
                for e in c["choices"][0]["logprobs"]["content"]]
    assert streamed == whole
    assert all(len(c["choices"][0]["logprobs"]["content"]) == 1 for c in events[:-1]
               if c["choices"] and c["choices"][0]["logprobs"])


def test_openai_sdk_reads_chat_logprobs(http, lp_fake):
    resp = openai_client(http).chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4, logprobs=True,
                                                       top_logprobs=2)
    lp = resp.choices[0].logprobs.content
    assert len(lp) == 4 and len(lp[0].top_logprobs) == 2 and lp[0].token == lp[0].top_logprobs[0].token


def test_completion_logprobs_shape_streaming_and_not(http, lp_fake):
    body = {"model": "tiny", "prompt": "Once upon", "max_tokens": 5, "logprobs": 2}
    choice = http.post("/v1/completions", json=body).json()["choices"][0]
    lp = choice["logprobs"]
    assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 5
    assert "".join(lp["tokens"]) == choice["text"]
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(5)]
    assert all(isinstance(d, dict) and 1 <= len(d) <= 2 for d in lp["top_logprobs"])
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        events = sse(r)
    tokens = [t for c in events[:-1] if c["choices"][0]["logprobs"] for t in c["choices"][0]["logprobs"]["tokens"]]
    offsets = [o for c in events[:-1] if c["choices"][0]["logprobs"] for o in c["choices"][0]["logprobs"]["text_offset"]]
    assert tokens == lp["tokens"] and offsets == lp["text_offset"]


def test_n_choices_each_with_its_own_seed(http, fake):
    r = chat(http, max_tokens=3, n=3, seed=7, temperature=0.8)
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    reqs = list(fake.requests.values())
    assert [q.params.seed for q in reqs] == [7, 8, 9]
    assert len({q.request_id for q in reqs}) == 3 and all(q.prompt_ids == reqs[0].prompt_ids for q in reqs)
    assert body["usage"]["completion_tokens"] == 9 and body["usage"]["prompt_tokens"] == len(reqs[0].prompt_ids)
    events = stream_chat(http, max_tokens=2, n=2, stream_options={"include_usage": True})
    finishes = {c["choices"][0]["index"]: c["choices"][0]["finish_reason"] for c in events[:-2]
                if c["choices"][0]["finish_reason"]}
    assert finishes == {0: "length", 1: "length"}
    roles = [c["choices"][0]["index"] for c in events if c != "[DONE]" and c["choices"]
             and c["choices"][0]["delta"].get("role")]
    assert roles == [0, 1]
    assert events[-2]["usage"]["completion_tokens"] == 4 and events[-1] == "[DONE]"


def test_sampling_fields_reach_the_engine(http, fake):
    r = chat(http, max_tokens=5, presence_penalty=0.5, frequency_penalty=-0.25, repetition_penalty=1.2, min_p=0.05,
             logit_bias={"17": 5, "3": -100}, stop_token_ids=[9], ignore_eos=True, min_tokens=2, top_k=4)
    assert r.status_code == 200, r.text
    p = list(fake.requests.values())[-1].params
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty, p.min_p) == (0.5, -0.25, 1.2, 0.05)
    assert p.logit_bias == {17: 5.0, 3: -100.0} and p.stop_token_ids == [9] and p.ignore_eos and p.min_tokens == 2
    # top_p 0 is vLLM's greedy-only value: accepted with temperature 0, refused for sampling.
    assert chat(http, max_tokens=2, temperature=0, top_p=0).status_code == 200
    assert list(fake.requests.values())[-1].params.top_p == 0


def test_structured_output_fields_become_a_guide(make_client, fake):
    http = make_client(max_model_len=2048)   # tools make a long prompt
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    chat(http, max_tokens=2, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    g = list(fake.requests.values())[-1].params.guide
    assert g.kind == "json_schema" and json.loads(g.value) == schema
    chat(http, max_tokens=2, response_format={"type": "json_object"})
    assert list(fake.requests.values())[-1].params.guide.kind == "json_object"
    chat(http, max_tokens=2, response_format={"type": "text"})
    assert list(fake.requests.values())[-1].params.guide is None
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": schema}},
             {"type": "function", "function": {"name": "get_time"}}]
    r = chat(http, max_tokens=2, tools=tools, tool_choice="required")
    assert r.status_code == 200, r.text
    g = json.loads(list(fake.requests.values())[-1].params.guide.value)
    assert g["type"] == "array" and g["minItems"] == 1 and len(g["items"]["anyOf"]) == 2
    chat(http, max_tokens=2, tools=tools, tool_choice={"type": "function", "function": {"name": "get_time"}})
    g = json.loads(list(fake.requests.values())[-1].params.guide.value)
    assert g["maxItems"] == 1 and g["items"]["properties"]["name"] == {"const": "get_time"}
    chat(http, max_tokens=2, tools=tools)   # auto: free
    assert list(fake.requests.values())[-1].params.guide is None


BAD = [
    ("top_p 0 when sampling", {"top_p": 0, "temperature": 0.7}, "top_p"),
    ("top_logprobs without logprobs", {"top_logprobs": 2}, "top_logprobs"),
    ("top_logprobs over 20", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("logprobs not a boolean", {"logprobs": 3}, "logprobs"),
    ("presence_penalty out of range", {"presence_penalty": 2.5}, "presence_penalty"),
    ("frequency_penalty wrong type", {"frequency_penalty": "high"}, "frequency_penalty"),
    ("repetition_penalty zero", {"repetition_penalty": 0}, "repetition_penalty"),
    ("min_p over 1", {"min_p": 1.5}, "min_p"),
    ("logit_bias key not an id", {"logit_bias": {"hello": 1}}, "logit_bias"),
    ("logit_bias value out of range", {"logit_bias": {"5": 101}}, "logit_bias"),
    ("logit_bias not an object", {"logit_bias": [1, 2]}, "logit_bias"),
    ("stop_token_ids not ids", {"stop_token_ids": ["a"]}, "stop_token_ids"),
    ("ignore_eos not a boolean", {"ignore_eos": "yes"}, "ignore_eos"),
    ("min_tokens negative", {"min_tokens": -1}, "min_tokens"),
    ("min_tokens over max_tokens", {"min_tokens": 9, "max_tokens": 3}, "min_tokens"),
    ("n zero", {"n": 0}, "n"),
    ("response_format unknown type", {"response_format": {"type": "yaml"}}, "response_format"),
    ("json_schema without schema object", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": "{}"}}}, "response_format.json_schema.schema"),
    ("json_schema that does not compile", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}, "required": ["a"]}}}},
     "response_format.json_schema.schema"),
    ("response_format with forced tool call", {
        "response_format": {"type": "json_object"}, "tool_choice": "required",
        "tools": [{"type": "function", "function": {"name": "f"}}]}, "response_format"),
]


@pytest.mark.parametrize("name,extra,param", BAD, ids=[b[0] for b in BAD])
def test_bad_sampling_values_get_400(http, fake, name, extra, param):
    r = http.post("/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES, **extra})
    assert_openai_error(r, 400, param)
    assert fake.requests == {}
    assert chat(http, max_tokens=2).status_code == 200


def test_bad_completion_logprobs_get_400(http, fake):
    for v in (21, -1, "3", True):
        r = http.post("/v1/completions", json={"model": "tiny", "prompt": "x", "logprobs": v})
        assert_openai_error(r, 400, "logprobs")
    assert fake.requests == {}

"""Strict request bodies over the Serve-free HTTP layer and the fake engine (tests/fake_engine.py):
every unknown field gets a 400 naming it, the documented no-op fields are accepted, and a long
list of bad values gets a 4xx in OpenAI's error shape while the server keeps serving.
"""

from __future__ import annotations

import json

import openai
import pytest
from fastapi.testclient import TestClient

from fake_engine import FakeEngine
from maverick_ray.serve.http_api import Backend, make_api
from maverick_ray.serve.openai_service import OpenAIService
from maverick_ray.serve.request_fields import (CHAT_FIELDS, COMPLETION_FIELDS, DETOKENIZE_FIELDS, NO_OP_FIELDS,
                                               TOKENIZE_FIELDS)
from maverick_ray.serve.settings import API_KEY_ENV, ServeSettings

MESSAGES = [{"role": "user", "content": "Name three experts."}]
ANY = object()   # any `param`


@pytest.fixture
def http(fake, tiny_ckpt, tokenizer, monkeypatch):
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    settings = ServeSettings.from_args({"model": str(tiny_ckpt), "served_model_name": "tiny", "ep_size": 1,
                                        "max_model_len": 256, "default_max_tokens": 8,
                                        "max_request_bytes": 200_000})
    fake.max_model_len = 256
    backend = Backend(OpenAIService(fake, tokenizer, settings, "tiny"))
    with TestClient(make_api(lambda: backend)) as client:
        yield client


def openai_client(http: TestClient) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0)


def assert_openai_error(r, status: int, param=ANY, code=None) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and len(err["message"]) > 10
    assert err["type"] in ("invalid_request_error", "authentication_error"), err
    if param is not ANY:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


def assert_still_serving(http: TestClient, fake: FakeEngine) -> None:
    fake.requests.clear()
    r = http.post("/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES, "max_tokens": 3})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == fake.reply_text(3)
    with http.stream("POST", "/v1/completions", json={"prompt": "hi", "max_tokens": 2, "stream": True}) as s:
        assert s.status_code == 200 and b"[DONE]" in s.read()


# ---- unknown fields ----------------------------------------------------------------------------
UNKNOWN = ["foo", "temprature", "Temperature", "max_token", "functions", "function_call", "best_of", "echo",
           "suffix", "reasoning_effort", "modalities", "audio", "prediction", "web_search_options", "verbosity",
           "guided_json", "use_beam_search", "skip_special_tokens", "include_stop_str_in_output", "priority"]
ROUTES = {"/v1/chat/completions": {"model": "tiny", "messages": MESSAGES, "max_tokens": 2},
          "/v1/completions": {"model": "tiny", "prompt": "Hi", "max_tokens": 2},
          "/tokenize": {"model": "tiny", "prompt": "Hi"},
          "/detokenize": {"model": "tiny", "tokens": [5, 6]}}


@pytest.mark.parametrize("route", list(ROUTES))
@pytest.mark.parametrize("field", UNKNOWN)
def test_every_unknown_field_gets_a_400_naming_it(http, fake, route, field):
    r = http.post(route, json={**ROUTES[route], field: 1})
    err = assert_openai_error(r, 400, field, "unknown_parameter")
    assert repr(field) in err["message"]
    assert fake.requests == {}


def test_fields_of_the_other_route_are_unknown_and_all_unknown_fields_are_named(http, fake):
    assert_openai_error(http.post("/v1/completions", json={**ROUTES["/v1/completions"], "messages": MESSAGES}),
                        400, "messages", "unknown_parameter")
    assert_openai_error(http.post("/v1/chat/completions", json={**ROUTES["/v1/chat/completions"], "prompt": "x"}),
                        400, "prompt", "unknown_parameter")
    assert_openai_error(http.post("/detokenize", json={"tokens": [1], "user": "u"}), 400, "user")  # no no-ops there
    err = assert_openai_error(http.post("/v1/chat/completions", json={**ROUTES["/v1/chat/completions"],
                                                                      "zeta": 1, "alpha": 2}), 400, "zeta")
    assert "'zeta', 'alpha'" in err["message"]
    assert fake.requests == {}
    assert_still_serving(http, fake)


def test_unknown_field_through_the_openai_client(http, fake):
    client = openai_client(http)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=MESSAGES, extra_body={"guided_json": {}})
    assert e.value.code == "unknown_parameter" and e.value.param == "guided_json"
    with pytest.raises(openai.BadRequestError, match="'echo'"):
        client.completions.create(model="tiny", prompt="Hi", echo=True)
    assert fake.requests == {}


FIELDS_BEING_ADDED = {"logprobs", "top_logprobs", "presence_penalty", "frequency_penalty", "repetition_penalty",
                      "min_p", "logit_bias", "stop_token_ids", "ignore_eos", "min_tokens", "n", "seed",
                      "response_format", "tools", "tool_choice", "parallel_tool_calls", "chat_template_kwargs",
                      "add_generation_prompt", "continue_final_message", "timeout"}


def test_every_known_field_is_not_refused_as_unknown(http):
    """Each known field, sent as null (treated as absent), never draws an unknown-field 400."""
    assert FIELDS_BEING_ADDED <= CHAT_FIELDS
    assert FIELDS_BEING_ADDED - {"top_logprobs", "tools", "tool_choice", "parallel_tool_calls",
                                 "chat_template_kwargs", "add_generation_prompt",
                                 "continue_final_message"} <= COMPLETION_FIELDS
    cases = [("/v1/chat/completions", CHAT_FIELDS), ("/v1/completions", COMPLETION_FIELDS),
             ("/tokenize", TOKENIZE_FIELDS), ("/detokenize", DETOKENIZE_FIELDS)]
    for route, fields in cases:
        for name in sorted(fields):
            r = http.post(route, json={**ROUTES[route], name: None})
            assert r.status_code == 200 or r.json()["error"]["code"] != "unknown_parameter", (route, name, r.text)


def test_no_op_fields_are_accepted_and_change_nothing(http, fake):
    no_ops = {"user": "user-1234", "safety_identifier": "h4sh", "metadata": {"team": "search"}, "store": False,
              "service_tier": "auto", "prompt_cache_key": "k"}
    assert set(no_ops) == set(NO_OP_FIELDS)
    plain = http.post("/v1/chat/completions", json={**ROUTES["/v1/chat/completions"], "seed": 3}).json()
    r = http.post("/v1/chat/completions", json={**ROUTES["/v1/chat/completions"], "seed": 3, **no_ops})
    assert r.status_code == 200, r.text
    assert r.json()["choices"] == plain["choices"]
    a, b = list(fake.requests.values())
    assert a.params == b.params and a.prompt_ids == b.prompt_ids
    assert http.post("/v1/completions", json={**ROUTES["/v1/completions"], **no_ops}).status_code == 200
    reply = openai_client(http).chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2, user="u1",
                                                        metadata={"a": "b"}, store=False)
    assert reply.choices[0].message.content == fake.reply_text(2)


# ---- bad values ----------------------------------------------------------------------------------
def chat_body(**kw) -> dict:
    return {"model": "tiny", "messages": MESSAGES, "max_tokens": 2, **kw}


def completion_body(**kw) -> dict:
    return {"model": "tiny", "prompt": "Hi", "max_tokens": 2, **kw}


C, P = "/v1/chat/completions", "/v1/completions"
BAD_VALUES = [
    # (name, route, body, status, param)
    ("temperature a string", C, chat_body(temperature="hot"), 400, "temperature"),
    ("temperature above 2", C, chat_body(temperature=2.5), 400, "temperature"),
    ("temperature a list", C, chat_body(temperature=[1]), 400, "temperature"),
    ("top_p above 1", C, chat_body(top_p=1.5), 400, "top_p"),
    ("top_p negative", C, chat_body(top_p=-0.1), 400, "top_p"),
    ("top_p a bool", C, chat_body(top_p=True), 400, "top_p"),
    ("top_k negative", C, chat_body(top_k=-1), 400, "top_k"),
    ("top_k fractional", C, chat_body(top_k=1.5), 400, "top_k"),
    ("top_k a string", C, chat_body(top_k="5"), 400, "top_k"),
    ("max_tokens negative", C, chat_body(max_tokens=-1), 400, "max_tokens"),
    ("max_tokens fractional", C, chat_body(max_tokens=1.5), 400, "max_tokens"),
    ("max_tokens a bool", C, chat_body(max_tokens=True), 400, "max_tokens"),
    ("max_tokens a string", C, chat_body(max_tokens="10"), 400, "max_tokens"),
    ("max_tokens huge", C, chat_body(max_tokens=10**9), 400, "max_tokens"),
    ("max_tokens beyond the context", C, chat_body(max_tokens=256), 400, "max_tokens"),
    ("max_completion_tokens zero", C, chat_body(max_completion_tokens=0), 400, "max_completion_tokens"),
    ("n zero", C, chat_body(n=0), 400, "n"),
    ("n a string", C, chat_body(n="2"), 400, "n"),
    ("seed fractional", C, chat_body(seed=1.5), 400, "seed"),
    ("stop a number", C, chat_body(stop=5), 400, "stop"),
    ("stop a list of numbers", C, chat_body(stop=[1, 2]), 400, "stop"),
    ("stop an empty string", C, chat_body(stop=[""]), 400, "stop"),
    ("stream a string", C, chat_body(stream="true"), 400, "stream"),
    ("stream_options without stream", C, chat_body(stream_options={"include_usage": True}), 400, "stream_options"),
    ("stream_options.include_usage a string", C, chat_body(stream=True, stream_options={"include_usage": "yes"}),
     400, "stream_options.include_usage"),
    ("stream_options unknown key", C, chat_body(stream=True, stream_options={"continuous_usage_stats": True}),
     400, "stream_options.continuous_usage_stats"),
    ("timeout negative", C, chat_body(timeout=-1), 400, "timeout"),
    ("timeout zero", C, chat_body(timeout=0), 400, "timeout"),
    ("timeout a string", C, chat_body(timeout="soon"), 400, "timeout"),
    ("model a number", C, chat_body(model=5), 400, "model"),
    ("unknown model", C, chat_body(model="gpt-17"), 404, "model"),
    ("messages empty", C, chat_body(messages=[]), 400, "messages"),
    ("messages missing", C, {"model": "tiny"}, 400, "messages"),
    ("messages a string", C, chat_body(messages="hi"), 400, "messages"),
    ("message null", C, chat_body(messages=[None]), 400, "messages[0]"),
    ("role unknown", C, chat_body(messages=[{"role": "robot", "content": "x"}]), 400, "messages[0].role"),
    ("role missing", C, chat_body(messages=[{"content": "x"}]), 400, "messages[0].role"),
    ("role a number", C, chat_body(messages=[{"role": 1, "content": "x"}]), 400, "messages[0].role"),
    ("user content missing", C, chat_body(messages=[{"role": "user"}]), 400, "messages[0].content"),
    ("content a number", C, chat_body(messages=[{"role": "user", "content": 5}]), 400, "messages[0].content"),
    ("text part without text", C, chat_body(messages=[{"role": "user", "content": [{"type": "text"}]}]), 400,
     "messages[0].content[0].text"),
    ("part of unknown type", C, chat_body(messages=[{"role": "user", "content": [{"type": "video"}]}]), 400,
     "messages[0].content[0]"),
    ("tool_call_id a number", C, chat_body(messages=MESSAGES + [{"role": "tool", "content": "x", "tool_call_id": 5}]),
     400, "messages[1].tool_call_id"),
    ("tool_calls on a user message", C, chat_body(messages=[{"role": "user", "content": "x", "tool_calls": []}]),
     400, "messages[0].tool_calls"),
    ("tools not a list", C, chat_body(tools="x"), 400, "tools"),
    ("tool without a function", C, chat_body(tools=[{"type": "function"}]), 400, "tools[0]"),
    ("tool_choice unknown", C, chat_body(tool_choice="sometimes"), 400, "tool_choice"),
    ("tool_choice required without tools", C, chat_body(tool_choice="required"), 400, "tool_choice"),
    ("parallel_tool_calls a string", C, chat_body(parallel_tool_calls="yes"), 400, "parallel_tool_calls"),
    ("chat_template_kwargs a list", C, chat_body(chat_template_kwargs=[]), 400, "chat_template_kwargs"),
    ("add_generation_prompt with continue_final_message", C,
     chat_body(add_generation_prompt=True, continue_final_message=True), 400, "continue_final_message"),
    ("user a number", C, chat_body(user=5), 400, "user"),
    ("metadata a string", C, chat_body(metadata="x"), 400, "metadata"),
    ("metadata with a number", C, chat_body(metadata={"a": 1}), 400, "metadata"),
    ("store a string", C, chat_body(store="yes"), 400, "store"),
    ("service_tier a number", C, chat_body(service_tier=1), 400, "service_tier"),
    ("prompt missing", P, {"model": "tiny"}, 400, "prompt"),
    ("prompt empty", P, completion_body(prompt=""), 400, "prompt"),
    ("prompt an object", P, completion_body(prompt={"text": "x"}), 400, "prompt"),
    ("prompt of bools", P, completion_body(prompt=[True]), 400, "prompt"),
    ("prompt id negative", P, completion_body(prompt=[-1]), 400, "prompt"),
    ("prompt id beyond the vocabulary", P, completion_body(prompt=[10**9]), 400, "prompt"),
    ("prompt beyond the context", P, completion_body(prompt=[5] * 300), 400, ANY),
    ("completion temperature a string", P, completion_body(temperature="0.5"), 400, "temperature"),
    ("completion timeout negative", P, completion_body(timeout=-3), 400, "timeout"),
    ("completion max_tokens huge", P, completion_body(max_tokens=2**40), 400, "max_tokens"),
]


@pytest.mark.parametrize("name,route,body,status,param", BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_bad_values_get_a_4xx_in_openai_shape_and_the_server_keeps_serving(http, fake, name, route, body,
                                                                            status, param):
    assert_openai_error(http.post(route, json=body), status, param)
    assert fake.requests == {}   # nothing was queued
    assert_still_serving(http, fake)


BAD_BODIES = [b"", b"{not json", b"[1, 2]", b'"a string"', b"null", b"42", b'{"messages": [{"role": "user", '
              b'"content": "x"}], "temperature": NaN}', "\udcff".encode("utf-8", "surrogatepass")]


@pytest.mark.parametrize("route", [C, P, "/tokenize", "/detokenize"])
def test_bodies_that_are_not_json_objects_get_400(http, fake, route):
    for raw in BAD_BODIES:
        r = http.post(route, content=raw, headers={"Content-Type": "application/json"})
        assert_openai_error(r, 400)
    assert fake.requests == {}
    assert_still_serving(http, fake)


def test_bad_values_through_the_openai_client(http, fake):
    client = openai_client(http)
    for kwargs, param in [({"temperature": 3}, "temperature"), ({"max_tokens": 10**9}, "max_tokens"),
                          ({"messages": []}, "messages"), ({"extra_body": {"timeout": -1}}, "timeout"),
                          ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
                          ({"stop": [""]}, "stop"), ({"user": 5}, "user")]:
        kwargs = {"model": "tiny", "messages": MESSAGES, "max_tokens": 2, **kwargs}
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(**kwargs)
        assert e.value.status_code == 400 and e.value.param == param, (kwargs, e.value.body)
    assert fake.requests == {}
    assert client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2).choices[0].message.content


def test_body_and_parameter_names_survive_json_round_trip():
    """The error lists are JSON bodies as a client would send them (no Python-only values)."""
    for _, _, body, _, _ in BAD_VALUES:
        assert json.loads(json.dumps(body)) == body

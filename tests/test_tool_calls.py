"""Tool calling through the official openai client over the HTTP layer, the engine replaced by the
fake (tests/fake_engine.py) scripted to answer with a Llama 4 pythonic call: tool_calls with
parsed arguments and finish_reason "tool_calls", streamed as OpenAI streams them; malformed
calls as content; tool_choice and parallel_tool_calls; bad tool fields get a 400. The same on the
real engine through Ray Serve is in test_serve_api.py.
"""

from __future__ import annotations

import json

import openai
import pytest
from fastapi.testclient import TestClient

from maverick_ray.serve.http_api import Backend, make_api
from maverick_ray.serve.openai_service import OpenAIService
from maverick_ray.serve.settings import ServeSettings

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
TOOLS = [WEATHER, TIME]
ASK = [{"role": "user", "content": "Weather in Paris and the time in CET?"}]
TWO_CALLS = '[get_weather(city="Paris"), get_time(zone="CET")]'


@pytest.fixture
def http(fake, tiny_ckpt, tokenizer):
    settings = ServeSettings.from_args({"model": str(tiny_ckpt), "ep_size": 1, "max_model_len": 2048,
                                        "default_max_tokens": 64})
    fake.max_model_len = settings.engine().max_model_len  # as an engine resolves an explicit one
    with TestClient(make_api(lambda: Backend(OpenAIService(fake, tokenizer, settings, "tiny")))) as client:
        yield client


@pytest.fixture
def client(http):
    return openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0)


def reply(fake, tokenizer, text: str) -> None:
    """The fake engine answers `text`, then <|eot|>."""
    fake.script = tokenizer.encode(text) + [tokenizer.special_id("<|eot|>")]


def test_tool_calls_come_back_parsed(client, fake, tokenizer):
    reply(fake, tokenizer, TWO_CALLS)
    r = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = choice.message.tool_calls
    assert [(c.type, c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("function", "get_weather", {"city": "Paris"}), ("function", "get_time", {"zone": "CET"})]
    assert len({c.id for c in calls}) == 2
    # the tools reached the prompt through the template (tool_choice defaults to auto)
    prompt = list(fake.requests.values())[-1].prompt_ids
    assert prompt == tokenizer.apply_chat_template(ASK, tools=TOOLS)
    assert "get_weather" in tokenizer.decode(prompt)


def test_tool_calls_stream_as_openai_streams_them(client, fake, tokenizer):
    reply(fake, tokenizer, "<|python_start|>" + TWO_CALLS + "<|python_end|>")
    chunks = list(client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    tool_deltas = [tc for d in deltas for tc in (d.tool_calls or [])]
    heads = [tc for tc in tool_deltas if tc.id]
    assert [(h.index, h.type, h.function.name, h.function.arguments) for h in heads] == [
        (0, "function", "get_weather", ""), (1, "function", "get_time", "")]
    args = {0: "", 1: ""}
    for tc in tool_deltas:
        args[tc.index] += tc.function.arguments or ""
    assert {i: json.loads(a) for i, a in args.items()} == {0: {"city": "Paris"}, 1: {"zone": "CET"}}
    assert "".join(d.content or "" for d in deltas) == ""
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    # that each call goes out as soon as it closes is tested on the parser (test_tool_parser.py)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_malformed_call_is_content_not_an_error(client, fake, tokenizer, stream):
    text = "[get_weather(city=Paris)]"
    reply(fake, tokenizer, text)
    r = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, stream=stream)
    if stream:
        chunks = list(r)
        content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert not any(c.choices[0].delta.tool_calls for c in chunks if c.choices)
        reason = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason][0]
    else:
        content, reason = r.choices[0].message.content, r.choices[0].finish_reason
        assert r.choices[0].message.tool_calls is None
    assert (content, reason) == (text, "stop")


def test_tool_choice_and_parallel_tool_calls(client, fake, tokenizer):
    reply(fake, tokenizer, TWO_CALLS)
    none = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="none")
    assert none.choices[0].message.content == TWO_CALLS and none.choices[0].finish_reason == "stop"
    one = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, parallel_tool_calls=False)
    assert [c.function.name for c in one.choices[0].message.tool_calls] == ["get_weather"]
    named = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}})
    # only get_weather may be called: the call to get_time (and what follows it) is content
    assert [c.function.name for c in named.choices[0].message.tool_calls] == ["get_weather"]
    assert named.choices[0].message.content == 'get_time(zone="CET")]'
    required = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required")
    assert len(required.choices[0].message.tool_calls) == 2
    no_tools = client.chat.completions.create(model="tiny", messages=ASK)
    assert no_tools.choices[0].message.content == TWO_CALLS


def test_a_conversation_with_tool_results_goes_on(client, fake, tokenizer):
    reply(fake, tokenizer, "It is sunny.")
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_a", "content": "sunny"}]
    r = client.chat.completions.create(model="tiny", messages=history, tools=TOOLS)
    assert r.choices[0].message.content == "It is sunny." and r.choices[0].finish_reason == "stop"
    text = tokenizer.decode(list(fake.requests.values())[-1].prompt_ids, skip_special_tokens=False)
    assert '[get_weather(city="Paris")]<|eot|><|header_start|>ipython<|header_end|>\n\nsunny<|eot|>' in text


BAD = [
    ({"tools": {"type": "function"}}, "tools"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0]"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools[0].function.name"),
    ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]}, "tools[0].function.parameters"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ({"chat_template_kwargs": [1]}, "chat_template_kwargs"),
    ({"add_generation_prompt": "no"}, "add_generation_prompt"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "messages[0].tool_calls"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f"}}]}]},
     "messages[0].tool_calls[0]"),
]


@pytest.mark.parametrize("fields,param", BAD, ids=[b[1] + str(i) for i, b in enumerate(BAD)])
def test_bad_tool_fields_get_400_naming_the_field(http, fields, param):
    r = http.post("/v1/chat/completions", json={"model": "tiny", "messages": ASK, "max_tokens": 2, **fields})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error", err

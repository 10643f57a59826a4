"""Structured output and n through the HTTP layer over the real engine (no Serve), random weights:
every json_schema output validates (jsonschema), streaming and not; json_object outputs are JSON
objects; tool_choice "required" / a named function yields a valid call to a declared function;
n = 3 with a seed gives three reproducible choices."""

from __future__ import annotations

import json

import jsonschema
import pytest
from fastapi.testclient import TestClient

from maverick_ray.config import EngineConfig, ParallelConfig
from maverick_ray.engine.engine import Engine
from maverick_ray.serve.http_api import Backend, make_api
from maverick_ray.serve.openai_service import OpenAIService
from maverick_ray.serve.settings import API_KEY_ENV, ServeSettings

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 6},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
        "hourly": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    },
    "required": ["city", "unit", "days", "hourly"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 5},
                                         "unit": {"enum": ["c", "f"]}},
        "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
        "additionalProperties": False}}},
]
MESSAGES = [{"role": "user", "content": "Weather in Paris for the next days, as JSON."}]


def client_for(ckpt, eng: Engine, monkeypatch) -> TestClient:
    from maverick_ray.checkpoint.tokenizer import ChatTokenizer

    monkeypatch.delenv(API_KEY_ENV, raising=False)
    settings = ServeSettings.from_args({"model": str(ckpt), "served_model_name": "tiny", "ep_size": 1,
                                        "max_model_len": 2048, "default_max_tokens": 16})
    backend = Backend(OpenAIService(eng, eng.tokenizer, settings, "tiny"), None)
    assert isinstance(eng.tokenizer, ChatTokenizer)
    return TestClient(make_api(lambda: backend))


@pytest.fixture(scope="module")
def engine(tiny_ckpt):
    from maverick_ray.checkpoint.tokenizer import ChatTokenizer

    eng = Engine(tiny_ckpt, ParallelConfig(ep_size=1), EngineConfig(max_num_seqs=16, max_model_len=2048),
                 tokenizer=ChatTokenizer.from_pretrained(tiny_ckpt)).start()
    yield eng
    eng.shutdown()


def streamed_text(http: TestClient, body: dict) -> tuple[str, str]:
    with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    reason = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    return text, reason[-1]


def schema_body(seed: int) -> dict:
    return {"model": "tiny", "messages": MESSAGES, "temperature": 1.0, "seed": seed, "max_tokens": 120,
            "response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": SCHEMA, "strict": True}}}


def test_json_schema_outputs_validate_streaming_and_not(tiny_ckpt, engine, monkeypatch):
    http = client_for(tiny_ckpt, engine, monkeypatch)
    for seed in range(20):
        r = http.post("/v1/chat/completions", json=schema_body(seed))
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "stop", choice
        out = json.loads(choice["message"]["content"])
        jsonschema.validate(out, SCHEMA)
        text, reason = streamed_text(http, schema_body(seed))
        assert reason == "stop" and text == choice["message"]["content"]  # same seed, same output
    # Unconstrained, the same seeds do not give JSON: the grammar is what made the outputs valid.
    free = [http.post("/v1/chat/completions", json={**schema_body(s), "response_format": None,
                                                   "max_tokens": 30}).json()["choices"][0]["message"]["content"]
            for s in range(3)]
    assert not any(_is_json(t) for t in free)


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


def test_json_object_outputs_are_objects(tiny_ckpt, engine, monkeypatch):
    http = client_for(tiny_ckpt, engine, monkeypatch)
    for seed in range(4):
        r = http.post("/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES, "seed": seed,
                                                    "temperature": 0.7, "max_tokens": 200,
                                                    "response_format": {"type": "json_object"}})
        choice = r.json()["choices"][0]
        if choice["finish_reason"] == "stop":
            assert isinstance(json.loads(choice["message"]["content"]), dict)
        else:  # free strings in a random model's JSON can outrun max_tokens; it is still a prefix
            assert choice["message"]["content"].startswith("{")


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_forced_tool_choice_yields_a_valid_call(tiny_ckpt, engine, monkeypatch, tool_choice):
    http = client_for(tiny_ckpt, engine, monkeypatch)
    declared = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for seed in range(5):
        # One call: a random model's list of parallel calls may go on until max_tokens.
        body = {"model": "tiny", "messages": MESSAGES, "tools": TOOLS, "tool_choice": tool_choice, "seed": seed,
                "temperature": 1.0, "max_tokens": 120, "parallel_tool_calls": False}
        choice = http.post("/v1/chat/completions", json=body).json()["choices"][0]
        assert choice["finish_reason"] == "tool_calls", choice
        calls = choice["message"]["tool_calls"]
        assert calls
        for c in calls:
            assert c["function"]["name"] in declared
            jsonschema.validate(json.loads(c["function"]["arguments"]), declared[c["function"]["name"]])
        if isinstance(tool_choice, dict):
            assert [c["function"]["name"] for c in calls] == ["get_time"]


def test_n3_with_seed_gives_three_reproducible_choices(tiny_ckpt, engine, monkeypatch):
    http = client_for(tiny_ckpt, engine, monkeypatch)
    body = {"model": "tiny", "messages": MESSAGES, "n": 3, "seed": 42, "temperature": 1.0, "max_tokens": 10,
            "ignore_eos": True}
    first = [c["message"]["content"] for c in http.post("/v1/chat/completions", json=body).json()["choices"]]
    again = [c["message"]["content"] for c in http.post("/v1/chat/completions", json=body).json()["choices"]]
    assert first == again and len(set(first)) == 3
    alone = [http.post("/v1/chat/completions", json={**body, "n": 1, "seed": 42 + i}).json()["choices"][0]
             ["message"]["content"] for i in range(3)]
    assert alone == first


def test_structured_output_under_expert_parallelism(tiny_ckpt, ray_local, monkeypatch):
    from maverick_ray.checkpoint.tokenizer import ChatTokenizer

    with Engine(tiny_ckpt, ParallelConfig(ep_size=2), EngineConfig(max_num_seqs=8, max_model_len=2048),
                tokenizer=ChatTokenizer.from_pretrained(tiny_ckpt)) as eng:
        http = client_for(tiny_ckpt, eng, monkeypatch)
        for seed in range(4):
            choice = http.post("/v1/chat/completions", json=schema_body(seed)).json()["choices"][0]
            jsonschema.validate(json.loads(choice["message"]["content"]), SCHEMA)
        body = {"model": "tiny", "messages": MESSAGES, "tools": TOOLS, "tool_choice": "required", "seed": 1,
                "temperature": 1.0, "max_tokens": 120, "n": 2, "parallel_tool_calls": False}
        for choice in http.post("/v1/chat/completions", json=body).json()["choices"]:
            assert choice["finish_reason"] == "tool_calls"

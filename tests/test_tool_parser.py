"""The Llama 4 tool-call parser (serve/tool_parser.py): pythonic calls, the JSON fallback, what is
content, and the same result whether the output arrives at once or a character at a time."""

from __future__ import annotations

import json

import pytest

from maverick_ray.serve.tool_parser import ToolCallParser, parse_call, parse_tool_calls, MalformedCall


def calls_of(text: str, **kw) -> tuple[list[tuple[str, dict]], str]:
    calls, content = parse_tool_calls(text, **kw)
    return [(c.name, json.loads(c.arguments)) for c in calls], content


def streamed(text: str, step: int = 1, **kw) -> tuple[list[tuple[str, dict]], str]:
    p = ToolCallParser(**kw)
    events = []
    for i in range(0, len(text), step):
        events += p.feed(text[i:i + step])
    events += p.finish()
    calls = [(e[2].name, json.loads(e[2].arguments)) for e in events if e[0] == "call"]
    assert [e[1] for e in events if e[0] == "call"] == list(range(len(calls)))  # indexes in order
    return calls, "".join(e[1] for e in events if e[0] == "content")


CASES = [
    ('[get_weather(city="Paris")]', [("get_weather", {"city": "Paris"})], ""),
    ('[get_weather(city="San Francisco"), get_weather(city="Seattle")]',
     [("get_weather", {"city": "San Francisco"}), ("get_weather", {"city": "Seattle"})], ""),
    ("<|python_start|>[f(a=1)]<|python_end|>", [("f", {"a": 1})], ""),
    ("  \n[f(a='x', b=-2.5, c=True, d=None, e=[1, (2, 3)], g={'k': false}, h=null)]\n",
     [("f", {"a": "x", "b": -2.5, "c": True, "d": None, "e": [1, [2, 3]], "g": {"k": False}, "h": None})], ""),
    ('[f(a="it\\"s )] tricky")]', [("f", {"a": 'it"s )] tricky'})], ""),
    ("[f()]", [("f", {})], ""),
    ('{"name": "get_weather", "parameters": {"city": "Paris"}}', [("get_weather", {"city": "Paris"})], ""),
    ('[{"name": "a", "arguments": "{\\"x\\": 1}"}, {"name": "b", "parameters": {}}]', [("a", {"x": 1}), ("b", {})], ""),
    ("<|python_start|>{\"name\": \"f\", \"arguments\": {\"a\": 1}}<|python_end|>", [("f", {"a": 1})], ""),
    # content: plain text, text before a call, malformed calls, empty list, bad JSON
    ("The weather is nice.", [], "The weather is nice."),
    ('Let me check: [get_weather(city="Paris")]', [], 'Let me check: [get_weather(city="Paris")]'),
    ("[get_weather(city=Paris)]", [], "[get_weather(city=Paris)]"),
    ('[get_weather("Paris")]', [], '[get_weather("Paris")]'),
    ("[f(**kw)]", [], "[f(**kw)]"),
    ("[f(a=__import__('os').system('x'))]", [], "[f(a=__import__('os').system('x'))]"),
    ("[os.system(a=1)]", [], "[os.system(a=1)]"),
    ("[]", [], "[]"),
    ('{"city": "Paris"}', [], '{"city": "Paris"}'),
    ('{"name": "f", "parameters": [1]}', [], '{"name": "f", "parameters": [1]}'),
    ("[f(a=1", [], "[f(a=1"),
    ("[f(a=1)", [("f", {"a": 1})], ""),   # a finished call stands when the list is cut off
    # calls before a malformed one stand; text after the list is content
    ("[f(a=1), g(b=x)]", [("f", {"a": 1})], "g(b=x)]"),
    ("[f(a=1)] Done.", [("f", {"a": 1})], " Done."),
    ("[f(a=1), g(b=2", [("f", {"a": 1})], "g(b=2"),
]


@pytest.mark.parametrize("text,calls,content", CASES, ids=[c[0][:40] for c in CASES])
def test_parse_whole_and_streamed(text, calls, content):
    assert calls_of(text) == (calls, content)
    for step in (1, 3):
        assert streamed(text, step) == (calls, content), step


def test_calls_are_reported_as_soon_as_they_close():
    p = ToolCallParser()
    assert p.feed('[get_weather(city="Pa') == []
    first = p.feed('ris"), get_')
    assert [(e[0], e[1], e[2].name) for e in first] == [("call", 0, "get_weather")]
    assert p.feed('time(zone="CET")') and p.feed("]") == [] and p.finish() == []
    ids = [c.id for c in p.calls]
    assert len(set(ids)) == 2 and all(i.startswith("call_") for i in ids)


def test_plain_text_streams_through_at_once():
    p = ToolCallParser()
    assert p.feed("Hello") == [("content", "Hello")]
    assert p.feed(" [f(a=1)]") == [("content", " [f(a=1)]")]
    assert p.finish() == []
    # whitespace and a partial <|python_start|> wait for more
    p = ToolCallParser()
    assert p.feed("  ") == [] and p.feed("<|pyth") == [] and p.feed("on_start|>[f(a=1)]")[0][0] == "call"


def test_allowed_names_and_max_calls():
    assert calls_of("[get_weather(city='x')]", allowed={"get_time"}) == ([], "[get_weather(city='x')]")
    assert calls_of("[a(x=1), b(x=2)]", allowed={"a"}) == ([("a", {"x": 1})], "b(x=2)]")
    assert calls_of('{"name": "b", "parameters": {}}', allowed={"a"}) == ([], '{"name": "b", "parameters": {}}')
    assert calls_of("[a(x=1), a(x=2)]", max_calls=1) == ([("a", {"x": 1})], "")
    assert streamed("[a(x=1), a(x=2)]", max_calls=1) == ([("a", {"x": 1})], "")


def test_parse_call_never_evaluates():
    with pytest.raises(MalformedCall):
        parse_call("f(a=open('/etc/passwd').read())")
    with pytest.raises(MalformedCall):
        parse_call("f(a=1 + 2)")
    assert parse_call("f(a=1e3, b='\\u00e9')").arguments == '{"a": 1000.0, "b": "é"}'

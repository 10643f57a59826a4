"""Llama 4 tool calls in the model's output -> OpenAI `tool_calls` (what vLLM's `llama4_pythonic`
parser accepts, plus a JSON fallback).

Accepted outputs (leading whitespace ignored, optionally inside `<|python_start|>` ...
`<|python_end|>`):
- pythonic: `[get_weather(city="Paris"), get_time(zone="CET", exact=True)]`: a list of calls
  with keyword arguments whose values are Python literals (strings, numbers, True/False/None,
  lists, tuples and dicts of them; JSON's true/false/null are taken too). Parsed with `ast`,
  never evaluated.
- JSON: `{"name": "get_weather", "parameters": {"city": "Paris"}}` ("arguments" also accepted),
  or a list of such objects (the form Meta's Hugging Face template asks for).
Anything else is content. A malformed call (a positional argument, a value that is not a
literal, a name the request does not allow, an unfinished call at the end) and everything after
it are returned as content; the calls before it stand, and so does text after the closing `]`
(as content).

`ToolCallParser` reads the output incrementally (`feed` each text delta, then `finish`) and
reports each call as soon as its closing parenthesis arrives, so streaming and non-streaming
give the same calls and content (`parse_tool_calls` is feed-all + finish).
"""

from __future__ import annotations

import ast
import json
import uuid
from dataclasses import dataclass, field

PYTHON_START, PYTHON_END = "<|python_start|>", "<|python_end|>"
_JSON_NAMES = {"true": True, "false": False, "null": None, "True": True, "False": False, "None": None}


@dataclass
class ToolCall:
    name: str
    arguments: str                      # a JSON object, as OpenAI sends it
    id: str = field(default_factory=lambda: "call_" + uuid.uuid4().hex[:24])

    def openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


class MalformedCall(ValueError):
    pass


def _value(node: ast.AST):
    """A literal argument value, or MalformedCall."""
    if isinstance(node, ast.Constant) and not isinstance(node.value, (bytes, complex)) and node.value is not ...:
        return node.value
    if isinstance(node, ast.Name) and node.id in _JSON_NAMES:
        return _JSON_NAMES[node.id]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)) and \
            isinstance(node.operand, ast.Constant) and isinstance(node.operand.value, (int, float)) and \
            not isinstance(node.operand.value, bool):
        return -node.operand.value if isinstance(node.op, ast.USub) else node.operand.value
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_value(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        if not all(isinstance(k, ast.Constant) and isinstance(k.value, str) for k in node.keys):
            raise MalformedCall("dict keys must be strings")
        return {k.value: _value(v) for k, v in zip(node.keys, node.values)}
    raise MalformedCall(f"argument value {ast.dump(node)[:60]} is not a literal")


def parse_call(source: str) -> ToolCall:
    """One pythonic call `name(key=value, ...)` -> ToolCall, or MalformedCall."""
    try:
        tree = ast.parse(source.strip(), mode="eval")
    except SyntaxError as e:
        raise MalformedCall(f"not a call: {e.msg}") from None
    call = tree.body
    if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name):
        raise MalformedCall("not a call of a plain function name")
    if call.args or any(k.arg is None for k in call.keywords):
        raise MalformedCall("tool calls take keyword arguments only")
    args = {k.arg: _value(k.value) for k in call.keywords}
    return ToolCall(call.func.id, json.dumps(args, ensure_ascii=False))


def _json_calls(text: str) -> list[ToolCall] | None:
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return None
    items = data if isinstance(data, list) else [data]
    calls = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return None
        args = item.get("parameters", item.get("arguments", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                return None
        if not isinstance(args, dict):
            return None
        calls.append(ToolCall(item["name"], json.dumps(args, ensure_ascii=False)))
    return calls or None


def _call_end(text: str, start: int) -> int | None:
    """The index just past the call that starts at `start` (its closing parenthesis), None
    while it is incomplete. Raises MalformedCall for a call that cannot become valid."""
    depth, quote, i = 0, None, start
    while i < len(text):
        c = text[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = None
        elif c in "\"'":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
            if depth < 0:
                raise MalformedCall("unbalanced brackets")
            if depth == 0:
                if c != ")":
                    raise MalformedCall("a call must end with ')'")
                return i + 1
        elif depth == 0 and not (c.isalnum() or c == "_"):
            raise MalformedCall(f"unexpected {c!r} in a function name")
        i += 1
    return None


class ToolCallParser:
    """Incremental parser of one output. `feed(delta)` and `finish()` return a list of events:
    `("content", text)` or `("call", index, ToolCall)`.

    `allowed`: function names a call may have (None: any; a named tool_choice passes its one
    name); `max_calls`: 1 for parallel_tool_calls=false (later calls are dropped)."""

    def __init__(self, allowed: set[str] | None = None, max_calls: int | None = None):
        self.allowed, self.max_calls = allowed, max_calls
        self.text = ""
        self.mode = "undecided"     # undecided | list | json | after | content
        self.pos = 0                # start of what is not yet consumed
        self.calls: list[ToolCall] = []
        self._sent_content = 0      # chars of text already sent as content (content mode)
        self._expect_comma = False  # list mode: a call just ended

    def feed(self, delta: str) -> list[tuple]:
        self.text += delta
        return self._advance(final=False)

    def finish(self) -> list[tuple]:
        return self._advance(final=True)

    # ---- the machine ----------------------------------------------------------------------------
    def _to_content(self, start: int) -> list[tuple]:
        """Everything from `start` on is content, now and later."""
        self.mode, self._sent_content = "content", start
        return self._flush_content()

    def _flush_content(self) -> list[tuple]:
        out = self.text[self._sent_content:]
        self._sent_content = len(self.text)
        return [("content", out)] if out else []

    def _advance(self, final: bool) -> list[tuple]:
        if self.mode == "content":
            return self._flush_content()
        if self.mode == "undecided":
            head = self.text.lstrip()
            if head.startswith(PYTHON_START):
                head = head[len(PYTHON_START):].lstrip()
            elif head and PYTHON_START.startswith(head) and not final:
                return []                                   # maybe the start of <|python_start|>
            if not head:
                return self._to_content(0) if final else []
            if head[0] == "{":
                self.mode = "json"
            elif head[0] == "[":
                self.mode, self.pos = "list", len(self.text) - len(head) + 1
            else:
                return self._to_content(0)
        if self.mode == "json":
            return self._json(final)
        events: list[tuple] = []
        while self.mode == "list":
            start = self._next_non_space()
            if start == len(self.text):
                break
            c = self.text[start]
            if c == "{" and not self.calls:                 # a JSON list: wait for the whole of it
                self.mode = "json"
                return self._json(final)
            if c == "]":
                if not self.calls:                          # "[]" is not a call
                    return self._to_content(0)
                self.mode, self.pos = "after", start + 1
                break
            if self._expect_comma:
                if c != ",":
                    return events + self._malformed(start)
                self.pos, self._expect_comma = start + 1, False
                continue
            try:
                end = _call_end(self.text, start)
                if end is None:
                    break
                call = parse_call(self.text[start:end])
                if self.allowed is not None and call.name not in self.allowed:
                    raise MalformedCall(f"{call.name} is not an allowed function")
            except MalformedCall:
                return events + self._malformed(start)
            events += self._emit([call])
            self.pos, self._expect_comma = end, True
        if self.mode == "after":                            # only whitespace and <|python_end|> may follow
            tail = self.text[self.pos:].replace(PYTHON_END, "").strip()
            if tail and (final or not PYTHON_END.startswith(tail)):
                return events + self._to_content(self.pos)
            return events
        if final and self.mode == "list":                   # the output ended inside the list
            return events + self._malformed(self._next_non_space())
        return events

    def _next_non_space(self) -> int:
        rest = self.text[self.pos:]
        return self.pos + len(rest) - len(rest.lstrip())

    def _json(self, final: bool) -> list[tuple]:
        if not final:
            return []
        body = self.text.strip()
        if body.startswith(PYTHON_START):
            body = body[len(PYTHON_START):]
        calls = _json_calls(body.replace(PYTHON_END, "").strip())
        if not calls or not self._all_allowed(calls):
            return self._to_content(0)
        return self._emit(calls)

    def _malformed(self, start: int) -> list[tuple]:
        return self._to_content(0 if not self.calls else start)

    def _all_allowed(self, calls: list[ToolCall]) -> bool:
        return self.allowed is None or all(c.name in self.allowed for c in calls)

    def _emit(self, calls: list[ToolCall]) -> list[tuple]:
        out = []
        for call in calls:
            if self.max_calls is not None and len(self.calls) >= self.max_calls:
                break
            self.calls.append(call)
            out.append(("call", len(self.calls) - 1, call))
        return out


def parse_tool_calls(text: str, allowed: set[str] | None = None,
                     max_calls: int | None = None) -> tuple[list[ToolCall], str]:
    """A whole output -> (calls, content): content is "" when the output was only calls."""
    p = ToolCallParser(allowed, max_calls)
    events = p.feed(text) + p.finish()
    return p.calls, "".join(e[1] for e in events if e[0] == "content")

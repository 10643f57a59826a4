"""`response_format` and forced tool calls -> the grammar the output is decoded under
(engine/structured_output.py: GuideSpec), with a 400 naming the field for anything malformed.

- `{"type": "text"}` (or none): free output.
- `{"type": "json_object"}`: any JSON object.
- `{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}`: JSON
  valid under the schema (strict or not: the grammar always enforces it, as vLLM does).
- `tool_choice: "required"` or a named function (chat with tools): the output is a JSON list of
  calls `[{"name": ..., "parameters": {...}}]` to the declared functions (to the named one),
  each valid under its `parameters` schema; one call when `parallel_tool_calls` is false or a
  function is named. serve/tool_parser.py reads that form back as `tool_calls`.

JSON is generated compactly (no free whitespace), so even a random model's output ends: strings
and numbers without bounds in the schema can still run to max_tokens.
"""

from __future__ import annotations

from typing import Any

from ..engine.structured_output import GrammarError, GuideSpec
from .chat_options import ChatOptions
from .errors import bad_request


def response_format_guide(body: dict) -> GuideSpec | None:
    """The guide `response_format` asks for, or None (text)."""
    rf = body.get("response_format")
    if rf is None:
        return None
    if not isinstance(rf, dict) or rf.get("type") not in ("text", "json_object", "json_schema"):
        raise bad_request("'response_format' must be {\"type\": \"text\"}, {\"type\": \"json_object\"} or "
                          "{\"type\": \"json_schema\", \"json_schema\": {\"name\": ..., \"schema\": {...}}}",
                          "response_format")
    if rf["type"] == "text":
        return None
    if rf["type"] == "json_object":
        return _checked(GuideSpec("json_object"), "response_format")
    js = rf.get("json_schema")
    if not isinstance(js, dict) or not isinstance(js.get("name", ""), str):
        raise bad_request("'response_format.json_schema' must be an object with a 'name' and a 'schema'",
                          "response_format.json_schema")
    schema = js.get("schema", {})
    if not isinstance(schema, dict):
        raise bad_request("'response_format.json_schema.schema' must be a JSON Schema object",
                          "response_format.json_schema.schema")
    if "strict" in js and not isinstance(js["strict"], (bool, type(None))):
        raise bad_request("'response_format.json_schema.strict' must be a boolean", "response_format.json_schema.strict")
    return _checked(GuideSpec.json_schema(schema), "response_format.json_schema.schema")


def tool_call_schema(chat: ChatOptions) -> dict[str, Any] | None:
    """The JSON Schema of the calls a forced tool_choice allows, or None when calls are not forced."""
    if not chat.tools or chat.tool_choice in ("none", "auto"):
        return None
    tools = chat.tools
    if isinstance(chat.tool_choice, dict):
        tools = [t for t in tools if t["function"]["name"] == chat.tool_choice["function"]["name"]]
    calls = [{"type": "object",
              "properties": {"name": {"const": t["function"]["name"]},
                             "parameters": t["function"].get("parameters") or {"type": "object"}},
              "required": ["name", "parameters"], "additionalProperties": False} for t in tools]
    item = calls[0] if len(calls) == 1 else {"anyOf": calls}
    schema: dict[str, Any] = {"type": "array", "items": item, "minItems": 1}
    if isinstance(chat.tool_choice, dict) or not chat.parallel_tool_calls:
        schema["maxItems"] = 1
    return schema


def tool_choice_guide(chat: ChatOptions) -> GuideSpec | None:
    schema = tool_call_schema(chat)
    return None if schema is None else _checked(GuideSpec.json_schema(schema), "tools")


def _checked(spec: GuideSpec, param: str) -> GuideSpec:
    try:
        spec.grammar()
    except GrammarError as e:
        raise bad_request(f"'{param}' cannot be compiled into a grammar: {e}", param, "invalid_schema") from None
    return spec

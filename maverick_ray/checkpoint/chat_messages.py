"""OpenAI chat messages -> the message form Hugging Face chat templates expect (as vLLM passes them).

- image parts (`image_url`, `image`) become `{"type": "image"}`: templates test `type == 'image'`
  and print their image placeholder (Llama 4: `<|image|>`); the server expands it afterwards;
- text parts stay as they are; `content: null` becomes "" (templates either
  print a string or iterate over parts, and can do neither with None);
- an assistant's `tool_calls[*].function.arguments`, a JSON string in the OpenAI API, becomes
  the object it encodes (templates iterate over the arguments); a string that is not a JSON
  object is left as it is.

The input is not modified.
"""

from __future__ import annotations

import json
from typing import Any


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A copy of `messages` in the form chat templates render (see the module docstring)."""
    return [_message(m) for m in messages]


def _message(m: dict[str, Any]) -> dict[str, Any]:
    out = dict(m)
    content = m.get("content")
    if content is None:
        out["content"] = ""
    elif isinstance(content, list):
        out["content"] = [_part(p) for p in content]
    if m.get("tool_calls"):
        out["tool_calls"] = [_tool_call(c) for c in m["tool_calls"]]
    return out


def _part(p: Any) -> Any:
    if isinstance(p, dict) and p.get("type") in ("image_url", "image"):
        return {"type": "image"}
    return p


def _tool_call(call: Any) -> Any:
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        return call
    f = dict(call["function"])
    args = f.get("arguments")
    if isinstance(args, str):
        try:
            parsed = json.loads(args)
        except json.JSONDecodeError:
            parsed = None
        if isinstance(parsed, dict):
            f["arguments"] = parsed
    return {**call, "function": f}

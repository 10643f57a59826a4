"""Parsing and validating OpenAI chat/completions request bodies into engine inputs.

Validation is explicit (not pydantic's 422) so every bad field gets a 400 whose message says
what is wrong and whose `param` names the field, as OpenAI's API does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..engine.sampling import SamplingParams
from .chat_options import ChatOptions, parse_chat_options
from .errors import bad_request

ROLES = ("system", "user", "assistant", "developer", "tool", "ipython")  # the chat roles the API takes


@dataclass
class ParsedRequest:
    model: str | None
    params: SamplingParams
    stream: bool = False
    include_usage: bool = False
    messages: list[dict] = field(default_factory=list)   # chat
    prompt: str | list[int] | None = None                 # completions
    max_tokens_given: bool = False
    timeout: float | None = None   # seconds until the engine ends the request (finish_reason "timeout")
    chat: ChatOptions = field(default_factory=ChatOptions)  # chat: tools, template options


def _number(body: dict, name: str, lo: float, hi: float, default: float) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise bad_request(f"'{name}' must be a number, got {type(v).__name__}", name)
    if not lo <= v <= hi:
        raise bad_request(f"'{name}' must be between {lo} and {hi}, got {v}", name)
    return float(v)


def _int(body: dict, name: str, minimum: int | None = None) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad_request(f"'{name}' must be an integer, got {type(v).__name__}", name)
    if minimum is not None and v < minimum:
        raise bad_request(f"'{name}' must be >= {minimum}, got {v}", name)
    return v


def _timeout(body: dict) -> float | None:
    """`timeout`: the request's deadline in seconds, queued time included (vLLM and OpenAI have no
    such body field; the OpenAI clients send it with extra_body={"timeout": ...})."""
    v = body.get("timeout")
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise bad_request(f"'timeout' must be a number of seconds, got {type(v).__name__}", "timeout")
    if not math.isfinite(v) or v <= 0:
        raise bad_request(f"'timeout' must be a number of seconds greater than 0, got {v}", "timeout")
    return float(v)


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise bad_request("'stop' must be a non-empty string or a list of at most 4 non-empty strings", "stop")
    return stop


def _common(body: Any) -> ParsedRequest:
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad_request("'model' must be a string", "model")
    n = _int(body, "n", 1)
    if n not in (None, 1):
        raise bad_request("only n=1 is supported", "n")
    max_tokens = _int(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens", 1)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad_request("'stream' must be a boolean", "stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise bad_request("'stream_options' must be an object", "stream_options")
    seed = _int(body, "seed")
    top_k = _int(body, "top_k", 0) or 0
    params = SamplingParams(
        max_tokens=max_tokens or 1,
        temperature=_number(body, "temperature", 0.0, 2.0, 1.0),
        top_p=_number(body, "top_p", 0.0, 1.0, 1.0) or 1.0,
        top_k=top_k, seed=seed, stop=_stop(body))
    if params.top_p <= 0:
        raise bad_request("'top_p' must be greater than 0", "top_p")
    return ParsedRequest(model=model, params=params, stream=stream,
                         include_usage=bool(opts.get("include_usage", False)),
                         max_tokens_given=max_tokens is not None, timeout=_timeout(body))


def parse_chat(body: Any) -> ParsedRequest:
    req = _common(body)
    req.messages = parse_messages(body)
    req.chat = parse_chat_options(body)
    return req


def parse_messages(body: dict) -> list[dict]:
    """`messages`, checked: roles, content (a string or text / image_url parts; null only for an
    assistant message), an assistant's `tool_calls`, a tool message's `tool_call_id`."""
    messages = body.get("messages")
    if messages is None:
        raise bad_request("'messages' is required", "messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty list", "messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad_request(f"messages[{i}] must be an object", f"messages[{i}]")
        role = m.get("role")
        if role not in ROLES:
            raise bad_request(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}",
                              f"messages[{i}].role")
        content = m.get("content")
        if isinstance(content, list):
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind not in ("text", "image_url"):
                    raise bad_request(f"messages[{i}].content[{j}] must be a text or image_url part",
                                      f"messages[{i}].content[{j}]")
                if kind == "text" and not isinstance(part.get("text"), str):
                    raise bad_request(f"messages[{i}].content[{j}].text must be a string",
                                      f"messages[{i}].content[{j}].text")
        elif not isinstance(content, str) and not (content is None and role == "assistant"):
            raise bad_request(f"messages[{i}].content must be a string or a list of parts",
                              f"messages[{i}].content")
        if "tool_calls" in m and m["tool_calls"] is not None:
            _check_tool_calls(m, i)
        if role == "tool" and not isinstance(m.get("tool_call_id", ""), str):
            raise bad_request(f"messages[{i}].tool_call_id must be a string", f"messages[{i}].tool_call_id")
    return messages


def _check_tool_calls(m: dict, i: int) -> None:
    p = f"messages[{i}].tool_calls"
    if m.get("role") != "assistant":
        raise bad_request(f"{p}: only assistant messages have tool calls", p)
    calls = m["tool_calls"]
    if not isinstance(calls, list):
        raise bad_request(f"{p} must be a list", p)
    for j, c in enumerate(calls):
        f = c.get("function") if isinstance(c, dict) else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not isinstance(f.get("arguments"), str):
            raise bad_request(f"{p}[{j}] must be {{\"id\": ..., \"type\": \"function\", \"function\": "
                              f"{{\"name\": str, \"arguments\": JSON string}}}}", f"{p}[{j}]")


def parse_completion(body: Any) -> ParsedRequest:
    req = _common(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    ok = isinstance(prompt, str) and prompt != "" or (
        isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt))
    if not ok:
        raise bad_request("'prompt' must be a non-empty string or a list of token ids", "prompt")
    req.prompt = prompt
    return req


def has_images(messages: list[dict]) -> bool:
    return any(isinstance(m.get("content"), list) and any(p.get("type") == "image_url" for p in m["content"])
               for m in messages)

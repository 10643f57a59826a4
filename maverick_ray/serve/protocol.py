"""Parsing and validating OpenAI chat/completions request bodies into engine inputs.

Validation is explicit (not pydantic's 422) so every bad field gets a 400 whose message says
what is wrong and whose `param` names the field, as OpenAI's API does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..engine.sampling import MAX_LOGPROBS, SamplingParams
from .chat_options import ChatOptions, parse_chat_options
from .errors import bad_request
from .request_fields import CHAT_FIELDS, COMPLETION_FIELDS, check_fields
from .structured_output import response_format_guide, tool_choice_guide

MAX_N = 16   # most choices one request may ask for
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
    n: int = 1                     # choices (serve/choices.py)


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
    n = _int(body, "n", 1) or 1
    if n > MAX_N:
        raise bad_request(f"'n' must be at most {MAX_N}, got {n}", "n")
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
        top_p=_number(body, "top_p", 0.0, 1.0, 1.0),
        top_k=top_k, seed=seed, stop=_stop(body), **_penalties(body))
    # As vLLM: top_p 0 is refused for sampling (no token would be left), ignored by greedy.
    if params.top_p == 0 and params.temperature != 0:
        raise bad_request("'top_p' must be greater than 0 (or use temperature 0 for greedy decoding)", "top_p")
    if params.min_tokens > params.max_tokens and max_tokens is not None:
        raise bad_request(f"'min_tokens' ({params.min_tokens}) must not exceed 'max_tokens' ({max_tokens})",
                          "min_tokens")
    params.guide = response_format_guide(body)
    return ParsedRequest(model=model, params=params, stream=stream,
                         include_usage=bool(opts.get("include_usage", False)),
                         max_tokens_given=max_tokens is not None, timeout=_timeout(body), n=n)


def _penalties(body: dict) -> dict[str, Any]:
    """The SamplingParams fields of vLLM's extra sampling parameters and OpenAI's penalties."""
    rep = _number(body, "repetition_penalty", 0.0, 100.0, 1.0)
    if rep <= 0:
        raise bad_request("'repetition_penalty' must be greater than 0", "repetition_penalty")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise bad_request("'ignore_eos' must be a boolean", "ignore_eos")
    stop_ids = body.get("stop_token_ids") or []
    if not isinstance(stop_ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                 for t in stop_ids):
        raise bad_request("'stop_token_ids' must be a list of token ids", "stop_token_ids")
    return {"min_p": _number(body, "min_p", 0.0, 1.0, 0.0),
            "presence_penalty": _number(body, "presence_penalty", -2.0, 2.0, 0.0),
            "frequency_penalty": _number(body, "frequency_penalty", -2.0, 2.0, 0.0),
            "repetition_penalty": rep, "logit_bias": _logit_bias(body), "ignore_eos": ignore_eos,
            "stop_token_ids": stop_ids, "min_tokens": _int(body, "min_tokens", 0) or 0}


def _logit_bias(body: dict) -> dict[int, float]:
    """`logit_bias`: {"token id": bias in [-100, 100]} (ids in the vocabulary: checked by the engine)."""
    lb = body.get("logit_bias")
    if lb is None:
        return {}
    if not isinstance(lb, dict):
        raise bad_request("'logit_bias' must be an object mapping token ids to numbers", "logit_bias")
    out = {}
    for k, v in lb.items():
        if not (isinstance(k, str) and k.isdigit()):
            raise bad_request(f"'logit_bias' keys must be token ids, got {k!r}", "logit_bias")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not -100 <= v <= 100:
            raise bad_request(f"'logit_bias' values must be numbers in [-100, 100], got {v!r} for {k}", "logit_bias")
        out[int(k)] = float(v)
    return out


def _chat_logprobs(body: dict) -> int | None:
    """Chat: `logprobs` (boolean) and `top_logprobs` (0..20, needs logprobs) -> SamplingParams.logprobs."""
    want = body.get("logprobs")
    if want is not None and not isinstance(want, bool):
        raise bad_request("'logprobs' must be a boolean", "logprobs")
    top = _int(body, "top_logprobs", 0)
    if top is not None and top > MAX_LOGPROBS:
        raise bad_request(f"'top_logprobs' must be at most {MAX_LOGPROBS}, got {top}", "top_logprobs")
    if top is not None and not want:
        raise bad_request("'top_logprobs' needs 'logprobs' set to true", "top_logprobs")
    return (top or 0) if want else None


def _completion_logprobs(body: dict) -> int | None:
    """Completions: `logprobs` is the number of top logprobs (0..20)."""
    n = _int(body, "logprobs", 0)
    if n is not None and n > MAX_LOGPROBS:
        raise bad_request(f"'logprobs' must be at most {MAX_LOGPROBS}, got {n}", "logprobs")
    return n


def parse_chat(body: Any) -> ParsedRequest:
    check_fields(body, CHAT_FIELDS)  # unknown fields: 400 (serve/request_fields.py)
    req = _common(body)
    req.messages = parse_messages(body)
    req.chat = parse_chat_options(body)
    req.params.logprobs = _chat_logprobs(body)
    tool_guide = tool_choice_guide(req.chat)
    if tool_guide is not None:
        if req.params.guide is not None:
            raise bad_request("'response_format' cannot be combined with a forced 'tool_choice'", "response_format")
        req.params.guide = tool_guide
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
    check_fields(body, COMPLETION_FIELDS)
    req = _common(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    ok = isinstance(prompt, str) and prompt != "" or (
        isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt))
    if not ok:
        raise bad_request("'prompt' must be a non-empty string or a list of token ids", "prompt")
    req.prompt = prompt
    req.params.logprobs = _completion_logprobs(body)
    return req


def has_images(messages: list[dict]) -> bool:
    return any(isinstance(m.get("content"), list) and any(p.get("type") == "image_url" for p in m["content"])
               for m in messages)

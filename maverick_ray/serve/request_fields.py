"""Which top-level request fields each route accepts: the one list to extend when a route learns a
field. Anything else gets a 400 naming it (OpenAI's shape: type invalid_request_error, code
unknown_parameter, param = the field), so a client never gets a 200 that silently ignored what
it asked for.

Accepted and ignored (NO_OP_FIELDS): fields OpenAI clients send that do not change the output of
a server like this one, each checked for its type:
    user, safety_identifier   the end user, for the provider's abuse monitoring
    metadata                  tags for stored completions (string values)
    store                     whether the provider stores the completion (nothing is stored here)
    service_tier              the provider's processing tier
    prompt_cache_key          a hint for the provider's prompt cache

Only the top level is checked. Message objects are not: clients replay a reply's message as it
came back from the SDK (`refusal`, `annotations`, `audio`, `function_call` set to null).
"""

from __future__ import annotations

from typing import Any

from .errors import APIError, bad_request

# Sampling and output fields both /v1/chat/completions and /v1/completions take.
SAMPLING_FIELDS = frozenset({
    "model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "n",
    "stop", "stop_token_ids", "ignore_eos", "min_tokens", "stream", "stream_options", "timeout",
    "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "logprobs",
    "response_format",
})
CHAT_FIELDS = SAMPLING_FIELDS | {
    "messages", "top_logprobs",
    "tools", "tool_choice", "parallel_tool_calls",                                      # serve/chat_options.py
    "chat_template_kwargs", "add_generation_prompt", "continue_final_message",
}
COMPLETION_FIELDS = SAMPLING_FIELDS | {"prompt"}
TOKENIZE_FIELDS = frozenset({                                                            # serve/tokenize_api.py
    "model", "prompt", "messages", "add_special_tokens", "return_token_strs", "tools", "tool_choice",
    "parallel_tool_calls", "chat_template_kwargs", "add_generation_prompt", "continue_final_message",
})
DETOKENIZE_FIELDS = frozenset({"model", "tokens"})

NO_OP_FIELDS: dict[str, type] = {"user": str, "safety_identifier": str, "metadata": dict, "store": bool,
                                 "service_tier": str, "prompt_cache_key": str}
STREAM_OPTIONS = {"include_usage": bool}


def check_fields(body: Any, known: frozenset[str], no_ops: dict[str, type] | None = None) -> None:
    """400 for the first field of `body` that is neither known nor an accepted no-op (the
    message lists every such field); 400 for a no-op field of the wrong type. A body that is not
    an object is left to the route's parser."""
    if not isinstance(body, dict):
        return
    no_ops = NO_OP_FIELDS if no_ops is None else no_ops
    unknown = [name for name in body if name not in known and name not in no_ops]
    if unknown:
        names = ", ".join(repr(n) for n in unknown)
        raise APIError(400, f"Unrecognized request argument{'s' if len(unknown) > 1 else ''} supplied: {names}",
                       "invalid_request_error", unknown[0], "unknown_parameter")
    for name, kind in no_ops.items():
        value = body.get(name)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool) and kind is not bool):
            raise bad_request(f"'{name}' must be {_KIND[kind]}", name)
    meta = body.get("metadata")
    if isinstance(meta, dict) and not all(isinstance(v, str) for v in meta.values()):
        raise bad_request("'metadata' values must be strings", "metadata")
    if "stream_options" in body:
        _check_stream_options(body)


def _check_stream_options(body: dict) -> None:
    opts = body["stream_options"]
    if opts is None:
        return
    if not isinstance(opts, dict):
        raise bad_request("'stream_options' must be an object", "stream_options")
    if body.get("stream") is not True:
        raise bad_request("'stream_options' is only allowed when 'stream' is true", "stream_options")
    for name, value in opts.items():
        kind = STREAM_OPTIONS.get(name)
        if kind is None:
            raise APIError(400, f"Unrecognized request argument supplied: 'stream_options.{name}'",
                           "invalid_request_error", f"stream_options.{name}", "unknown_parameter")
        if not isinstance(value, kind):
            raise bad_request(f"'stream_options.{name}' must be {_KIND[kind]}", f"stream_options.{name}")


_KIND = {str: "a string", dict: "an object", bool: "a boolean"}

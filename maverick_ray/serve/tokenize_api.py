"""POST /tokenize and POST /detokenize in vLLM's request and response shapes.

/tokenize takes either
    {"prompt": str, "add_special_tokens": true, "return_token_strs": false}
(the ids /v1/completions runs for that prompt: BOS first when add_special_tokens), or a chat
    {"messages": [...], "tools", "add_generation_prompt": true, "continue_final_message": false,
     "chat_template_kwargs", "add_special_tokens": false, "return_token_strs": false}
(the ids /v1/chat/completions runs for those messages: the chat template's rendering, image
placeholders expanded into their tile layout), and answers
    {"count": n, "max_model_len": m, "tokens": [...], "token_strs": [...] or null}.
/detokenize takes {"tokens": [ids]} and answers {"prompt": text} (special tokens kept).
Both take an optional "model", checked like the completion routes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import Request

from .chat_options import parse_chat_options
from .errors import bad_request
from .protocol import ParsedRequest, parse_messages
from .request_fields import DETOKENIZE_FIELDS, TOKENIZE_FIELDS, check_fields

if TYPE_CHECKING:
    from .openai_service import OpenAIService


def _flag(body: dict, name: str, default: bool) -> bool:
    v = body.get(name, default)
    if not isinstance(v, bool):
        raise bad_request(f"'{name}' must be a boolean", name)
    return v


def _body(raw) -> dict:
    if not isinstance(raw, dict):
        raise bad_request("the request body must be a JSON object")
    model = raw.get("model")
    if model is not None and not isinstance(model, str):
        raise bad_request("'model' must be a string", "model")
    return raw


async def tokenize(service: "OpenAIService", request: Request) -> dict:
    service.check_auth(request)
    body = _body(await service.read_json(request))
    check_fields(body, TOKENIZE_FIELDS, no_ops={})
    service.check_model(ParsedRequest(model=body.get("model"), params=None))
    strs = _flag(body, "return_token_strs", False)
    tok = service.tokenizer
    if "messages" in body:
        messages = parse_messages(body)
        ids, _ = await service.chat_prompt(messages, parse_chat_options(body))
        if _flag(body, "add_special_tokens", False):
            ids = [tok.special_id(tok.bos_token)] + ids
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise bad_request("'prompt' (a string) or 'messages' is required", "prompt")
        ids = tok.encode(prompt, add_bos=_flag(body, "add_special_tokens", True))
    return {"count": len(ids), "max_model_len": service.engine.max_model_len, "tokens": ids,
            "token_strs": tok.token_strs(ids) if strs else None}


async def detokenize(service: "OpenAIService", request: Request) -> dict:
    service.check_auth(request)
    body = _body(await service.read_json(request))
    check_fields(body, DETOKENIZE_FIELDS, no_ops={})
    service.check_model(ParsedRequest(model=body.get("model"), params=None))
    tokens = body.get("tokens")
    vocab = service.tokenizer.vocab_size
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise bad_request("'tokens' must be a list of token ids", "tokens")
    bad = [t for t in tokens if not 0 <= t < vocab]
    if bad:
        raise bad_request(f"'tokens' has ids outside the vocabulary [0, {vocab}): {bad[:5]}", "tokens")
    return {"prompt": service.tokenizer.decode(tokens, skip_special_tokens=False)}

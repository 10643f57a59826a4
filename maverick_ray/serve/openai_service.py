"""The OpenAI-compatible API over an engine: chat/completions, completions, models, and vLLM's
/tokenize and /detokenize (serve/tokenize_api.py).

Chat prompts are rendered with the checkpoint's chat template (checkpoint/tokenizer.py), tools and
template options included (serve/chat_options.py); replies carry Llama 4 tool calls read from the
output (serve/chat_output.py, serve/tool_parser.py).

Kept free of Ray Serve so it can run over any engine with the EngineProtocol
(serve/engine_protocol.py): the real Engine, or the in-process fake of the HTTP tests.

Server-side failures reach the client in user terms with the request id (serve/request_ids.py);
the engine's own detail (rank, node, Ray's words) is logged here under the same id.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..checkpoint.chat_template import NO_TEMPLATE, ChatTemplateError
from ..engine.request import EngineError, EngineFull
from ..engine.sampling import InvalidRequest
from .auth import check_api_key
from .chat_options import ChatOptions
from .chat_output import StreamDeltas, chat_message, finish_reason
from .choices import choice_ids, choice_params, merged
from .engine_protocol import EngineProtocol
from .errors import APIError, bad_request, server_error
from .logprobs_format import LogprobsFormatter
from .protocol import ParsedRequest, has_images, parse_chat, parse_completion
from .request_ids import request_id_of
from .settings import ServeSettings

log = logging.getLogger(__name__)


class OpenAIService:
    def __init__(self, engine: EngineProtocol, tokenizer, settings: ServeSettings, model_name: str,
                 prompt_builder=None):
        self.engine, self.tokenizer, self.settings = engine, tokenizer, settings
        self.model_name = model_name
        self.prompt_builder = prompt_builder  # (messages, render kwargs) -> (prompt ids, mm_inputs); images

    # ---- request plumbing --------------------------------------------------------------------
    def check_auth(self, request: Request) -> None:
        """401 unless the bearer key matches (constant-time; http_api's middleware checks every route)."""
        check_api_key(self.settings.api_key, request.headers.get("authorization"))

    async def read_json(self, request: Request) -> Any:
        limit = self.settings.max_request_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes",
                           "invalid_request_error", None, "request_too_large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise APIError(413, f"request body exceeds the limit of {limit} bytes",
                               "invalid_request_error", None, "request_too_large")
        try:
            return json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise bad_request(f"the request body is not valid JSON: {e}") from None

    def check_model(self, req: ParsedRequest) -> None:
        if req.model is not None and req.model != self.model_name:
            raise APIError(404, f"the model '{req.model}' does not exist; this server serves '{self.model_name}'",
                           "invalid_request_error", "model", "model_not_found")

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": 0,
                                            "owned_by": "maverick-ray"}]}

    # ---- endpoints -----------------------------------------------------------------------------
    async def chat(self, request: Request):
        self.check_auth(request)
        req = parse_chat(await self.read_json(request))
        self.check_model(req)
        prompt_ids, mm = await self.chat_prompt(req.messages, req.chat)
        return await self._run(request, req, prompt_ids, mm, chat=True)

    async def completions(self, request: Request):
        self.check_auth(request)
        req = parse_completion(await self.read_json(request))
        self.check_model(req)
        ids = req.prompt if isinstance(req.prompt, list) else self.tokenizer.encode(req.prompt, add_bos=True)
        return await self._run(request, req, ids, None, chat=False)

    async def chat_prompt(self, messages: list[dict], chat: ChatOptions) -> tuple[list[int], dict | None]:
        """(prompt ids, image inputs) the engine runs for a conversation: the chat template's
        rendering, each image placeholder expanded into its tile layout. 400 when the template
        cannot render it (or the checkpoint has none)."""
        render = chat.render_kwargs()
        if has_images(messages):
            if self.prompt_builder is None:
                raise bad_request("this model has no vision tower; image inputs are not supported", "messages",
                                  "images_not_supported")
            # Decoding and resizing images computes with torch: on the engine's preprocessing
            # thread, not this event loop (engine.submit_preprocessing says why).
            return await asyncio.wrap_future(self.engine.submit_preprocessing(self.prompt_builder, messages, render))
        try:
            return self.tokenizer.apply_chat_template(messages, **render), None
        except ChatTemplateError as e:
            raise template_error(e) from None

    async def _run(self, request: Request, req: ParsedRequest, prompt_ids: list[int], mm, chat: bool):
        params = req.params
        if not req.max_tokens_given:
            room = self.engine.max_model_len - len(prompt_ids)
            params.max_tokens = max(1, params.min_tokens, min(self.settings.default_max_tokens, room))
        request_id = request_id_of(request)  # what the client quotes; rids: the engine's, unique
        prefix = "chatcmpl-" if chat else "cmpl-"
        rids = choice_ids(prefix + uuid.uuid4().hex, req.n)   # one engine sequence per choice
        reply_id = prefix + request_id      # the reply's `id`, as vLLM names it: from X-Request-Id
        streams = []
        try:
            for i, rid in enumerate(rids):
                streams.append(self.engine.add_request(prompt_ids, choice_params(params, i), request_id=rid,
                                                       mm_inputs=mm, timeout_s=req.timeout))
        except InvalidRequest as e:
            self._abort(rids[:len(streams)])
            raise bad_request(str(e), e.param) from None
        except EngineError as e:
            self._abort(rids[:len(streams)])
            raise self._unavailable(e, request_id) from None
        if req.stream:
            return StreamingResponse(self._sse(rids, request_id, reply_id, streams, req, chat),
                                     media_type="text/event-stream")
        return await self._collect(rids, request_id, reply_id, streams, req, chat)

    def _abort(self, rids: list[str]) -> None:
        for rid in rids:
            self.engine.abort(rid)

    def _formatter(self, req: ParsedRequest) -> LogprobsFormatter | None:
        return LogprobsFormatter(self.tokenizer.decode) if req.params.logprobs is not None else None

    def _unavailable(self, e: EngineError, request_id: str) -> APIError:
        """503 with Retry-After: the engine's queue is full, or the engine failed (Serve replaces
        the replica)."""
        retry = {"Retry-After": str(max(1, math.ceil(self.settings.retry_after_s)))}
        if isinstance(e, EngineFull):
            log.warning("request %s refused: %s", request_id, e)
            return server_error(503, "the server is at capacity: too many requests are queued; retry later",
                                request_id, "engine_unavailable", retry)
        log.error("request %s refused, the engine is unavailable: %s", request_id, e)
        return server_error(503, "the server is temporarily unavailable; retry later", request_id,
                            "engine_unavailable", retry)

    def _failed(self, ev, rid: str, request_id: str) -> APIError:
        """The client's error for a request that ended with "timeout" (504) or "error": 503 with
        Retry-After when the engine has failed for good (Serve replaces the replica: a retry
        succeeds), else 500. The engine's detail goes to the log only (a timeout's message is
        the engine's own, for users)."""
        if ev.finish_reason == "timeout":
            log.info("request %s (%s) timed out: %s", request_id, rid, ev.error)
            return server_error(504, ev.error or "the request passed its deadline", request_id, "request_timeout")
        if self.engine.error is not None:
            return self._unavailable(EngineError(ev.error or self.engine.error), request_id)
        log.error("request %s (%s) failed: %s", request_id, rid, ev.error)
        return server_error(500, "the server failed while generating this response; retry the request",
                            request_id)

    async def _collect(self, rids: list[str], request_id: str, reply_id: str, streams: list, req: ParsedRequest,
                       chat: bool) -> JSONResponse:
        n = len(streams)
        texts, lps, finals = [[] for _ in range(n)], [[] for _ in range(n)], [None] * n
        try:
            async for i, ev in merged(streams):
                texts[i].append(ev.text)
                if ev.logprobs is not None and ev.token_id is not None:
                    lps[i].append((ev.token_id, ev.logprobs))
                if ev.finished:
                    finals[i] = ev
                    if ev.finish_reason in ("error", "timeout"):
                        raise self._failed(ev, rids[i], request_id)
        finally:  # the client went away (cancelled), or a choice failed: free the other sequences
            self._abort([rid for rid, f in zip(rids, finals) if f is None])
        fmt = self._formatter(req)
        choices = []
        for i in range(n):
            content, reason = "".join(texts[i]), finals[i].finish_reason
            if chat:
                message, called = chat_message(content, req.chat.tool_parser())
                choices.append({"index": i, "message": message, "logprobs": fmt.chat(lps[i]) if fmt else None,
                                "finish_reason": finish_reason(reason, called)})
            else:
                choices.append({"index": i, "text": content,
                                "logprobs": fmt.completion(lps[i]) if fmt else None, "finish_reason": reason})
        return JSONResponse({"id": reply_id, "object": "chat.completion" if chat else "text_completion",
                             "created": int(time.time()), "model": self.model_name, "choices": choices,
                             "usage": _usage(finals)})

    async def _sse(self, rids: list[str], request_id: str, reply_id: str, streams: list, req: ParsedRequest,
                   chat: bool):
        created, n = int(time.time()), len(streams)
        finals: list = [None] * n
        obj = "chat.completion.chunk" if chat else "text_completion"
        deltas = [StreamDeltas(req.chat.tool_parser() if chat else None) for _ in range(n)]
        fmt, offsets = self._formatter(req), [0] * n

        def chunk(i, delta_or_text, reason=None, lps=None, usage=None):
            logprobs = None
            if lps:
                logprobs = fmt.chat(lps) if chat else fmt.completion(lps, offsets[i])
            c = {"index": i, "delta" if chat else "text": delta_or_text, "logprobs": logprobs, "finish_reason": reason}
            body = {"id": reply_id, "object": obj, "created": created, "model": self.model_name,
                    "choices": [c] if usage is None else []}
            if usage is not None:
                body["usage"] = usage
            return f"data: {json.dumps(body)}\n\n"

        def pieces(i, ev, final: bool):
            """The chunks of one event's text; the token's logprobs ride on the first (an event
            whose text is held back still sends them)."""
            lps = [(ev.token_id, ev.logprobs)] if fmt and ev.logprobs is not None and ev.token_id is not None else None
            if chat:
                ds = deltas[i].feed(ev.text) + (deltas[i].finish() if final else [])
                if not ds and lps:
                    ds = [{"content": ""}]
                for k, d in enumerate(ds):
                    yield chunk(i, d, lps=lps if k == 0 else None)
            elif ev.text or lps:
                yield chunk(i, ev.text, lps=lps)
                offsets[i] += len(ev.text)

        try:
            if chat:
                for i in range(n):
                    yield chunk(i, {"role": "assistant", "content": ""})
            async for i, ev in merged(streams):
                if ev.finished:
                    finals[i] = ev
                    if ev.finish_reason in ("error", "timeout"):
                        yield f"data: {json.dumps(self._failed(ev, rids[i], request_id).body())}\n\n"
                        break
                    for c in pieces(i, ev, final=True):
                        yield c
                    yield chunk(i, {} if chat else "", reason=finish_reason(ev.finish_reason, deltas[i].called))
                    continue
                for c in pieces(i, ev, final=False):
                    yield c
            if all(f is not None for f in finals) and req.include_usage:
                yield chunk(0, None, usage=_usage(finals))
            yield "data: [DONE]\n\n"
        finally:
            unfinished = [rid for rid, f in zip(rids, finals) if f is None]
            if unfinished:  # client disconnected mid-stream, or a choice failed
                log.info("request %s (%s): ended early; aborting", request_id, ", ".join(unfinished))
                self._abort(unfinished)


def image_prompt_builder(ckpt: Path, engine: EngineProtocol, tokenizer, settings: ServeSettings):
    """(messages) -> (prompt ids, image inputs) for checkpoints with a vision tower, else None."""
    if not engine.model_config.is_multimodal:
        return None

    def build(messages, render: dict | None = None):
        from ..multimodal.images import ImageError
        from ..multimodal.prompt import chat_prompt_with_images

        try:
            return chat_prompt_with_images(messages, tokenizer, engine.model_config, ckpt,
                                           max_images=settings.max_images,
                                           allow_remote=settings.allow_remote_images,
                                           max_pixels=settings.max_image_pixels, render=render)
        except ImageError as e:
            raise bad_request(str(e), "messages", "invalid_image") from None
        except ChatTemplateError as e:
            raise template_error(e) from None
    return build


def template_error(e: ChatTemplateError) -> APIError:
    """The 400 for a conversation the chat template cannot render (or a checkpoint without one)."""
    return bad_request(str(e), "messages", "no_chat_template" if str(e) == NO_TEMPLATE else "invalid_messages")


def _usage(finals: list) -> dict:
    """Usage over the choices' final events: the prompt once, every choice's completion tokens."""
    ev = finals[0]
    completion = sum(f.completion_tokens for f in finals)
    return {"prompt_tokens": ev.prompt_tokens, "completion_tokens": completion,
            "total_tokens": ev.prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": getattr(ev, "cached_tokens", 0)}}

"""The OpenAI-compatible API over an engine: chat/completions, completions, models.

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

from ..engine.request import EngineError, EngineFull
from ..engine.sampling import InvalidRequest
from .engine_protocol import EngineProtocol
from .errors import APIError, bad_request, server_error
from .protocol import ParsedRequest, has_images, parse_chat, parse_completion
from .request_ids import request_id_of
from .settings import ServeSettings

log = logging.getLogger(__name__)


class OpenAIService:
    def __init__(self, engine: EngineProtocol, tokenizer, settings: ServeSettings, model_name: str,
                 prompt_builder=None):
        self.engine, self.tokenizer, self.settings = engine, tokenizer, settings
        self.model_name = model_name
        self.prompt_builder = prompt_builder  # (messages) -> (prompt ids, mm_inputs); images need it

    # ---- request plumbing --------------------------------------------------------------------
    def check_auth(self, request: Request) -> None:
        key = self.settings.api_key
        if not key:
            return
        header = request.headers.get("authorization", "")
        if header != f"Bearer {key}":
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                           "authentication_error", None, "invalid_api_key")

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
        if has_images(req.messages):
            if self.prompt_builder is None:
                raise bad_request("this model has no vision tower; image inputs are not supported", "messages",
                                  "images_not_supported")
            # Decoding and resizing images computes with torch: on the engine's preprocessing
            # thread, not this event loop (engine.submit_preprocessing says why).
            prompt_ids, mm = await asyncio.wrap_future(self.engine.submit_preprocessing(self.prompt_builder,
                                                                                       req.messages))
        else:
            prompt_ids, mm = self._chat_ids(req.messages), None
        return await self._run(request, req, prompt_ids, mm, chat=True)

    async def completions(self, request: Request):
        self.check_auth(request)
        req = parse_completion(await self.read_json(request))
        self.check_model(req)
        ids = req.prompt if isinstance(req.prompt, list) else self.tokenizer.encode(req.prompt, add_bos=True)
        return await self._run(request, req, ids, None, chat=False)

    def _chat_ids(self, messages: list[dict]) -> list[int]:
        try:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except ValueError as e:
            raise bad_request(str(e), "messages") from None

    async def _run(self, request: Request, req: ParsedRequest, prompt_ids: list[int], mm, chat: bool):
        params = req.params
        if not req.max_tokens_given:
            room = self.settings.engine().max_model_len - len(prompt_ids)
            params.max_tokens = max(1, min(self.settings.default_max_tokens, room))
        request_id = request_id_of(request)  # what the client quotes; rid: the engine's, unique
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        try:
            stream = self.engine.add_request(prompt_ids, params, request_id=rid, mm_inputs=mm, timeout_s=req.timeout)
        except InvalidRequest as e:
            raise bad_request(str(e), e.param) from None
        except EngineError as e:
            raise self._unavailable(e, request_id) from None
        if req.stream:
            return StreamingResponse(self._sse(rid, request_id, stream, req, chat), media_type="text/event-stream")
        return await self._collect(rid, request_id, stream, chat)

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
        """The client's error for a request that ended with "timeout" (504) or "error" (500); the
        engine's detail goes to the log only (a timeout's message is the engine's own, for users)."""
        if ev.finish_reason == "timeout":
            log.info("request %s (%s) timed out: %s", request_id, rid, ev.error)
            return server_error(504, ev.error or "the request passed its deadline", request_id, "request_timeout")
        log.error("request %s (%s) failed: %s", request_id, rid, ev.error)
        return server_error(500, "the server failed while generating this response; retry the request",
                            request_id)

    async def _collect(self, rid: str, request_id: str, stream, chat: bool) -> JSONResponse:
        text, reason, usage, finished = [], None, None, False
        try:
            async for ev in stream:
                text.append(ev.text)
                if ev.finished:
                    finished = True
                    if ev.finish_reason in ("error", "timeout"):
                        raise self._failed(ev, rid, request_id)
                    reason, usage = ev.finish_reason, _usage(ev)
        finally:
            if not finished:  # the client went away (cancelled): free the sequence
                self.engine.abort(rid)
        content = "".join(text)
        choice = ({"index": 0, "message": {"role": "assistant", "content": content}, "logprobs": None,
                   "finish_reason": reason} if chat else
                  {"index": 0, "text": content, "logprobs": None, "finish_reason": reason})
        return JSONResponse({"id": rid, "object": "chat.completion" if chat else "text_completion",
                             "created": int(time.time()), "model": self.model_name, "choices": [choice],
                             "usage": usage})

    async def _sse(self, rid: str, request_id: str, stream, req: ParsedRequest, chat: bool):
        created, finished = int(time.time()), False
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta_or_text, reason=None, usage=None, choices=True):
            if chat:
                c = [{"index": 0, "delta": delta_or_text, "logprobs": None, "finish_reason": reason}]
            else:
                c = [{"index": 0, "text": delta_or_text, "logprobs": None, "finish_reason": reason}]
            body = {"id": rid, "object": obj, "created": created, "model": self.model_name,
                    "choices": c if choices else []}
            if usage is not None:
                body["usage"] = usage
            return f"data: {json.dumps(body)}\n\n"

        try:
            if chat:
                yield chunk({"role": "assistant", "content": ""})
            async for ev in stream:
                if ev.finished:
                    finished = True
                    if ev.finish_reason in ("error", "timeout"):
                        yield f"data: {json.dumps(self._failed(ev, rid, request_id).body())}\n\n"
                        break
                    if ev.text:
                        yield chunk({"content": ev.text} if chat else ev.text)
                    yield chunk({} if chat else "", reason=ev.finish_reason)
                    if req.include_usage:
                        yield chunk(None, usage=_usage(ev), choices=False)
                    break
                if ev.text:
                    yield chunk({"content": ev.text} if chat else ev.text)
            yield "data: [DONE]\n\n"
        finally:
            if not finished:  # client disconnected mid-stream
                log.info("request %s (%s): client went away; aborting", request_id, rid)
                self.engine.abort(rid)


def image_prompt_builder(ckpt: Path, engine: EngineProtocol, tokenizer, settings: ServeSettings):
    """(messages) -> (prompt ids, image inputs) for checkpoints with a vision tower, else None."""
    if not engine.model_config.is_multimodal:
        return None

    def build(messages):
        from ..multimodal.images import ImageError
        from ..multimodal.prompt import chat_prompt_with_images

        try:
            return chat_prompt_with_images(messages, tokenizer, engine.model_config, ckpt,
                                           max_images=settings.max_images,
                                           allow_remote=settings.allow_remote_images,
                                           max_pixels=settings.max_image_pixels)
        except ImageError as e:
            raise bad_request(str(e), "messages", "invalid_image") from None
    return build


def _usage(ev) -> dict:
    return {"prompt_tokens": ev.prompt_tokens, "completion_tokens": ev.completion_tokens,
            "total_tokens": ev.prompt_tokens + ev.completion_tokens}

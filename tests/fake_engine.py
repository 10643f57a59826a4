"""An in-process engine with the EngineProtocol (maverick_ray/serve/engine_protocol.py) for the
HTTP tests: no model, no Ray, no threads of its own.

It answers every request with the same scripted reply (REPLY, tokenized by the checkpoint's real
tokenizer, repeated as long as max_tokens asks), honouring max_tokens, the model's eos ids,
`stop_token_ids` and stop strings (with the engine's own hold-back logic), and abort. Knobs for
the error paths:

    engine.fail_after = n          the request fails after n tokens (finish_reason "error", with
                                   engine.fail_message as its internal detail)
    engine.time_out_after = n      the request passes its deadline after n tokens ("timeout")
    engine.refuse = EngineError()  add_request raises it (the HTTP layer answers 503)
    engine.reject = InvalidRequest("...", "param")   add_request raises it (400)
    engine.set_unhealthy("why")    healthy False, and add_request raises EngineError
    engine.script = [ids]          the reply's token ids instead of REPLY's

Each request is kept in `engine.requests` (prompt ids, params, image inputs, output, finish reason).
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from maverick_ray.config import ModelConfig
from maverick_ray.engine.request import EngineError, TokenEvent
from maverick_ray.engine.sampling import InvalidRequest, SamplingParams
from maverick_ray.engine.text_output import TextOutput

REPLY = " The quick brown fox jumps over the lazy dog."


@dataclass
class FakeRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    mm_inputs: Any = None
    timeout_s: float | None = None
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None   # None while it runs

    @property
    def running(self) -> bool:
        return self.finish_reason is None


class FakeEngine:
    def __init__(self, ckpt: str | Path, tokenizer):
        self.model_config = ModelConfig.from_pretrained(ckpt)
        self.max_model_len = 2048
        self.tokenizer = tokenizer
        self.stop_ids = set(self.model_config.text.eos_token_ids)
        self.script: list[int] = tokenizer.encode(REPLY)
        self.error: str | None = None
        self.fail_after: int | None = None
        # what a real rank failure puts in the event: internal detail the client must not see
        self.fail_message = ("engine failed: RankFailed: rank 1 failed: ConnectionError: the step channel closed; "
                             "Ray: The actor is dead because its node 10.0.3.7 died")
        self.time_out_after: int | None = None
        self.cached_tokens = 0  # prompt tokens every request reports found in the prefix cache
        self.refuse: EngineError | None = None
        self.reject: InvalidRequest | None = None
        self.requests: dict[str, FakeRequest] = {}
        self.aborted: list[str] = []          # ids passed to abort(), in order
        self.forced_expert: int | None = None
        self.preprocessed = 0                 # calls of submit_preprocessing
        self._pool: ThreadPoolExecutor | None = None

    # ---- the EngineProtocol -------------------------------------------------------------------
    @property
    def healthy(self) -> bool:
        return self.error is None

    def add_request(self, prompt_ids: list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, mm_inputs: Any = None,
                    timeout_s: float | None = None) -> "FakeStream":
        params = (params or SamplingParams()).validate()
        if self.error is not None:
            raise EngineError(f"engine is unhealthy: {self.error}")
        if self.reject is not None:
            raise self.reject
        if self.refuse is not None:
            raise self.refuse
        if not prompt_ids:
            raise InvalidRequest("the prompt is empty", "prompt")
        vocab = self.model_config.text.vocab_size   # the real engine's input checks
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in prompt_ids):
            raise InvalidRequest(f"prompt token ids must be integers in [0, {vocab})", "prompt")
        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise InvalidRequest(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds "
                                 f"the context length {self.max_model_len}", "max_tokens")
        request_id = request_id or uuid.uuid4().hex
        if request_id in self.requests:
            raise InvalidRequest(f"request id {request_id!r} is already in use", "request_id")
        req = FakeRequest(request_id, list(prompt_ids), params, mm_inputs, timeout_s)
        self.requests[request_id] = req
        return FakeStream(self, req)

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        req = self.requests.get(request_id)
        if req is not None and req.running:
            req.finish_reason = "abort"

    def stats(self) -> dict:
        finished: dict[str, int] = {}
        for r in self.requests.values():
            if r.finish_reason:
                finished[r.finish_reason] = finished.get(r.finish_reason, 0) + 1
        return {"healthy": self.healthy, "error": self.error, "running": self.running, "waiting": 0,
                "finished": finished, "ep_size": 1}

    def submit_preprocessing(self, fn, *args) -> Future:
        self.preprocessed += 1
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="fake-preprocessing")
        return self._pool.submit(fn, *args)

    def force_expert(self, expert: int | None) -> None:
        self.forced_expert = expert

    # ---- test helpers -----------------------------------------------------------------------
    @property
    def running(self) -> int:
        return sum(r.running for r in self.requests.values())

    def set_unhealthy(self, why: str) -> None:
        self.error = why
        for r in self.requests.values():  # as the real engine does: every request fails
            if r.running:
                r.finish_reason = "error"

    def reply_ids(self, n: int) -> list[int]:
        """The first n token ids of the scripted reply."""
        return list(itertools.islice(itertools.cycle(self.script), n))

    def reply_text(self, n: int) -> str:
        return self.tokenizer.decode(self.reply_ids(n))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)


class FakeStream:
    """`async for event in stream`: one TokenEvent per scripted token, then a final one. Each
    token yields to the event loop first, as a real engine's step would."""

    def __init__(self, engine: FakeEngine, req: FakeRequest):
        self.engine, self.req = engine, req

    def __aiter__(self):
        return self._events()

    def _event(self, token: int | None, text: str, reason: str | None = None, error: str | None = None):
        req = self.req
        return TokenEvent(req.request_id, token, text, finished=reason is not None, finish_reason=reason,
                          error=error, prompt_tokens=len(req.prompt_ids), completion_tokens=len(req.output_ids),
                          cached_tokens=min(self.engine.cached_tokens, len(req.prompt_ids)))

    def _finish(self, reason: str, tail: str = "", error: str | None = None) -> TokenEvent:
        self.req.finish_reason = reason
        return self._event(None, tail, reason, error)

    async def _events(self):
        eng, req, p = self.engine, self.req, self.req.params
        text = TextOutput(eng.tokenizer.decode, p.stop)  # the engine's own detokenizer and stop strings
        for token in itertools.cycle(eng.script):
            await asyncio.sleep(0)
            if not req.running:  # aborted, or the engine went unhealthy
                error = f"engine failed: {eng.error}" if req.finish_reason == "error" else None
                yield self._event(None, "", req.finish_reason, error)
                return
            if eng.fail_after is not None and len(req.output_ids) >= eng.fail_after:
                yield self._finish("error", error=eng.fail_message)
                return
            if eng.time_out_after is not None and len(req.output_ids) >= eng.time_out_after:
                yield self._finish("timeout", error=f"the request passed its deadline of {req.timeout_s} s")
                return
            if token in p.stop_token_ids or (not p.ignore_eos and token in eng.stop_ids):
                yield self._finish("stop", text.tail(req.output_ids))
                return
            req.output_ids.append(token)
            delta, stopped = text.add(req.output_ids, len(req.output_ids) >= p.min_tokens)
            yield self._event(token, delta)
            if stopped:
                yield self._finish("stop")
                return
            if len(req.output_ids) >= p.max_tokens:
                yield self._finish("length", text.tail(req.output_ids))
                return

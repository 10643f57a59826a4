"""A request's life on the driver: its tokens, its text, its stop checks, and its output stream.

The stream is fed from the engine's step thread and read either synchronously
(`for event in stream`) or from asyncio (`async for event in stream`) without a thread per
waiting reader.
"""

from __future__ import annotations

import asyncio
import enum
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from .sampling import SamplingParams


class EngineError(RuntimeError):
    """The engine could not finish a request (a worker died, the engine was shut down, ...)."""


class EngineFull(EngineError):
    """The engine refused a new request because max_waiting requests already wait (retry later)."""


class RequestTimedOut(EngineError):
    """The request passed its deadline (its `timeout`, or the engine's request_deadline_s)."""


@dataclass
class TokenEvent:
    request_id: str
    token_id: int | None          # None on a final event that carries no new token
    text: str                     # new text since the previous event (stop strings held back)
    finished: bool = False
    finish_reason: str | None = None   # "stop" | "length" | "abort" | "timeout" | "error"
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0        # prompt tokens served from the prefix cache (usage.prompt_tokens_details)
    logprobs: Any = None          # sampling.TokenLogprobs of token_id, when the request asked for logprobs


_END = object()


class RequestStream:
    def __init__(self, request_id: str):
        self.request_id = request_id
        self._lock = threading.Lock()
        self._sync: queue.Queue = queue.Queue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._async: asyncio.Queue | None = None

    def put(self, event: TokenEvent) -> None:
        with self._lock:
            if self._loop is not None:
                try:
                    self._loop.call_soon_threadsafe(self._async.put_nowait, event)
                except RuntimeError:  # the reader's loop is closed: nobody is listening
                    pass
            else:
                self._sync.put(event)

    def __iter__(self):
        while True:
            event = self._sync.get()
            yield event
            if event.finished:
                return

    def __aiter__(self):
        return self._aiter()

    async def _aiter(self):
        with self._lock:
            self._loop = asyncio.get_running_loop()
            self._async = asyncio.Queue()
            while not self._sync.empty():
                self._async.put_nowait(self._sync.get_nowait())
        while True:
            event = await self._async.get()
            yield event
            if event.finished:
                return


class RequestState(enum.Enum):
    """Where a request is in its life. Only the Scheduler changes it (engine/scheduler.py)."""

    WAITING = "waiting"        # queued (new, preempted or replayed): no rank or KV pages
    PREFILLING = "prefilling"  # admitted to a rank; its prompt runs in the next step(s), chunk by chunk
    RUNNING = "running"        # has its first token; decodes one token per step
    FINISHED = "finished"      # ended: stop, length, timeout or error (pages freed)
    ABORTED = "aborted"        # ended by the client going away (pages freed)

    @property
    def done(self) -> bool:
        return self in (RequestState.FINISHED, RequestState.ABORTED)


@dataclass
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    stream: RequestStream
    mm_inputs: Any = None
    arrival: float = field(default_factory=time.monotonic)
    output_ids: list[int] = field(default_factory=list)
    rank: int | None = None
    prefilled: int = 0      # while PREFILLING: context tokens already in its rank's KV cache (chunked prefill)
    block_hashes: list[int] = field(default_factory=list)  # chained hashes of its context's full KV blocks
    image_key: int | None = None   # its images' content hash (prefix caching), None without images
    cached_prompt_tokens: int | None = None  # prompt tokens found in the prefix cache at its first admission
    state: RequestState = RequestState.WAITING
    first_token_time: float | None = None
    text: Any = None        # engine/text_output.py TextOutput: detokenizer and stop strings (engine thread)
    timeout_s: float | None = None   # seconds from arrival until the engine ends it ("timeout")

    @property
    def deadline(self) -> float | None:
        """The monotonic time past which the request is ended, waiting or running."""
        return None if self.timeout_s is None else self.arrival + self.timeout_s

    @property
    def cached_tokens(self) -> int:
        """Tokens this request has in its rank's KV cache once the next step runs."""
        return len(self.prompt_ids) + max(len(self.output_ids) - 1, 0)

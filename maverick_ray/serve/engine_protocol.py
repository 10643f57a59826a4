"""What the HTTP layer (`OpenAIService`, `http_api`) needs from an engine.

`maverick_ray.engine.engine.Engine` implements it; so does the in-process fake the HTTP tests
use (tests/fake_engine.py). Nothing here imports torch or Ray.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from ..config import ModelConfig
    from ..engine.request import TokenEvent
    from ..engine.sampling import SamplingParams


class TokenStream(Protocol):
    """One request's output: `async for event in stream` yields TokenEvents, the last with
    `finished=True` (finish_reason "stop" | "length" | "abort" | "timeout" | "error"; the last two
    carry `error`, a detail for the server log, not for the client)."""

    def __aiter__(self) -> AsyncIterator["TokenEvent"]: ...


@runtime_checkable
class EngineProtocol(Protocol):
    model_config: "ModelConfig"   # read for `is_multimodal` (the image prompt builder)
    error: str | None             # why the engine is unhealthy (None while healthy)
    max_model_len: int            # prompt + output tokens one sequence may use (resolved at start)

    @property
    def healthy(self) -> bool: ...

    def add_request(self, prompt_ids: list[int], params: "SamplingParams | None" = None,
                    request_id: str | None = None, mm_inputs: Any = None,
                    timeout_s: float | None = None) -> TokenStream:
        """Queues a request and returns its stream. Raises InvalidRequest (bad input: HTTP 400,
        its `param` names the field) or EngineError (unhealthy, or EngineFull: HTTP 503).
        `timeout_s`: the request's own deadline in seconds from now (finish_reason "timeout")."""
        ...

    def abort(self, request_id: str) -> None:
        """Stops a request (the client went away); unknown or finished ids are ignored."""
        ...

    def stats(self) -> dict:
        """JSON-able scheduler/cache counters (GET /v1/engine/stats)."""
        ...

    def submit_preprocessing(self, fn: Callable, *args) -> Future:
        """Runs fn(*args) (image preprocessing) off the event loop; returns a concurrent Future."""
        ...

    def force_expert(self, expert: int | None) -> None:
        """Test hook (POST /v1/debug/force-expert, only with enable_test_hooks)."""
        ...

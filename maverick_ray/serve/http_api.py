"""The HTTP routes, as a FastAPI app over any backend: no Ray Serve here.

`make_api(get_backend)` builds the app; every route calls `get_backend()` for the object it
serves. Under Ray Serve (serve/app.py) that is the replica's `MaverickServer`; in the HTTP
tests it is a `Backend` whose service runs over an in-process fake engine (tests/fake_engine.py).

Every request gets a request id (serve/request_ids.py: the client's X-Request-Id, else a new
one), which server errors quote and the server log records with their detail. With an API key
configured every route but /health needs it (serve/auth.py; the /dashboard page asks for it).
CORS is off unless `cors_allow_origins` is set (serve/cors.py).

A backend is anything with these attributes (`Backend` is the plain one):
    service   OpenAIService (over an engine with the EngineProtocol: service.engine)
    metrics   maverick_ray.metrics.EngineMetrics, or None (then /v1/expert-load answers 404)
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse

from .auth import ApiKeyMiddleware
from .cors import SettingsCORSMiddleware
from .errors import APIError, error_body, with_request_id
from .request_ids import RequestIdMiddleware, request_id_of

if TYPE_CHECKING:  # importing the service imports torch (sampling); the Serve driver does not need it
    from .openai_service import OpenAIService

log = logging.getLogger(__name__)


@dataclass
class Backend:
    service: "OpenAIService"
    metrics: Any = None


def make_api(get_backend: Callable[[], Any], echo_request_id: bool = True) -> FastAPI:
    """`echo_request_id=False` under Ray Serve, whose proxy already sends X-Request-ID back."""
    api = FastAPI(title="maverick-ray", description="OpenAI-compatible Llama 4 MoE serving on Ray")
    settings = lambda: get_backend().service.settings  # noqa: E731 (read per request: Serve builds them later)
    # Outermost last: request id, then CORS (answers preflights, which carry no key), then the key check.
    api.add_middleware(ApiKeyMiddleware, get_settings=settings)
    api.add_middleware(SettingsCORSMiddleware, get_settings=settings)
    api.add_middleware(RequestIdMiddleware, echo=echo_request_id)

    @api.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @api.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):
        rid = request_id_of(request)
        log.exception("request %s: unhandled error", rid)
        # Sent by Starlette's outermost middleware, past RequestIdMiddleware: the id goes on here.
        return JSONResponse(status_code=500, headers={"X-Request-Id": rid} if echo_request_id else None,
                            content=error_body(with_request_id("internal server error", rid), "server_error"))

    @api.get("/health")
    async def health():
        engine = get_backend().service.engine
        if not engine.healthy:
            return JSONResponse(status_code=503, content={"status": "unhealthy", "error": engine.error})
        return {"status": "ok"}

    @api.get("/v1/models")
    async def models():
        return get_backend().service.models()

    @api.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await get_backend().service.chat(request)

    @api.post("/v1/completions")
    async def completions(request: Request):
        return await get_backend().service.completions(request)

    @api.post("/tokenize")
    async def tokenize(request: Request):
        """vLLM's /tokenize: the ids a prompt or a conversation runs as (serve/tokenize_api.py)."""
        from .tokenize_api import tokenize

        return await tokenize(get_backend().service, request)

    @api.post("/detokenize")
    async def detokenize(request: Request):
        from .tokenize_api import detokenize

        return await detokenize(get_backend().service, request)

    @api.get("/v1/engine/stats")
    async def engine_stats():
        return get_backend().service.engine.stats()

    @api.get("/v1/expert-load")
    async def expert_load():
        """Routing load over the recent window: per-expert heatmap, per-rank load, balancedness."""
        metrics = get_backend().metrics
        if metrics is None:
            raise APIError(404, "expert metrics are not enabled on this server", "invalid_request_error")
        return metrics.expert_load()

    @api.get("/dashboard")
    async def dashboard():
        """A static page (no data in it, so no key needed): it asks for the key when its polls get a 401."""
        from .dashboard import DASHBOARD_HTML

        return HTMLResponse(DASHBOARD_HTML)

    @api.post("/v1/debug/force-expert")
    async def force_expert(request: Request):
        backend = get_backend()
        if not backend.service.settings.enable_test_hooks:
            raise APIError(404, "test hooks are disabled", "invalid_request_error")
        expert = (await request.json()).get("expert")
        backend.service.engine.force_expert(expert)
        if backend.metrics is not None:
            backend.metrics.window.steps.clear()
        return {"expert": expert}

    return api

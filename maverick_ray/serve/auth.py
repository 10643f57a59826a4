"""The API key check: constant-time, on every route but /health.

With an API key configured (`api_key`, or the MAVERICK_RAY_API_KEY environment variable; see
serve/settings.py) every request must send `Authorization: Bearer <key>`, else it gets a 401 in
OpenAI's shape before its body is read. `ApiKeyMiddleware` applies it to every route of the app,
including /v1/engine/stats, /v1/expert-load, /tokenize, /detokenize, FastAPI's /docs and paths
that do not exist. Not checked:
- GET /health, for load balancers and Kubernetes probes;
- GET /dashboard, a static page with no data in it: it asks for the key (a login prompt; kept in
  the tab's sessionStorage) and sends it as a bearer header when it polls /v1/expert-load;
- with `dashboard_public: true`, also GET /v1/expert-load (the data that page shows: expert
  load and engine counters), so the page needs no key.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable

from fastapi.responses import JSONResponse
from starlette.datastructures import Headers

from .errors import APIError, error_body

PUBLIC = {("GET", "/health"), ("HEAD", "/health"), ("GET", "/dashboard")}
DASHBOARD_DATA = {("GET", "/v1/expert-load")}
MESSAGE = "invalid or missing API key (send 'Authorization: Bearer <key>')"


def key_matches(expected: str, authorization: str | None) -> bool:
    """Whether an Authorization header carries `expected` as its bearer token. The tokens are
    compared as SHA-256 digests with hmac.compare_digest: the time taken says nothing about the
    key, its length included."""
    scheme, _, token = (authorization or "").strip().partition(" ")
    # Starlette decodes header bytes as latin-1: encoding back gives the bytes the client sent
    got = hashlib.sha256(token.strip().encode("latin-1", "replace")).digest()
    want = hashlib.sha256(expected.encode("utf-8")).digest()
    return hmac.compare_digest(got, want) and scheme.lower() == "bearer"


def check_api_key(expected: str | None, authorization: str | None) -> None:
    """Raises the 401 APIError unless the key matches (nothing to check without a key)."""
    if expected and not key_matches(expected, authorization):
        raise APIError(401, MESSAGE, "authentication_error", None, "invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})


def route_path(scope) -> str:
    """The path within the app (Serve mounts an app under its route prefix, the `root_path`)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root):
        return path[len(root):] or "/"
    return path


class ApiKeyMiddleware:
    """Pure ASGI (streams pass through untouched). `get_settings()` returns the app's
    ServeSettings when a request arrives (under Serve the replica builds them after the app)."""

    def __init__(self, app, get_settings: Callable):
        self.app, self.get_settings = app, get_settings

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        settings = self.get_settings()
        route = (scope.get("method", "GET"), route_path(scope))
        exempt = route in PUBLIC or (settings.dashboard_public and route in DASHBOARD_DATA)
        if settings.api_key and not exempt and not key_matches(settings.api_key,
                                                               Headers(scope=scope).get("authorization")):
            response = JSONResponse(status_code=401, content=error_body(MESSAGE, "authentication_error", None,
                                                                        "invalid_api_key"),
                                    headers={"WWW-Authenticate": "Bearer"})
            return await response(scope, receive, send)
        await self.app(scope, receive, send)

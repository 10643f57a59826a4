"""CORS, off by default: Starlette's CORSMiddleware with the origins of the `cors_allow_origins`
setting (serve/settings.py), for browser clients on other origins.

The middleware is built from the settings on the first request, because under Ray Serve the
routes (and their middleware) exist before the replica has read its settings. With no origins
configured requests pass through untouched: no CORS headers, and a browser on another origin is
refused by its own same-origin rule. Preflight (OPTIONS) requests are answered here, before the
API key check, as browsers send them without credentials.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.middleware.cors import CORSMiddleware

EXPOSED_HEADERS = ["X-Request-Id", "Retry-After"]   # headers a browser client may read from replies


class SettingsCORSMiddleware:
    """Pure ASGI wrapper: `get_settings()` returns the app's ServeSettings at request time."""

    def __init__(self, app, get_settings: Callable):
        self.app, self.get_settings = app, get_settings
        self._built: tuple | None = None   # (settings, CORSMiddleware over self.app)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        settings = self.get_settings()
        if not settings.cors_allow_origins:
            return await self.app(scope, receive, send)
        if self._built is None or self._built[0] is not settings:
            self._built = (settings, CORSMiddleware(
                self.app, allow_origins=list(settings.cors_allow_origins), allow_methods=["GET", "POST"],
                allow_headers=list(settings.cors_allow_headers), allow_credentials=settings.cors_allow_credentials,
                expose_headers=EXPOSED_HEADERS, max_age=600))
        await self._built[1](scope, receive, send)

"""Request ids: one per HTTP request, quoted in server errors and in the server log.

The id is the client's `X-Request-Id` header when it sends a usable one, else a new one. Under
Ray Serve the proxy already does this (its RequestIdMiddleware puts the id in the request's
`x-request-id` header and echoes it as the response's `X-Request-ID`), so the replica only reads
the header; without Serve (the HTTP tests, any plain ASGI server) `RequestIdMiddleware` here both
picks the id and echoes it.
"""

from __future__ import annotations

import uuid

from starlette.datastructures import Headers, MutableHeaders

HEADER = "x-request-id"
MAX_LEN = 256


def pick_request_id(header: str | None) -> str:
    """The client's id when it is printable and at most MAX_LEN characters, else a new one."""
    value = (header or "").strip()
    return value if value and len(value) <= MAX_LEN and value.isprintable() else uuid.uuid4().hex


class RequestIdMiddleware:
    """Pure ASGI (streaming responses and client disconnects pass through untouched): puts the
    request id in `request.state.request_id` and, with `echo`, in the response's X-Request-Id."""

    def __init__(self, app, echo: bool = True):
        self.app, self.echo = app, echo

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = pick_request_id(Headers(scope=scope).get(HEADER))
        scope.setdefault("state", {})["request_id"] = rid
        if not self.echo:
            return await self.app(scope, receive, send)

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                if HEADER not in headers:
                    headers.append("X-Request-Id", rid)
            await send(message)

        await self.app(scope, receive, send_with_id)


def request_id_of(request) -> str:
    """The id RequestIdMiddleware gave this request (a new one if it did not run)."""
    state = request.scope.setdefault("state", {})
    if "request_id" not in state:
        state["request_id"] = pick_request_id(request.headers.get(HEADER))
    return state["request_id"]

"""OpenAI-style errors: {"error": {"message", "type", "param", "code"}} with the right HTTP status.

Server-side failures (5xx) reach the client as `server_error(...)`: what happened in user terms
plus "request id <id>"; the internal detail (ranks, nodes, Ray's messages) goes to the server log
under the same id, never into the response.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(status_code=self.status, content=self.body(), headers=self.headers)


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def with_request_id(message: str, request_id: str) -> str:
    return f"{message} (request id {request_id})"


def server_error(status: int, message: str, request_id: str, code: str | None = None,
                 headers: dict[str, str] | None = None) -> APIError:
    """A 5xx whose message says what happened in user terms, with the request id to quote."""
    return APIError(status, with_request_id(message, request_id), "server_error", None, code, headers)

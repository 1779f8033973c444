"""OpenAI-shaped error responses: `{"error": {"message", "type", "param", "code"}}`.

Every client mistake maps to a 4xx here; a 500 means a bug in kvserve, never bad input.
"""
from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine.errors import KVServeError, QueueFullError

log = logging.getLogger("kvserve.server")

CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left first; it never reaches anyone


class ClientDisconnected(Exception):
    """The client of a non-streaming request went away; its engine requests are aborted.

    An Exception, not asyncio.CancelledError: a CancelledError escapes every handler and reaches
    uvicorn, which logs an ordinary disconnect as an ERROR with a traceback."""

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    503: "server_overloaded",
}


# Anthropic's Messages API answers errors in its own shape: {"type": "error", "error": {"type", "message"}}
ANTHROPIC_PATH = "/v1/messages"
_ANTHROPIC_TYPE_BY_STATUS = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}


# text-generation-inference's routes answer in its shape, {"error": message, "error_type": kind}, which its
# clients (huggingface_hub's InferenceClient) turn into typed errors (ValidationError, OverloadedError, ...),
# with its statuses: 422 for a request it refuses, 429 when the queue is full
TGI_PATHS = ("/generate", "/generate_stream", "/")
_TGI_STATUS = {400: 422, 503: 429}
_TGI_TYPE_BY_STATUS = {429: "overloaded", 500: "generation"}


def tgi_status(status: int) -> int:
    return _TGI_STATUS.get(status, status)


def tgi_error_body(status: int, message: str, param: str | None = None) -> dict:
    """TGI's error for kvserve's `status` (before tgi_status): bad input is `validation`, a full queue
    `overloaded`, a failure of ours `generation`. TGI's body has no `param`: the message names it."""
    status = tgi_status(status)
    if param and param not in message:
        message = f"{param}: {message}"
    return {"error": message, "error_type": _TGI_TYPE_BY_STATUS.get(status, "generation" if status >= 500
                                                                   else "validation")}


def error_body(message: str, err_type: str, param: str | None = None, code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}


def anthropic_error_body(status: int, message: str) -> dict:
    err_type = _ANTHROPIC_TYPE_BY_STATUS.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": err_type, "message": message}}


def is_anthropic(path: str) -> bool:
    return path == ANTHROPIC_PATH or path.startswith(ANTHROPIC_PATH + "/")


def error_response(
    status: int, message: str, err_type: str | None = None, param: str | None = None,
    code: str | int | None = None, headers: dict[str, str] | None = None, path: str = "",
) -> JSONResponse:
    """The error in OpenAI's shape, or in Anthropic's or TGI's on their APIs' `path`s."""
    if is_anthropic(path):
        return JSONResponse(anthropic_error_body(status, message), status_code=status, headers=headers)
    if path in TGI_PATHS:
        return JSONResponse(tgi_error_body(status, message, param), status_code=tgi_status(status), headers=headers)
    err_type = err_type or _TYPE_BY_STATUS.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return JSONResponse(error_body(message, err_type, param, code), status_code=status, headers=headers)


def kvserve_error_response(exc: KVServeError, retry_after_s: int = 1, path: str = "") -> JSONResponse:
    headers = {"Retry-After": str(retry_after_s)} if isinstance(exc, QueueFullError) else None
    return error_response(exc.status_code, exc.message, exc.error_type, exc.param, exc.status_code, headers, path)


# pydantic names the branch of a union that failed ("constrained-str", "list[int]",
# "function-after[_visible(), str]", a tagged union's tag) in the error's location; clients want the
# field, so these labels are dropped from `param` and messages (a label with a space is a tag: no
# field has one)
_UNION_BRANCH = re.compile(r"(constrained-)?(str|int|float|bool|list|dict|tuple)(\[.*\])?|function-[\w-]+\[.*\]|.* .*")


def _where(loc: Any) -> str:
    """The field a validation error names: its location less where it came from (body, query, path)."""
    loc = tuple(loc)[1:] if loc and loc[0] in ("body", "query", "path") else tuple(loc)
    return ".".join(str(p) for p in loc if not (isinstance(p, str) and _UNION_BRANCH.fullmatch(p)))


def _describe_validation(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """One readable message for pydantic's error list, and the first offending top-level field.

    A value that fits no branch of a union gets one error per branch. Where a branch of the
    right type failed a constraint (a too-short string, a negative token id), that error is the
    one that explains; type mismatches of the other branches are noise and are dropped."""
    for err in errors:
        if err.get("type") == "json_invalid":
            return f"request body is not valid JSON: {err.get('ctx', {}).get('error', err.get('msg'))}", None
    by_field: dict[str, list[tuple[str, dict[str, Any]]]] = {}  # top-level field -> (where, error)
    for err in errors:
        where = _where(err.get("loc", ()))
        by_field.setdefault(where.split(".")[0], []).append((where, err))
    parts = []
    for located in list(by_field.values())[:5]:
        specific = [(w, e) for w, e in located if not str(e.get("type", "")).endswith("_type")] or located
        msgs: dict[str, list[str]] = {}
        for where, err in specific:
            msgs.setdefault(where, []).append(_message(err))
        parts += [f"{where or 'body'}: {' or '.join(dict.fromkeys(texts))}" for where, texts in msgs.items()]
    param = next((field for field in by_field if field), None)  # the top-level field, as OpenAI names it
    return "; ".join(parts) or "invalid request", param


def _message(err: dict[str, Any]) -> str:
    if err.get("type") == "value_error":  # our own validators' words, without pydantic's prefix
        return str(err.get("ctx", {}).get("error", err.get("msg")))
    return str(err.get("msg"))


def _allowed_methods(routes: list[Any], scope: Scope) -> set[str]:
    """The methods of every route whose path matches (FastAPI may nest an included router's routes)."""
    allowed: set[str] = set()
    for route in routes:
        nested = getattr(getattr(route, "original_router", None), "routes", None)
        if nested is not None:
            allowed |= _allowed_methods(nested, scope)
        elif getattr(route, "methods", None) and route.matches(scope)[0] != Match.NONE:
            allowed |= set(route.methods)
    return allowed


def install_error_handlers(app: FastAPI, retry_after_s: int) -> None:
    @app.exception_handler(KVServeError)
    async def _kvserve(request: Request, exc: KVServeError) -> JSONResponse:
        return kvserve_error_response(exc, retry_after_s, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        # OpenAI (and vLLM) answer bad parameters with 400, not FastAPI's default 422.
        message, param = _describe_validation(list(exc.errors()))
        return error_response(400, message, param=param, code=400, path=request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # keep Starlette's headers: a 405 must list the allowed methods in `Allow` (RFC 9110); Starlette's
        # names only the first route of the path, so one path served by two routes (GET and DELETE of a
        # stored response) gets every route's methods
        headers = exc.headers
        allowed = _allowed_methods(request.app.router.routes, request.scope) if exc.status_code == 405 else None
        if allowed:
            headers = {**(headers or {}), "Allow": ", ".join(sorted(allowed))}
        return error_response(exc.status_code, str(exc.detail), code=exc.status_code, headers=headers,
                              path=request.url.path)

    @app.exception_handler(ClientDisconnected)
    async def _disconnected(request: Request, _: ClientDisconnected) -> Response:
        log.info("client disconnected from %s %s; its requests were aborted", request.method, request.url.path)
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return error_response(500, f"internal error: {type(exc).__name__}", "server_error", code=500,
                              path=request.url.path)


class BodySizeLimit:
    """ASGI middleware: 413 for bodies over `max_bytes`, by Content-Length and by bytes actually read.

    The body is buffered (it is at most `max_bytes`) and replayed to the app, so a client that
    lies about or omits Content-Length is still cut off before JSON parsing starts.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def _reject(self, scope: Scope, send: Send, message: str) -> None:
        resp = error_response(413, message, param=None, code=413, path=scope.get("path", ""))
        await resp({"type": "http"}, _no_receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        limit_msg = f"request body exceeds the limit of {self.max_bytes} bytes"
        for key, value in scope.get("headers", ()):
            if key == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await self._reject_bad(scope, send)
                    return
                if declared > self.max_bytes:
                    await self._reject(scope, send, limit_msg)
                    return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                await self._reject(scope, send, limit_msg)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # later calls wait for the disconnect, as Starlette expects

        await self.app(scope, replay, send)

    async def _reject_bad(self, scope: Scope, send: Send) -> None:
        resp = error_response(400, "invalid Content-Length header", code=400, path=scope.get("path", ""))
        await resp({"type": "http"}, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}

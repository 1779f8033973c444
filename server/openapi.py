"""The OpenAPI document states what each route answers, errors included.

FastAPI documents a 422 for every route with a body; kvserve answers bad bodies with a 400 in
OpenAI's error shape instead (see `server.errors`), so the 422 entries are replaced by the
statuses a route can really give. A fuzz test (tests/test_openapi_contract.py) holds the routes
to this document.
"""
from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from server.schemas import ErrorResponse

_WHY = {
    400: "Invalid request: a malformed body, a parameter out of range, a prompt over the context",
    404: "The named model is not served",
    413: "The request body is over the server's limit",
    503: "The waiting queue is full (retry after `Retry-After` seconds), or the engine is not running",
}
# before OpenAPI 3.2, a stream's `schema` describes one event
_SSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {"data": {"type": "string", "description": "A JSON chunk; the last event's is `[DONE]`"}},
}
ENGINE_ERRORS = (400, 404, 413, 503)  # routes that queue work for an engine
TOKENIZER_ERRORS = (400, 404, 413)  # routes that only use a tokenizer


def answers(model: type[BaseModel], errors: tuple[int, ...], stream: bool = False) -> dict[int | str, Any]:
    """`responses=` for a route: `model` on success (or a server-sent event stream), then errors."""
    ok: dict[str, Any] = {"model": model, "description": "Success"}
    if stream:
        ok["description"] = "Success; with `stream: true`, server-sent events ending in `data: [DONE]`"
        ok["content"] = {"text/event-stream": {"schema": _SSE_EVENT}}
    return {200: ok, **{code: {"model": ErrorResponse, "description": _WHY[code]} for code in errors}}


def install_openapi(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
            for path in doc.get("paths", {}).values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            schemas = doc.get("components", {}).get("schemas", {})
            for unused in ("HTTPValidationError", "ValidationError"):
                schemas.pop(unused, None)
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

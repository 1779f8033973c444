"""The OpenAPI document states what each route answers, errors and streams included.

FastAPI documents a 422 for every route with a body; kvserve answers bad bodies with a 400 in
OpenAI's error shape instead (see `server.errors`), so the 422 entries are replaced by the
statuses a route can really give (TGI's routes document their own 422, in TGI's shape). A
streamed answer is documented event by event: each event's `data` is one chunk (a model of
`server.schemas` or `server.schemas_tgi`, named by `contentSchema`), an error body if the engine
fails mid-stream, and `[DONE]` last where the API has it (OpenAI's; not TGI's). A fuzz test
(tests/test_openapi_contract.py) holds the routes to this document, streamed chunks included.
"""
from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from server import schemas, schemas_anthropic, schemas_responses, schemas_tgi
from server.schemas import ErrorResponse

_WHY = {
    400: "Invalid request: a malformed body, a parameter out of range, a prompt over the context",
    401: "The server has an API key (`--api-key`) and the request's `Authorization: Bearer` token is not it",
    404: "The named model is not served, or (/v1/responses) no stored response has the id",
    413: "The request body is over the server's limit",
    422: "Invalid request (TGI's status for it): a malformed body, a parameter out of range, a prompt too long",
    429: "The waiting queue is full (TGI's status for it; retry after `Retry-After` seconds)",
    503: "The waiting queue is full (retry after `Retry-After` seconds), or the engine is not running",
}
ENGINE_ERRORS = (400, 401, 404, 413, 503)  # routes that queue work for an engine
TOKENIZER_ERRORS = (400, 401, 404, 413)  # routes that only use a tokenizer
TGI_ERRORS = (401, 404, 413, 422, 429)  # TGI's routes (server.errors.tgi_status)
_REF = "#/components/schemas/{model}"


def sse_event(chunk: type[BaseModel], done: bool = True, error: type[BaseModel] = ErrorResponse) -> dict[str, Any]:
    """One server-sent event (before OpenAPI 3.2, a stream's `schema` describes one event); `done`:
    the stream ends with `data: [DONE]` (OpenAI's streams do, TGI's do not)."""
    chunk_ref, error_ref = (_REF.format(model=m.__name__) for m in (chunk, error))
    json_data = {
        "type": "string",
        "contentMediaType": "application/json",
        "contentSchema": {"anyOf": [{"$ref": chunk_ref}, {"$ref": error_ref}]},
    }
    why = f"A JSON `{chunk.__name__}`, or an `{error.__name__}` if the engine fails mid-stream"
    data = ({"description": why + "; the last event's data is `[DONE]`", "anyOf": [json_data, {"const": "[DONE]"}]}
            if done else {"description": why, **json_data})
    return {"type": "object", "required": ["data"], "properties": {"data": data}}


def answers(model: type[BaseModel] | None, errors: tuple[int, ...], stream: type[BaseModel] | None = None,
            done: bool = True, error: type[BaseModel] = ErrorResponse) -> dict[int | str, Any]:
    """`responses=` for a route: `model` on success, or with `stream: true` events of `stream`
    chunks (only those when `model` is None: a route that always streams); then the error
    statuses the route can give, as `error` bodies (Anthropic's API has its own)."""
    ok: dict[str, Any] = {"description": "Success"} if model is None else {"model": model, "description": "Success"}
    if stream is not None:
        ending = " ending in `data: [DONE]`" if done else ""
        ok["description"] = (f"Server-sent events{ending}" if model is None
                             else f"Success; with `stream: true`, server-sent events{ending}")
        ok["content"] = {"text/event-stream": {"schema": sse_event(stream, done, error)}}
    return {200: ok, **{code: {"model": error, "description": _WHY[code]} for code in errors}}


def stream_chunk_models(doc: dict[str, Any]) -> dict[str, tuple[type[BaseModel], bool]]:
    """Path -> the chunk model its event stream documents, and whether `[DONE]` ends it."""
    found = {}
    for path, operations in doc.get("paths", {}).items():
        for operation in operations.values():
            sse = operation.get("responses", {}).get("200", {}).get("content", {}).get("text/event-stream")
            if sse is not None:
                data = sse["schema"]["properties"]["data"]
                done = "anyOf" in data
                ref = (data["anyOf"][0] if done else data)["contentSchema"]["anyOf"][0]["$ref"]
                name = ref.rsplit("/", 1)[-1]
                module = next(m for m in (schemas, schemas_anthropic, schemas_responses, schemas_tgi) if hasattr(m, name))
                found[path] = (getattr(module, name), done)
    return found


def install_openapi(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
            for path in doc.get("paths", {}).values():
                for operation in path.values():
                    body = operation.get("requestBody", {}).get("content", {}).get("application/json", {})
                    if "oneOf" in body.get("schema", {}):
                        # a union told apart by a function of the body (POST /): its branches overlap
                        # (unknown fields are ignored), so a body may fit several; the function picks
                        body["schema"]["anyOf"] = body["schema"].pop("oneOf")
                    responses = operation.get("responses", {})
                    if "HTTPValidationError" in str(responses.get("422")):  # FastAPI's, not TGI's own
                        responses.pop("422")
                    content = operation.get("responses", {}).get("200", {}).get("content", {})
                    if "text/event-stream" in content and content.get("application/json") == {"schema": {}}:
                        del content["application/json"]  # a route that only streams (answers(None, ...))
            components = doc.setdefault("components", {}).setdefault("schemas", {})
            for unused in ("HTTPValidationError", "ValidationError"):
                components.pop(unused, None)
            # FastAPI only collects models it serialises; the chunk models are named by reference
            chunks = {model for model, _ in stream_chunk_models(doc).values()}
            _, defs = models_json_schema([(m, "serialization") for m in chunks], ref_template=_REF)
            for name, schema in defs.get("$defs", {}).items():
                components.setdefault(name, schema)
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

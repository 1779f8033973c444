"""Server-sent events: one JSON object per `data:` event, and the guard every stream runs under."""
from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable

from fastapi.responses import StreamingResponse

from engine.errors import KVServeError
from server.errors import anthropic_error_body, error_body, tgi_error_body
from server.state import ServerState

HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DONE = "data: [DONE]\n\n"


def event(data: dict | str, name: str | None = None) -> str:
    """One event; `name` adds its `event:` line (the Responses API names each event by its type)."""
    head = "" if name is None else f"event: {name}\n"
    return f"{head}data: {data if isinstance(data, str) else json.dumps(data, separators=(',', ':'))}\n\n"


def _openai_error(status: int, message: str, err_type: str, param: str | None) -> str:
    return event(error_body(message, err_type, param, status))


def anthropic_error(status: int, message: str, err_type: str, param: str | None) -> str:
    """Anthropic's streams name their error event `error`."""
    return event(anthropic_error_body(status, message), "error")


def tgi_error(status: int, message: str, err_type: str, param: str | None) -> str:
    """TGI's streams send its error body as a plain event."""
    return event(tgi_error_body(status, message, param))


async def guard(events: AsyncIterator[str], state: ServerState, request_id: str,
                done: bool = True, error: Callable[[int, str, str, str | None], str] = _openai_error,
                ) -> AsyncIterator[str]:
    """An engine failure mid-stream becomes an `error` event (the status line is already sent); the
    stream ends with `[DONE]` where its API has one (OpenAI's; TGI's streams end without)."""
    try:
        async for item in events:
            yield item
    except KVServeError as exc:
        yield error(exc.status_code, exc.message, exc.error_type, exc.param)
    except Exception as exc:  # a bug: tell the client in-band
        yield error(500, f"internal error: {type(exc).__name__}", "server_error", None)
    finally:
        state.metrics.forget(request_id)
    if done:
        yield DONE


def response(events: AsyncIterator[str], state: ServerState, request_id: str, done: bool = True,
             error: Callable[[int, str, str, str | None], str] = _openai_error) -> StreamingResponse:
    return StreamingResponse(guard(events, state, request_id, done, error), media_type="text/event-stream",
                             headers=HEADERS)

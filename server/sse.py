"""Server-sent events: one JSON object per `data:` event, and the guard every stream runs under."""
from __future__ import annotations

import json
from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse

from engine.errors import KVServeError
from server.errors import error_body
from server.state import ServerState

HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DONE = "data: [DONE]\n\n"


def event(data: dict | str, name: str | None = None) -> str:
    """One event; `name` adds its `event:` line (the Responses API names each event by its type)."""
    head = "" if name is None else f"event: {name}\n"
    return f"{head}data: {data if isinstance(data, str) else json.dumps(data, separators=(',', ':'))}\n\n"


async def guard(events: AsyncIterator[str], state: ServerState, request_id: str,
                done: bool = True) -> AsyncIterator[str]:
    """An engine failure mid-stream becomes an error event (the status line is already sent); the
    stream ends with `[DONE]` where its API has one (OpenAI's; TGI's streams end without)."""
    try:
        async for item in events:
            yield item
    except KVServeError as exc:
        yield event(error_body(exc.message, exc.error_type, exc.param, exc.status_code))
    except Exception as exc:  # a bug: tell the client in-band
        yield event(error_body(f"internal error: {type(exc).__name__}", "server_error", None, 500))
    finally:
        state.metrics.forget(request_id)
    if done:
        yield DONE


def response(events: AsyncIterator[str], state: ServerState, request_id: str, done: bool = True) -> StreamingResponse:
    return StreamingResponse(guard(events, state, request_id, done), media_type="text/event-stream", headers=HEADERS)

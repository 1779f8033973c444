"""Stored Responses API answers: what `GET /v1/responses/{id}` returns and what
`previous_response_id` continues. In memory and bounded: the oldest answer goes first once
`capacity` are kept (0 keeps none, and a request that names one gets a 404 saying so)."""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from engine.errors import KVServeError
from server.event_log import EventLog


class ResponseNotFoundError(KVServeError):
    """No stored response has this id (HTTP 404)."""

    status_code = 404
    error_type = "not_found_error"


@dataclass(frozen=True)
class StoredResponse:
    body: dict[str, Any]  # the answer as it was sent
    messages: tuple[dict[str, Any], ...]  # the conversation through this answer, as chat messages (no instructions)
    input_items: tuple[dict[str, Any], ...] = ()  # the request's own input, as GET .../input_items lists it
    events: EventLog | None = None  # a background response's stream events, for GET ...?stream=true


class ResponseStore:
    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self._items: OrderedDict[str, StoredResponse] = OrderedDict()
        self._lock = threading.Lock()  # routes run on the event loop; tests may read from other threads

    def __len__(self) -> int:
        return len(self._items)

    def put(self, response_id: str, stored: StoredResponse) -> None:
        if self.capacity == 0:
            return
        with self._lock:
            self._items[response_id] = stored
            self._items.move_to_end(response_id)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def get(self, response_id: str, param: str | None = None) -> StoredResponse:
        with self._lock:
            stored = self._items.get(response_id)
        if stored is None:
            why = "" if self.capacity else " (this server stores none: --responses-store-size is 0)"
            raise ResponseNotFoundError(f"no stored response with id {response_id!r}{why}", param)
        return stored

    def delete(self, response_id: str) -> None:
        with self._lock:
            if self._items.pop(response_id, None) is None:
                raise ResponseNotFoundError(f"no stored response with id {response_id!r}")


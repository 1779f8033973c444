"""A background response's stream events, kept so any number of readers can follow them, each from
where it left off: OpenAI's resumable streams (`GET /v1/responses/{id}?stream=true&starting_after=N`).

The task that runs the response appends and finally closes; readers replay what is there, then wait
for more. Everything runs on the server's event loop: no locks.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any


class EventLog:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []  # in sequence_number order, from 0
        self.closed = False
        self._changed = asyncio.Event()

    def append(self, events: list[dict[str, Any]]) -> None:
        if events:
            self.events.extend(events)
            self._wake()

    def close(self) -> None:
        """No more events: the response ended (completed, failed, cancelled)."""
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def follow(self, starting_after: int | None = None) -> AsyncIterator[dict[str, Any]]:
        """The events after sequence number `starting_after` (all with None), then each new one as it
        comes, until the log closes."""
        i = 0 if starting_after is None else starting_after + 1
        while True:
            while i < len(self.events):
                yield self.events[i]
                i += 1
            if self.closed:
                return
            await self._changed.wait()

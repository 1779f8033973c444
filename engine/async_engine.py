"""Async front for the HTTP server: one worker thread steps every served engine in turn.

Why a thread: the model step is long-running torch work that releases the GIL, so the asyncio
loop keeps accepting requests and streaming while the worker steps. Engines are only ever
touched by the worker; the event loop talks to them through a command queue, so no engine
needs locks. `validate` is the one call made from the loop thread: it reads config only.

Why the caller may pass the executor the loop runs on: every thread that runs torch work on
CPU gets its own OpenMP team, and libgomp stops spin-waiting between parallel regions once the
process holds more team threads than cores. Engines loaded on the main thread and stepped on
another ran each small GEMM a third slower (2 cores: the second team's worker slept through every
gap between regions). `kvserve serve` loads its engines on the ComputeThread that then steps them.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol, TypeVar

from engine.compute_thread import ComputeThread
from engine.errors import ModelNotFoundError, QueueFullError

T = TypeVar("T")


class StepEngine(Protocol):
    """What the worker needs from an engine (generation, embeddings, translation)."""

    def validate(self, payload: Any) -> None:
        """Raise a KVServeError for a request the engine would refuse; must not change state."""
        ...

    def add_request(self, request_id: str, payload: Any) -> None: ...

    def abort_request(self, request_id: str) -> None: ...

    def has_unfinished_requests(self) -> bool: ...

    def num_waiting(self) -> int: ...

    def step(self) -> list[Any]:
        """Run one step; return outputs that each have `.request_id` and `.finished`."""
        ...


StepHook = Callable[[str, Any, list[Any], float], None]  # (model name, engine, outputs, seconds)


class AsyncEngine:
    """Owns the served engines and the worker thread; `stream()` is the one entry point."""

    def __init__(
        self,
        engines: dict[str, StepEngine],
        max_waiting: int = 256,
        on_step: StepHook | None = None,
        executor: concurrent.futures.Executor | None = None,
    ) -> None:
        """`executor` (one thread) runs the step loop; pass the one the engines were loaded on."""
        self.engines = engines
        self.max_waiting = max_waiting
        self.on_step = on_step
        self._commands: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, asyncio.Queue] = {}
        self._owner: dict[str, str] = {}  # request id -> model name, for aborts
        self._pending: dict[str, int] = {name: 0 for name in engines}  # added, not yet seen by worker
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor = executor  # None: a ComputeThread of its own, made at start, ended at shutdown
        self._owns_executor = executor is None
        self._worker: concurrent.futures.Future | None = None
        self._running = False
        self.accepting = True

    # ---- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._running = True
        if self._executor is None:
            self._executor = ComputeThread()
        self._worker = self._executor.submit(self._work)

    async def shutdown(self, timeout: float = 10.0) -> None:
        """Stop accepting, let in-flight requests finish for `timeout` s, then abort the rest."""
        self.accepting = False
        deadline = time.monotonic() + timeout
        while self._streams and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for request_id, name in list(self._owner.items()):
            self._commands.put(("abort", name, request_id))
        self._wake.set()
        await asyncio.sleep(0.05)
        self._running = False
        self._wake.set()
        if self._worker is not None:
            await asyncio.get_running_loop().run_in_executor(None, concurrent.futures.wait, [self._worker], 5.0)
        if self._owns_executor and self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None

    @property
    def is_running(self) -> bool:
        return self._running and self._worker is not None and not self._worker.done()

    # ---- requests (event-loop side) -------------------------------------------------
    def serving(self, name: str) -> str:
        """The served model a request for `name` runs on: itself, or the one that has a LoRA
        adapter of that name loaded (the payload names the adapter)."""
        if name in self.engines:
            return name
        return next((base for base, e in self.engines.items() if name in getattr(e, "lora_names", ())), name)

    def check(self, name: str, payload: Any) -> None:
        """Raise now what `stream` would raise at admission (bad request, model gone, queue full):
        for callers that answer before the request runs (background responses)."""
        self._check_admission(self.serving(name), payload)

    def _check_admission(self, name: str, payload: Any) -> StepEngine:
        engine = self.engines.get(name)
        if engine is None:
            raise ModelNotFoundError(f"model {name!r} is not served here; see GET /v1/models", "model")
        if not self.accepting:
            raise QueueFullError("server is shutting down")
        engine.validate(payload)
        if engine.num_waiting() + self._pending[name] >= self.max_waiting:
            raise QueueFullError(
                f"too many waiting requests for {name!r} (limit {self.max_waiting}); retry later"
            )
        return engine

    async def stream(self, name: str, request_id: str, payload: Any) -> AsyncIterator[Any]:
        """Yield the request's outputs until one is finished; abort it if the caller leaves."""
        name = self.serving(name)
        self._check_admission(name, payload)
        out_queue: asyncio.Queue = asyncio.Queue()
        self._owner[request_id] = name
        self._streams[request_id] = out_queue
        self._pending[name] += 1
        self._commands.put(("add", name, request_id, payload))
        self._wake.set()
        finished = False
        try:
            while True:
                item = await out_queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = bool(item.finished)
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            self._owner.pop(request_id, None)
            if not finished:  # client left (or was cancelled): free its KV blocks now
                self._commands.put(("abort", name, request_id))
                self._wake.set()

    async def run(self, name: str, request_id: str, payload: Any) -> Any:
        """The final output of a non-streamed request."""
        last = None
        async for last in self.stream(name, request_id, payload):
            pass
        return last

    async def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the worker thread between steps (it owns the engines: loading a LoRA
        adapter, say) and return its result or raise its exception here."""
        if not self.is_running:
            raise QueueFullError("the engine worker is not running")
        done: asyncio.Future = asyncio.get_running_loop().create_future()
        self._commands.put(("call", fn, done))
        self._wake.set()
        return await done

    # ---- worker thread --------------------------------------------------------------
    def _deliver(self, request_id: str, item: Any) -> None:
        q = self._streams.get(request_id)
        if q is not None:
            q.put_nowait(item)

    def _drain_commands(self) -> None:
        assert self._loop is not None
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "call":
                self._run_call(cmd[1], cmd[2])
                continue
            name, request_id = cmd[1], cmd[2]
            engine = self.engines[name]
            if cmd[0] == "add":
                self._pending[name] -= 1
                if request_id not in self._streams:
                    continue  # the client left before its request reached the engine
                try:
                    engine.add_request(request_id, cmd[3])
                except Exception as exc:  # validated already; still never kill the worker
                    self._loop.call_soon_threadsafe(self._deliver, request_id, exc)
            else:
                engine.abort_request(request_id)

    def _run_call(self, fn: Callable[[], Any], done: asyncio.Future) -> None:
        assert self._loop is not None
        try:
            result = fn()
        except Exception as exc:  # a refused adapter, say: the caller's error, not the worker's
            self._loop.call_soon_threadsafe(_settle, done, None, exc)
        else:
            self._loop.call_soon_threadsafe(_settle, done, result, None)

    def _work(self) -> None:
        assert self._loop is not None
        while self._running:
            self._drain_commands()
            busy = [(n, e) for n, e in self.engines.items() if e.has_unfinished_requests()]
            if not busy:
                self._wake.wait(timeout=0.05)
                self._wake.clear()
                continue
            for name, engine in busy:
                start = time.monotonic()
                try:
                    outputs = engine.step()
                except Exception as exc:  # a bug, not a client error: fail its requests, keep serving
                    self._fail_all(name, engine, exc)
                    continue
                if self.on_step is not None:
                    self.on_step(name, engine, outputs, time.monotonic() - start)
                for out in outputs:
                    self._loop.call_soon_threadsafe(self._deliver, out.request_id, out)
                self._drain_commands()

    def _fail_all(self, name: str, engine: StepEngine, exc: Exception) -> None:
        assert self._loop is not None
        for request_id, owner in list(self._owner.items()):
            if owner == name:
                engine.abort_request(request_id)
                self._loop.call_soon_threadsafe(self._deliver, request_id, exc)


def _settle(done: asyncio.Future, result: Any, exc: BaseException | None) -> None:
    if done.cancelled():  # the caller left
        return
    if exc is not None:
        done.set_exception(exc)
    else:
        done.set_result(result)

"""One daemon thread that runs submitted calls in order: the server's torch thread.

Why not a ThreadPoolExecutor: its threads are joined at interpreter exit, so a step loop that
was never stopped (a test, a crash in startup) would hang the exit. Why one thread for all torch
work: see engine/async_engine.py (one OpenMP team per thread that runs torch ops).
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any


class ComputeThread(Executor):
    """`submit(fn, *args)` runs fn on the thread, after everything submitted before it."""

    def __init__(self, name: str = "kvserve-engine") -> None:
        self._jobs: queue.SimpleQueue[tuple[Future, Callable[..., Any], tuple, dict] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        future: Future = Future()
        self._jobs.put((future, fn, args, kwargs))
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._jobs.put(None)
        if wait:
            self._thread.join()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            future, fn, args, kwargs = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as exc:  # delivered to whoever waits on the future
                future.set_exception(exc)

"""AsyncEngine's worker: which thread steps the engines, and that it never holds up exit."""
from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from pathlib import Path

from engine.async_engine import AsyncEngine
from engine.compute_thread import ComputeThread
from engine.request import GenerationRequest
from engine.sampling_params import SamplingParams
from tests.server_helpers import FakeEngine

ROOT = Path(__file__).resolve().parent.parent


class _ThreadRecordingEngine(FakeEngine):
    """A FakeEngine that remembers the threads it was built and stepped on."""

    def __init__(self) -> None:
        super().__init__(step_delay_s=0.0)
        self.built_on = threading.get_ident()
        self.stepped_on: set[int] = set()

    def step(self):  # type: ignore[override]
        self.stepped_on.add(threading.get_ident())
        return super().step()


def _run_one(async_engine: AsyncEngine) -> None:
    async def main() -> None:
        async_engine.start()
        try:
            payload = GenerationRequest([5, 6, 7], SamplingParams(max_tokens=3, temperature=0.0))
            out = await async_engine.run("fake", "r1", payload)
            assert out.finished
        finally:
            await async_engine.shutdown(timeout=2)

    asyncio.run(main())


def test_engines_are_stepped_on_the_executor_that_built_them():
    # one OpenMP team for all torch work: the loading thread is the stepping thread
    compute = ComputeThread()
    engine = compute.submit(_ThreadRecordingEngine).result()
    _run_one(AsyncEngine({"fake": engine}, executor=compute))
    compute.shutdown()
    assert engine.built_on != threading.get_ident()
    assert engine.stepped_on == {engine.built_on}


def test_default_worker_is_one_thread_apart_from_the_loop_and_ends_at_shutdown():
    engine = _ThreadRecordingEngine()
    _run_one(AsyncEngine({"fake": engine}))
    assert len(engine.stepped_on) == 1 and threading.get_ident() not in engine.stepped_on
    (worker,) = [t for t in threading.enumerate() if t.ident in engine.stepped_on] or [None]
    if worker is not None:  # it may have ended already
        worker.join(timeout=5)
        assert not worker.is_alive()


def test_a_started_engine_never_shut_down_does_not_hang_interpreter_exit():
    code = (
        "import asyncio\n"
        "from engine.async_engine import AsyncEngine\n"
        "from tests.server_helpers import FakeEngine\n"
        "async def main():\n"
        "    AsyncEngine({'fake': FakeEngine()}).start()\n"
        "    await asyncio.sleep(0.1)\n"
        "asyncio.run(main())\n"
        "print('exiting')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "exiting"


def test_compute_thread_runs_calls_in_order_and_returns_their_errors():
    compute = ComputeThread()
    seen: list[int] = []
    futures = [compute.submit(seen.append, i) for i in range(20)]
    assert [f.result(timeout=5) for f in futures] == [None] * 20 and seen == list(range(20))
    failing = compute.submit(int, "not a number")
    try:
        failing.result(timeout=5)
    except ValueError:
        pass
    else:
        raise AssertionError("the call's exception must reach the caller")
    assert compute.submit(threading.get_ident).result(timeout=5) != threading.get_ident()
    compute.shutdown()

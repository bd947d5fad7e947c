"""The model executor: results and errors come back on the loop; shutdown finishes submitted work."""

from __future__ import annotations

import asyncio
import threading

import pytest

from ferry.server.models.executor import ModelExecutor


def test_runs_on_worker_threads_and_returns_results_and_errors() -> None:
    async def test() -> None:
        executor = ModelExecutor(2, "t")
        main = threading.get_ident()
        assert await executor.submit(lambda a, b: (a + b, threading.get_ident() != main), 2, 3) == (5, True)

        def boom() -> None:
            raise ValueError("bad batch")

        with pytest.raises(ValueError, match="bad batch"):
            await executor.submit(boom)
        executor.shutdown()

    asyncio.run(test())


def test_two_workers_run_two_calls_at_once() -> None:
    async def test() -> None:
        executor = ModelExecutor(2, "t")
        both = threading.Barrier(2, timeout=5)  # only passes if two calls run concurrently
        assert await asyncio.gather(executor.submit(both.wait), executor.submit(both.wait)) is not None
        executor.shutdown()

    asyncio.run(test())


def test_shutdown_finishes_submitted_work_then_refuses() -> None:
    async def test() -> None:
        executor = ModelExecutor(1, "t")
        gate = threading.Event()
        first = executor.submit(gate.wait, 5)
        second = executor.submit(lambda: "done")
        executor.shutdown()
        gate.set()
        assert await asyncio.wait_for(first, 5) is True and await asyncio.wait_for(second, 5) == "done"
        with pytest.raises(RuntimeError, match="shut down"):
            executor.submit(lambda: None)

    asyncio.run(test())


def test_a_cancelled_waiter_does_not_break_the_worker() -> None:
    async def test() -> None:
        executor = ModelExecutor(1, "t")
        gate = threading.Event()
        waiting = executor.submit(gate.wait, 5)
        waiting.cancel()
        gate.set()
        assert await asyncio.wait_for(executor.submit(lambda: 7), 5) == 7
        executor.shutdown()

    asyncio.run(test())

"""The batcher, driven by events and a controllable clock: no sleeps decide an outcome."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import pytest

from ferry.client.errors import DeadlineExceeded, Internal, InvalidArgument, Unavailable
from ferry.server.models.batching import Batcher, BatchPolicy, LevelPolicy

WAIT_S = 5.0  # upper bound on any wait: a broken batcher fails the test instead of hanging it


class Clock:
    """A clock the test moves by hand; ``reads`` counts how often the batcher looked at it."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.reads = 0
        self._read = asyncio.Event()

    def __call__(self) -> float:
        self.reads += 1
        self._read.set()
        return self.now

    async def wait_reads(self, count: int) -> None:
        async def until() -> None:
            while self.reads < count:
                self._read.clear()
                await self._read.wait()

        await asyncio.wait_for(until(), WAIT_S)


class Model:
    """A run callback that records its batches and holds each one until the test releases it."""

    def __init__(self, hold: bool = True, fail_on: object = None) -> None:
        self.batches: list[list[Any]] = []
        self.entered = asyncio.Event()
        self._gates: list[asyncio.Event] = []
        self.hold = hold
        self.fail_on = fail_on

    async def __call__(self, payloads: list[Any]) -> Sequence[Any]:
        self.batches.append(payloads)
        self.entered.set()
        if self.hold:
            gate = asyncio.Event()
            self._gates.append(gate)
            await gate.wait()
        if self.fail_on in payloads:
            raise RuntimeError("model exploded")
        return [f"out:{p}" for p in payloads]

    async def wait_batches(self, count: int) -> None:
        async def until() -> None:
            while len(self.batches) < count:
                self.entered.clear()
                await self.entered.wait()

        await asyncio.wait_for(until(), WAIT_S)

    def release(self) -> None:
        for gate in self._gates:
            gate.set()
        self.hold = False


def policy(**changes: Any) -> BatchPolicy:
    values: dict[str, Any] = {"batching": True, "max_batch_rows": 4, "max_queue_delay_s": 0.0}
    values.update(changes)
    return BatchPolicy(**values)


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 30))


async def started(batcher: Batcher, *submits: Awaitable[Any]) -> list[asyncio.Task[Any]]:
    tasks = [asyncio.ensure_future(s) for s in submits]
    await asyncio.sleep(0)  # let each submit enqueue (ordering only; outcomes are awaited on events)
    return tasks


def test_batches_are_bounded_in_rows_and_fill_while_the_model_is_busy() -> None:
    async def test() -> None:
        model = Model()
        batcher = Batcher(policy(max_batch_rows=4), model, "m")
        batcher.start()
        first = await started(batcher, batcher.submit("a", 1))
        await model.wait_batches(1)
        rest = await started(batcher, *(batcher.submit(p, r) for p, r in [("b", 1), ("c", 2), ("d", 1), ("e", 3)]))
        model.release()
        results = await asyncio.wait_for(asyncio.gather(*first, *rest), WAIT_S)
        assert [r for r, _ in results] == ["out:a", "out:b", "out:c", "out:d", "out:e"]
        assert model.batches == [["a"], ["b", "c", "d"], ["e"]]
        await batcher.close()

    run(test)


def test_window_opens_at_the_first_request() -> None:
    async def test() -> None:
        clock, model = Clock(), Model(hold=False)
        batcher = Batcher(policy(max_batch_rows=100, max_queue_delay_s=10.0), model, "m", clock)
        batcher.start()
        first = await started(batcher, batcher.submit("a", 1))
        await clock.wait_reads(2)  # "a" enqueued, then the batcher looked and opened the window
        assert model.batches == []
        clock.now += 11.0  # the window of "a" has closed; "b" arrives and wakes the batcher
        second = await started(batcher, batcher.submit("b", 1))
        await asyncio.wait_for(asyncio.gather(*first, *second), WAIT_S)
        assert model.batches == [["a", "b"]]
        await batcher.close()

    run(test)


def test_preferred_size_leaves_without_waiting_for_the_window() -> None:
    async def test() -> None:
        model = Model(hold=False)
        batcher = Batcher(policy(max_batch_rows=8, preferred_rows=(2,), max_queue_delay_s=3600.0), model, "m")
        batcher.start()
        tasks = await started(batcher, batcher.submit("a", 1), batcher.submit("b", 1))
        await asyncio.wait_for(asyncio.gather(*tasks), WAIT_S)
        assert model.batches == [["a", "b"]]
        await batcher.close()

    run(test)


def test_window_closes_before_the_earliest_deadline() -> None:
    async def test() -> None:
        clock, model = Clock(), Model(hold=False)
        batcher = Batcher(policy(max_batch_rows=8, max_queue_delay_s=100.0), model, "m", clock)
        batcher.start()
        first = await started(batcher, batcher.submit("a", 1, deadline=clock.now + 1.0))
        await clock.wait_reads(2)
        clock.now += 0.999  # long before the 100 s window ends, but within the margin of "a"'s deadline
        second = await started(batcher, batcher.submit("b", 1))
        results = await asyncio.wait_for(asyncio.gather(*first, *second), WAIT_S)
        assert [r for r, _ in results] == ["out:a", "out:b"] and model.batches == [["a", "b"]]
        await batcher.close()

    run(test)


def test_higher_priority_runs_first() -> None:
    async def test() -> None:
        model = Model()
        levels = (LevelPolicy(10, None, False, True),) * 2
        batcher = Batcher(policy(max_batch_rows=1, levels=levels, default_level=2), model, "m")
        batcher.start()
        busy = await started(batcher, batcher.submit("busy", 1))
        await model.wait_batches(1)
        queued = await started(
            batcher,
            batcher.submit("low", 1),
            batcher.submit("default", 1, priority=0),
            batcher.submit("high", 1, priority=1),
        )
        model.release()
        await asyncio.wait_for(asyncio.gather(*busy, *queued), WAIT_S)
        assert model.batches == [["busy"], ["high"], ["low"], ["default"]]
        with pytest.raises(InvalidArgument, match=r"priority 3 is outside 1\.\.2"):
            await batcher.submit("x", 1, priority=3)
        await batcher.close()

    run(test)


def test_full_queue_rejects_at_admission() -> None:
    async def test() -> None:
        model = Model()
        batcher = Batcher(policy(max_batch_rows=1, levels=(LevelPolicy(2, None, False, True),)), model, "m")
        batcher.start()
        tasks = await started(batcher, batcher.submit("busy", 1))
        await model.wait_batches(1)
        tasks += await started(batcher, batcher.submit("q1", 1), batcher.submit("q2", 1))
        with pytest.raises(Unavailable, match=r"queue is full \(2 requests waiting"):
            await batcher.submit("rejected", 1)
        model.release()
        await asyncio.wait_for(asyncio.gather(*tasks), WAIT_S)
        assert ["rejected"] not in model.batches
        await batcher.close()

    run(test)


def test_expired_and_cancelled_requests_never_reach_the_model() -> None:
    async def test() -> None:
        clock, model = Clock(), Model()
        batcher = Batcher(policy(max_batch_rows=8), model, "m", clock)
        batcher.start()
        busy = await started(batcher, batcher.submit("busy", 1))
        await model.wait_batches(1)
        late, gone, ok = await started(
            batcher,
            batcher.submit("late", 1, deadline=clock.now + 1.0),
            batcher.submit("gone", 1),
            batcher.submit("ok", 1),
        )
        gone.cancel()
        clock.now += 2.0
        model.release()
        with pytest.raises(DeadlineExceeded, match="the caller's deadline passed"):
            await asyncio.wait_for(late, WAIT_S)
        assert (await asyncio.wait_for(ok, WAIT_S))[0] == "out:ok"
        await asyncio.gather(*busy)
        assert model.batches == [["busy"], ["ok"]]
        assert batcher.queued == 0
        await batcher.close()

    run(test)


def test_queue_timeout_reject_and_delay() -> None:
    async def test() -> None:
        clock, model = Clock(), Model()
        levels = (LevelPolicy(10, 1.0, False, True), LevelPolicy(10, 1.0, True, False))
        batcher = Batcher(policy(max_batch_rows=1, levels=levels), model, "m", clock)
        batcher.start()
        busy = await started(batcher, batcher.submit("busy", 1))
        await model.wait_batches(1)
        rejected, delayed, fresh = await started(
            batcher,
            batcher.submit("rejected", 1, priority=1, timeout_s=0.5),
            batcher.submit("delayed", 1, priority=2),
            batcher.submit("fresh", 1, priority=2, timeout_s=0.1),  # override not allowed on level 2: 1 s
        )
        clock.now += 0.7  # past "rejected"'s own timeout, not yet past level 2's
        late = await started(batcher, batcher.submit("later", 1, priority=2))
        clock.now += 0.5  # "delayed" and "fresh" pass their 1 s timeout: they go behind "later"
        model.release()
        with pytest.raises(DeadlineExceeded, match="queue timeout passed"):
            await asyncio.wait_for(rejected, WAIT_S)
        await asyncio.wait_for(asyncio.gather(*busy, delayed, fresh, *late), WAIT_S)
        assert model.batches == [["busy"], ["later"], ["delayed"], ["fresh"]]
        await batcher.close()

    run(test)


def test_signatures_never_share_a_batch() -> None:
    async def test() -> None:
        model = Model()
        batcher = Batcher(policy(max_batch_rows=8), model, "m")
        batcher.start()
        tasks = await started(batcher, batcher.submit("busy", 1))
        await model.wait_batches(1)
        tasks += await started(
            batcher, batcher.submit("a1", 1, (3,)), batcher.submit("b1", 1, (5,)), batcher.submit("a2", 1, (3,))
        )
        model.release()
        await asyncio.wait_for(asyncio.gather(*tasks), WAIT_S)
        assert model.batches == [["busy"], ["a1", "a2"], ["b1"]]
        await batcher.close()

    run(test)


def test_without_batching_each_request_runs_alone() -> None:
    async def test() -> None:
        model = Model()
        batcher = Batcher(policy(batching=False, max_batch_rows=8), model, "m")
        batcher.start()
        tasks = await started(batcher, batcher.submit("busy", 1))
        await model.wait_batches(1)
        tasks += await started(batcher, batcher.submit("a", 2), batcher.submit("b", 2))
        model.release()
        await asyncio.wait_for(asyncio.gather(*tasks), WAIT_S)
        assert model.batches == [["busy"], ["a"], ["b"]]
        await batcher.close()

    run(test)


def test_model_error_fails_only_its_batch() -> None:
    async def test() -> None:
        model = Model(fail_on="boom")
        batcher = Batcher(policy(max_batch_rows=2), model, "m")
        batcher.start()
        busy = await started(batcher, batcher.submit("busy", 1))
        await model.wait_batches(1)
        doomed = await started(batcher, batcher.submit("boom", 1), batcher.submit("neighbour", 1))
        fine = await started(batcher, batcher.submit("after", 1))
        model.release()
        for task in doomed:
            with pytest.raises(Internal, match="batch of 2 requests failed: model exploded"):
                await asyncio.wait_for(task, WAIT_S)
        assert (await asyncio.wait_for(fine[0], WAIT_S))[0] == "out:after"
        await asyncio.gather(*busy)
        await batcher.close()

    run(test)


def test_instances_run_batches_concurrently() -> None:
    async def test() -> None:
        model = Model()
        batcher = Batcher(policy(max_batch_rows=1, instances=2), model, "m")
        batcher.start()
        tasks = await started(batcher, batcher.submit("a", 1), batcher.submit("b", 1), batcher.submit("c", 1))
        await model.wait_batches(2)  # two held at once
        assert model.batches == [["a"], ["b"]] and batcher.queued == 1
        model.release()
        await asyncio.wait_for(asyncio.gather(*tasks), WAIT_S)
        await batcher.close()

    run(test)


def test_close_fails_queued_and_drains_running() -> None:
    async def test() -> None:
        model = Model()
        batcher = Batcher(policy(max_batch_rows=1), model, "m")
        batcher.start()
        running = await started(batcher, batcher.submit("running", 1))
        await model.wait_batches(1)
        queued = await started(batcher, batcher.submit("queued", 1))
        closing = asyncio.ensure_future(batcher.close())
        with pytest.raises(Unavailable, match="shutting down"):
            await asyncio.wait_for(queued[0], WAIT_S)
        assert not closing.done()  # waits for the running batch
        model.release()
        await asyncio.wait_for(closing, WAIT_S)
        assert (await running[0])[0] == "out:running"
        with pytest.raises(Unavailable, match="shutting down"):
            await batcher.submit("after", 1)

    run(test)


def test_a_lone_request_runs_in_its_callers_task_and_close_waits_for_it() -> None:
    async def test() -> None:
        tasks_seen: list[asyncio.Task[Any] | None] = []
        gate = asyncio.Event()

        async def model(payloads: list[Any]) -> list[Any]:
            tasks_seen.append(asyncio.current_task())
            await gate.wait()
            return payloads

        batcher = Batcher(policy(max_batch_rows=8), model, "m")
        batcher.start()
        caller = asyncio.ensure_future(batcher.submit("alone", 1))
        await asyncio.sleep(0)
        assert tasks_seen == [caller]  # no hop through the dispatcher
        closing = asyncio.ensure_future(batcher.close())
        await asyncio.sleep(0)
        assert not closing.done()  # the direct run still holds its instance
        gate.set()
        assert (await asyncio.wait_for(caller, WAIT_S)) == ("alone", 0.0)
        await asyncio.wait_for(closing, WAIT_S)

    run(test)

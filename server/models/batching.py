"""Dynamic batching: one queue per model version, batches formed by rows within a delay window.

The batcher is plain asyncio and knows nothing of gRPC, protobuf or onnxruntime: it queues opaque payloads, forms
batches, hands each batch to an async ``run`` callback and gives every waiter its own result. It is event-driven
(no polling), uses the monotonic clock, and has an explicit lifecycle: :meth:`Batcher.start`,
:meth:`Batcher.submit`, :meth:`Batcher.close`.

How a batch forms (the knobs are Triton's ``dynamic_batching`` block):

- The window opens when the oldest waiting request arrived and lasts ``max_queue_delay``. A batch leaves as soon as
  it holds ``max_batch_rows`` rows or a preferred size, when the window closes, or when waiting longer would pass
  the earliest deadline among its requests (less the recent execution time), whichever comes first.
- Requests are taken highest priority first, oldest first, while they fit in ``max_batch_rows``. Requests whose
  ``signature`` differs (non-batch dimensions, datatypes) from the first one never join its batch.
- A request whose deadline passed or whose caller went away is dropped while batches form, before the model sees it.
- At most ``instances`` batches run at once; while they run, the queue fills and the next batch takes what came.
- Admission is bounded: a full queue rejects at once with UNAVAILABLE, so memory stays bounded under any load.

Two ways to stop: :meth:`Batcher.close` (server shutdown: queued requests fail with UNAVAILABLE, running batches
finish) and :meth:`Batcher.drain` (a version swapped out or unloaded: everything queued or running is answered,
then the batcher closes).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Awaitable, Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from ferry.client.errors import DeadlineExceeded, FerryError, Internal, InvalidArgument, Unavailable

DEADLINE_MARGIN_S = 0.010
"""Slack left before a deadline when closing a window early, on top of the measured batch run time: the hand-off
to the worker, the loop's other work and the reply's way out. With 2 ms, 5 of 12 `mlp` calls with 100 ms deadlines
in a 0.5 s window still missed their deadline on this machine; 4 ms: 1 of 12; 10 ms: none."""

RunBatch = Callable[[list[Any]], Awaitable[Sequence[Any]]]
"""Runs the payloads of one batch and returns one result (or FerryError) per payload, in order."""


@dataclass(frozen=True, slots=True)
class LevelPolicy:
    """The queue policy of one priority level."""

    max_queue_size: int
    timeout_s: float | None  # queue timeout; None = none
    delay_on_timeout: bool  # True: a timed-out request is served after the others instead of rejected
    allow_timeout_override: bool


@dataclass(frozen=True, slots=True)
class BatchPolicy:
    """How one model version queues and batches. ``batching=False`` runs one request per execution."""

    batching: bool
    max_batch_rows: int
    preferred_rows: tuple[int, ...] = ()
    max_queue_delay_s: float = 0.0
    levels: tuple[LevelPolicy, ...] = (LevelPolicy(1024, None, False, True),)
    default_level: int = 1  # 1 = highest priority
    instances: int = 1
    priorities: bool = True  # False: the model has no priority levels and a request's priority is ignored

    def __post_init__(self) -> None:
        if self.max_batch_rows < 1 or self.instances < 1 or not self.levels:
            raise InvalidArgument(f"invalid batch policy {self}")
        if not 1 <= self.default_level <= len(self.levels):
            raise InvalidArgument(f"default priority level {self.default_level} is outside 1..{len(self.levels)}")


@dataclass(slots=True, eq=False)
class Pending:
    """One queued request."""

    payload: Any
    rows: int
    signature: Hashable
    level: int  # index into the policy's levels (0 = highest)
    enqueued: float
    deadline: float | None  # monotonic; the earlier of the call's deadline and the queue timeout
    timeout_at: float | None  # monotonic; when the queue timeout passes (None: no queue timeout)
    future: asyncio.Future[Any]
    started: float = 0.0


class Batcher:
    """Queues requests for one model version and runs them in batches through ``run``."""

    def __init__(self, policy: BatchPolicy, run: RunBatch, name: str, clock: Callable[[], float] = time.monotonic):
        self.policy = policy
        self.name = name
        self._run = run
        self._clock = clock
        self._queues: list[collections.deque[Pending]] = [collections.deque() for _ in policy.levels]
        self._queued = 0
        self._arrived = asyncio.Event()
        self._free = asyncio.Semaphore(policy.instances)
        self._running: set[asyncio.Task[None]] = set()
        self._dispatcher: asyncio.Task[None] | None = None
        self._closed = False
        self._busy = 0  # instances taken: by a running batch, or by the dispatcher forming one
        self._draining = False
        self._settled = asyncio.Event()  # while draining: set when nothing is queued and no instance is taken
        self._exec_estimate_s = 0.0  # moving average of batch run time, to leave room before deadlines
        # A lone request may skip the queue only when no window would hold it back for company.
        self._runs_at_once = not policy.batching or policy.max_queue_delay_s == 0

    @property
    def queued(self) -> int:
        """Requests waiting (not yet handed to the model)."""
        return self._queued

    def idle(self) -> bool:
        """Nothing queued and an instance free: a request may run at once, in its caller's task."""
        return self._queued == 0 and self._runs_at_once and not self._free.locked() and not self._closed

    def start(self) -> None:
        if self._dispatcher is None:
            self._dispatcher = asyncio.get_running_loop().create_task(self._dispatch(), name=f"batcher {self.name}")

    async def submit(
        self,
        payload: Any,
        rows: int,
        signature: Hashable = None,
        *,
        deadline: float | None = None,
        priority: int = 0,
        timeout_s: float | None = None,
    ) -> tuple[Any, float]:
        """Queue one request and wait for its result; returns (result, seconds spent queued).

        ``priority`` 0 means the default level; ``timeout_s`` is the request's own queue timeout (honoured when the
        level allows overrides, and only to shorten the level's timeout)."""
        if self._closed:
            raise Unavailable(f"{self.name}: the server is shutting down")
        if self._dispatcher is None:
            self.start()  # models load in a worker thread; the first request starts the batcher on the loop
        level = self._level_of(priority)
        policy = self.policy.levels[level]
        if len(self._queues[level]) >= policy.max_queue_size:
            raise Unavailable(
                f"{self.name}: queue is full ({policy.max_queue_size} requests waiting at priority {level + 1}); "
                "retry with backoff"
            )
        now = self._clock()
        timeout = policy.timeout_s
        if timeout_s is not None and (timeout is None or (policy.allow_timeout_override and timeout_s < timeout)):
            timeout = timeout_s
        timeout_at = None if timeout is None else now + timeout
        if timeout_at is not None and not policy.delay_on_timeout:
            deadline = timeout_at if deadline is None else min(deadline, timeout_at)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        item = Pending(payload, rows, signature, level, now, deadline, timeout_at, future)
        if self.idle():
            # Nothing waits and an instance is free: run it now in the caller's task. This skips the dispatcher's
            # round trip (a wake-up, a task, a future), several event-loop turns that cost more than a small model.
            if deadline is not None and now >= deadline:
                raise _expired(self.name, item, now)
            await self._free.acquire()  # free, so this does not yield: nothing can take the slot first
            self._take_instance()
            item.started = now
            await self._execute([item])
            return future.result(), 0.0
        self._queues[level].append(item)
        self._queued += 1
        self._arrived.set()
        result = await future  # a cancelled caller cancels the future: the batcher then skips the request
        return result, item.started - item.enqueued

    def _level_of(self, priority: int) -> int:
        if priority == 0 or not self.policy.priorities:
            return self.policy.default_level - 1
        if not 1 <= priority <= len(self.policy.levels):
            raise InvalidArgument(
                f"{self.name}: priority {priority} is outside 1..{len(self.policy.levels)} (priority_levels)"
            )
        return priority - 1

    async def close(self) -> None:
        """Stop: queued requests fail with UNAVAILABLE; batches already running finish and are answered. A second
        call (a drained batcher closed again by its version) returns at once."""
        if self._closed:
            return
        self._closed = True
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            await asyncio.gather(self._dispatcher, return_exceptions=True)
        for queue in self._queues:
            while queue:
                _fail(queue.popleft(), Unavailable(f"{self.name}: the server is shutting down"))
        self._queued = 0
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
        for _ in range(self.policy.instances):  # and those run in their callers' tasks: every slot comes back
            await self._free.acquire()

    async def drain(self) -> None:
        """Answer everything queued or running, then close. New submissions are still taken while it drains: a
        request that found this version before it was swapped out may reach :meth:`submit` a few loop turns
        later (a stream's request task runs after the turn that resolved it), and it must be answered too. The
        batcher closes once it has been settled (nothing queued, no instance taken) across three loop turns,
        long enough for every task made before the swap to take its first step."""
        self._draining = True
        while True:
            if self._queued or self._busy:
                self._settled.clear()
                await self._settled.wait()  # set by the last instance given back with nothing queued
            for _ in range(3):
                await asyncio.sleep(0)
            if self._queued == 0 and self._busy == 0:
                break
        await self.close()

    def _take_instance(self) -> None:
        self._busy += 1

    def _give_instance(self) -> None:
        self._free.release()
        self._busy -= 1
        if self._draining and self._busy == 0 and self._queued == 0:
            self._settled.set()

    async def _dispatch(self) -> None:
        while True:
            if self._queued == 0:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            await self._free.acquire()
            self._take_instance()
            try:
                batch = await self._next_batch()
            except BaseException:  # cancelled by close() while a window was open: give the slot back
                self._give_instance()
                raise
            if not batch:  # what was queued expired or was cancelled while we waited
                self._give_instance()
                continue
            task = asyncio.get_running_loop().create_task(self._execute(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _next_batch(self) -> list[Pending]:
        """Wait until a batch should leave, then take it off the queues ([] when nothing is left to run)."""
        while True:
            if self._queued == 0:
                return []
            now = self._clock()
            batch, full = self._scan(now)
            if not batch:
                return []  # everything queued had expired or was cancelled
            if full or not self.policy.batching:
                return self._take(batch)
            leave_at = min(p.enqueued for p in batch) + self.policy.max_queue_delay_s
            deadlines = [p.deadline for p in batch if p.deadline is not None]
            if deadlines:  # leave early enough for the most urgent request to run before its deadline
                leave_at = min(leave_at, min(deadlines) - self._exec_estimate_s - DEADLINE_MARGIN_S)
            if now >= leave_at:
                return self._take(batch)
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):  # the window closed: the loop takes the batch
                await asyncio.wait_for(self._arrived.wait(), leave_at - now)

    def _scan(self, now: float) -> tuple[list[Pending], bool]:
        """The batch that would leave now and whether it should leave without waiting; drops on the way the
        requests whose caller left or whose deadline passed."""
        limit = self.policy.max_batch_rows
        batch: list[Pending] = []
        dead: list[Pending] = []
        rows = 0
        signature: Hashable = None
        full = False
        for item in self._candidates(now):
            if item.future.done():  # its caller was cancelled
                dead.append(item)
                continue
            if item.deadline is not None and now >= item.deadline:
                dead.append(item)
                _fail(item, _expired(self.name, item, now))
                continue
            if not batch:
                signature = item.signature
            elif item.signature != signature:
                continue  # never mixed: it waits for a batch of its own kind
            if rows + item.rows > limit or (batch and not self.policy.batching):
                full = True
                break
            batch.append(item)
            rows += item.rows
        if dead:
            self._remove(dead)
        preferred = self.policy.preferred_rows
        full = full or rows >= limit or rows in preferred or bool(preferred and rows >= max(preferred))
        return batch, full

    def _candidates(self, now: float) -> Iterator[Pending]:
        """Queued requests in the order they should run: by priority level, oldest first; requests whose queue
        timeout passed under the DELAY action come after all the others."""
        late: list[Pending] = []
        for queue in self._queues:
            for item in queue:
                if item.timeout_at is not None and item.deadline != item.timeout_at and now >= item.timeout_at:
                    late.append(item)
                else:
                    yield item
        yield from late

    def _take(self, batch: list[Pending]) -> list[Pending]:
        self._remove(batch)
        return batch

    def _remove(self, items: list[Pending]) -> None:
        gone = set(map(id, items))
        left = len(gone)
        for queue in self._queues:
            while queue and left and id(queue[0]) in gone:  # the common case: a prefix of the queue
                queue.popleft()
                left -= 1
            if left and any(id(p) in gone for p in queue):
                kept = [p for p in queue if id(p) not in gone]
                left -= len(queue) - len(kept)
                queue.clear()
                queue.extend(kept)
        self._queued -= len(items)

    async def _execute(self, batch: list[Pending]) -> None:
        started = self._clock()
        try:
            for item in batch:
                item.started = started
            try:
                results = await self._run([item.payload for item in batch])
                if len(results) != len(batch):
                    raise Internal(f"{self.name}: the batch returned {len(results)} results for {len(batch)} requests")
            except FerryError as err:
                results = [err] * len(batch)
            except Exception as err:  # a model failure fails this batch only; the batcher keeps running
                results = [Internal(f"{self.name}: batch of {len(batch)} requests failed: {err}")] * len(batch)
            for item, result in zip(batch, results, strict=True):
                if item.future.done():
                    continue
                if isinstance(result, BaseException):
                    item.future.set_exception(result)
                else:
                    item.future.set_result(result)
        finally:
            elapsed = self._clock() - started
            self._exec_estimate_s = 0.8 * self._exec_estimate_s + 0.2 * elapsed
            self._give_instance()


def _fail(item: Pending, error: FerryError) -> None:
    if not item.future.done():
        item.future.set_exception(error)


def _expired(name: str, item: Pending, now: float) -> FerryError:
    waited_ms = (now - item.enqueued) * 1e3
    if item.timeout_at is not None and item.deadline == item.timeout_at:
        return DeadlineExceeded(f"{name}: queue timeout passed after {waited_ms:.1f} ms in the queue")
    return DeadlineExceeded(f"{name}: the caller's deadline passed after {waited_ms:.1f} ms in the queue")


__all__ = ["BatchPolicy", "Batcher", "LevelPolicy", "Pending"]

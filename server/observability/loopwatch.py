"""Event-loop watchdog: how late the event loop runs what is due.

Every call on every connection is served by one asyncio event loop, so one piece of loop work that takes long (a
callback that computes, a blocking call, the GIL held by another thread) stalls every client at once, and nothing
else the server measures shows it: each request's own timings include the stall but do not say it was shared.
:class:`LoopWatch` measures it directly: every :data:`INTERVAL_S` it schedules a timer with ``loop.call_later``
and, when the timer runs, records how late it ran (the *lag*, on the loop's monotonic clock) into a histogram,
exported as ``ferry_event_loop_lag_seconds``. A lag past the warning threshold logs one WARNING, at most one per
:data:`WARN_EVERY_S`, counting the stalls it did not log.

Each sample also reads how *busy* the loop was over the interval just ended: the share of wall time its thread was
running or waiting in the kernel's run queue for a CPU (Linux ``/proc/thread-self/schedstat``), i.e. everything but
waiting for I/O. Elsewhere it falls back to the thread's CPU time, which misses the run-queue wait. A loop busy near
1.0 has no spare capacity: work added to it (or to the CPUs it shares) delays every call. The shadow
(``inference/shadow.py``) reads :attr:`LoopWatch.busy` to shed its runs then; it is exported as
``ferry_event_loop_busy_ratio``.

The cost is one timer callback per interval on the loop itself (and one small /proc read): no thread, no task, no
polling.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Iterator

from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric

from ferry.server.observability.stats import Histogram

log = logging.getLogger(__name__)

INTERVAL_S = 0.1
"""How often the loop's lag is sampled."""

WARN_S = 0.25
"""Default lag past which a WARNING is logged (a stall every client of the server felt)."""

WARN_EVERY_S = 5.0
"""At most one warning per this many seconds; stalls in between are counted in the next one."""

LAG_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

METRIC = "ferry_event_loop_lag_seconds"
HELP = "How late the event loop ran a timer sampled every {:g} s: how long every connection stalled behind loop work."
BUSY_METRIC = "ferry_event_loop_busy_ratio"
BUSY_HELP = "Share of the last {:g} s the event loop's thread ran or waited for a CPU (not idle waiting for I/O)."

SCHEDSTAT = "/proc/thread-self/schedstat"


def schedstat_busy_ns() -> int:
    """Nanoseconds the calling thread has spent on a CPU plus waiting in a run queue for one (Linux schedstat).
    Raises OSError where the kernel does not provide it."""
    with open(SCHEDSTAT, "rb") as stat:
        on_cpu, run_queue, _ = stat.read().split()
    return int(on_cpu) + int(run_queue)


def busy_clock() -> Callable[[], int]:
    """The best reading of the calling thread's busy time available here: schedstat, else its CPU time."""
    try:
        schedstat_busy_ns()
    except (OSError, ValueError):
        return time.thread_time_ns
    return schedstat_busy_ns


def busy_share(busy_ns: int, wall_ns: int) -> float:
    """``busy_ns`` over ``wall_ns``, within [0, 1] (the two clocks are read a few µs apart)."""
    return min(1.0, max(0.0, busy_ns / wall_ns)) if wall_ns > 0 else 0.0


class LoopWatch:
    """Samples the running event loop's lag; ``start()`` on the loop, ``stop()`` when done (both idempotent)."""

    def __init__(self, warn_s: float = WARN_S, interval_s: float = INTERVAL_S) -> None:
        if not warn_s > 0 or not interval_s > 0:
            raise ValueError(f"warn_s and interval_s must be > 0, got {warn_s} and {interval_s}")
        self.warn_s = warn_s
        self.interval_s = interval_s
        self.lag = Histogram(LAG_BUCKETS_S)  # observed in seconds
        self.max_lag_s = 0.0
        self.stalls = 0  # lags past warn_s, warned about or not
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0
        self._last_warning = -math.inf
        self._suppressed = 0
        self.busy = 0.0
        """Share of the last interval (to the latest sample) the loop's thread was running or waiting for a CPU."""
        self._busy_clock: Callable[[], int] = time.thread_time_ns  # chosen on the loop's thread, in start()
        self._busy_mark = 0
        self._wall_mark = 0

    @property
    def running(self) -> bool:
        return self._handle is not None

    def start(self) -> None:
        """Start sampling the running loop (call from a coroutine or callback on it)."""
        if self._handle is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._busy_clock = busy_clock()
        self._busy_mark, self._wall_mark = self._busy_clock(), time.monotonic_ns()
        self._schedule()

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _schedule(self) -> None:
        assert self._loop is not None
        self._due = self._loop.time() + self.interval_s
        self._handle = self._loop.call_later(self.interval_s, self._tick)

    def _tick(self) -> None:
        assert self._loop is not None
        now = self._loop.time()
        # Loops may run a timer up to their clock resolution early: that is no lag.
        lag = max(0.0, now - self._due)
        self.lag.observe(lag)
        self.max_lag_s = max(self.max_lag_s, lag)
        busy, wall = self._busy_clock(), time.monotonic_ns()
        self.busy = busy_share(busy - self._busy_mark, wall - self._wall_mark)
        self._busy_mark, self._wall_mark = busy, wall
        if lag > self.warn_s:
            self.stalls += 1
            self._warn(lag, now)
        # The next sample is due one interval from now, not from when this one was due, so a long stall counts once.
        self._schedule()

    def _warn(self, lag: float, now: float) -> None:
        if now - self._last_warning < WARN_EVERY_S:
            self._suppressed += 1
            return
        log.warning(
            "event loop stalled: a timer ran %.3f s late (threshold %.3f s), so every connection waited that long; "
            "%d more stalls past the threshold since the previous warning",
            lag,
            self.warn_s,
            self._suppressed,
        )
        self._last_warning = now
        self._suppressed = 0

    def metric_families(self) -> Iterator[Metric]:
        """``ferry_event_loop_lag_seconds`` and ``ferry_event_loop_busy_ratio``, for the /metrics collector (read at
        scrape time)."""
        family = HistogramMetricFamily(METRIC, HELP.format(self.interval_s))
        buckets = [(le, float(count)) for le, count in self.lag.cumulative()]
        family.add_metric([], buckets, self.lag.sum)
        yield family
        yield GaugeMetricFamily(BUSY_METRIC, BUSY_HELP.format(self.interval_s), value=self.busy)

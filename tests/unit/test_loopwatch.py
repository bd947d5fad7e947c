"""The event-loop watchdog: a loop blocked for a known time shows a lag at least that long, warned about once."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import uvloop

from ferry.client.errors import InvalidArgument
from ferry.server.config import ServerConfig
from ferry.server.observability.loopwatch import (
    BUSY_METRIC,
    METRIC,
    WARN_EVERY_S,
    LoopWatch,
    busy_clock,
    busy_share,
    schedstat_busy_ns,
)

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


def samples(watch: LoopWatch) -> int:
    return sum(watch.lag.counts)


def over(watch: LoopWatch, bound_s: float) -> int:
    """Samples with a lag above ``bound_s`` (a bucket bound)."""
    cumulative = dict(watch.lag.cumulative())
    return cumulative["+Inf"] - cumulative[str(bound_s)]


async def next_sample(watch: LoopWatch) -> None:
    """Wait (without blocking the loop) until the watch has taken one more sample."""
    seen = samples(watch)
    while samples(watch) == seen:
        await asyncio.sleep(watch.interval_s)


async def stall(watch: LoopWatch, blocked_s: float) -> None:
    """Block the loop so that the sample pending now runs at least ``blocked_s`` late, and wait for that sample.

    The pending sample was scheduled no later than now, so it is due at most one interval from now: blocking for
    one interval more than ``blocked_s`` makes it at least ``blocked_s`` late."""
    seen = samples(watch)
    time.sleep(watch.interval_s + blocked_s)
    while samples(watch) == seen:
        await asyncio.sleep(0)  # the late sample is due already: it runs in the next loop iteration


def warnings(caplog: pytest.LogCaptureFixture) -> list[tuple[Any, ...]]:
    """The arguments of each warning logged: (lag_s, warn_s, suppressed)."""
    records = [
        r for r in caplog.records if r.name == "ferry.server.observability.loopwatch" and r.levelno == logging.WARNING
    ]
    assert all("event loop stalled" in r.getMessage() for r in records)
    return [r.args for r in records if isinstance(r.args, tuple)]


@pytest.mark.parametrize("loop", LOOPS)
def test_a_blocked_loop_shows_its_lag_and_is_warned_about_once(loop: str, caplog: pytest.LogCaptureFixture) -> None:
    blocked_s = 0.3
    watch = LoopWatch(warn_s=0.1, interval_s=0.01)

    async def test() -> None:
        watch.start()
        await next_sample(watch)
        await stall(watch, blocked_s)
        await stall(watch, blocked_s)  # well within WARN_EVERY_S of the first: counted, not logged
        watch.stop()

    caplog.set_level(logging.WARNING, logger="ferry.server.observability.loopwatch")
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        runner.run(test())
    seen_s = blocked_s - 0.002  # uvloop's clock ticks in milliseconds
    assert watch.max_lag_s >= seen_s
    assert over(watch, 0.25) >= 2  # both stalls landed above the 0.25 s bucket
    assert watch.lag.sum >= 2 * seen_s
    [(lag_s, warn_s, suppressed)] = warnings(caplog)
    assert lag_s >= seen_s and warn_s == 0.1 and suppressed == 0


async def busy_after(watch: LoopWatch, work: Callable[[], None]) -> float:
    """The busy share the watch read for an interval spent wholly in ``work`` (which takes over an interval)."""
    await next_sample(watch)  # a fresh interval starts now
    seen = samples(watch)
    work()
    while samples(watch) == seen:  # the sample due while ``work`` ran: its interval is (nearly) all ``work``
        await asyncio.sleep(0)
    return watch.busy


def spin(seconds: float) -> None:
    """Compute, holding the thread, for ``seconds``."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


@pytest.mark.parametrize("loop", LOOPS)
def test_busy_tells_a_computing_loop_from_an_idle_or_blocked_one(loop: str) -> None:
    """Busy counts the time the loop's thread computes (or waits for a CPU), not the time it waits: a loop that
    sleeps (blocked in a call, or idle waiting for I/O) lags but is not busy."""
    watch = LoopWatch(warn_s=10.0, interval_s=0.05)
    read: dict[str, float] = {}

    async def test() -> None:
        watch.start()
        read["computing"] = await busy_after(watch, lambda: spin(0.3))
        read["blocked"] = await busy_after(watch, lambda: time.sleep(0.3))
        await next_sample(watch)
        await asyncio.sleep(0.3)  # idle: nothing to run
        await next_sample(watch)
        read["idle"] = watch.busy
        watch.stop()

    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        runner.run(test())
    assert read["computing"] > 0.8  # the sample's interval also holds a few loop turns that did not compute
    assert read["blocked"] < 0.2 and watch.max_lag_s >= 0.25  # it lagged all the same
    assert read["idle"] < 0.2


def test_busy_reads_schedstat_on_linux_and_is_a_share() -> None:
    if Path("/proc/thread-self/schedstat").exists():
        assert busy_clock() is schedstat_busy_ns
        before = schedstat_busy_ns()
        spin(0.05)
        # on a CPU, or waiting for one, the whole time; the kernel adds a running thread's time at its scheduler
        # ticks (every few ms), so a reading may miss the latest few ms
        assert schedstat_busy_ns() - before >= 30_000_000
    else:
        assert busy_clock() is time.thread_time_ns
    assert busy_share(5, 10) == 0.5
    assert busy_share(12, 10) == 1.0 and busy_share(-1, 10) == 0.0 and busy_share(5, 0) == 0.0


def test_a_lag_under_the_threshold_is_measured_but_not_warned(caplog: pytest.LogCaptureFixture) -> None:
    watch = LoopWatch(warn_s=10.0, interval_s=0.01)

    async def test() -> None:
        watch.start()
        await stall(watch, 0.1)
        watch.stop()

    caplog.set_level(logging.WARNING, logger="ferry.server.observability.loopwatch")
    asyncio.run(test())
    assert watch.max_lag_s >= 0.1
    assert over(watch, 0.05) >= 1
    assert warnings(caplog) == []


def test_warnings_are_rate_limited_and_count_what_they_suppressed(caplog: pytest.LogCaptureFixture) -> None:
    watch = LoopWatch(warn_s=0.25)
    caplog.set_level(logging.WARNING, logger="ferry.server.observability.loopwatch")
    for now in (100.0, 101.0, 102.0, 100.0 + WARN_EVERY_S, 101.0 + WARN_EVERY_S):  # loop-clock times of stalls
        watch._warn(0.5, now)
    first, second = warnings(caplog)
    assert first[2] == 0
    assert second[2] == 2  # the stalls at 101 and 102


def test_stop_ends_sampling_and_start_resumes_it() -> None:
    watch = LoopWatch(interval_s=0.01)

    async def test() -> None:
        watch.stop()  # before start: nothing to do
        watch.start()
        watch.start()  # idempotent: still one timer
        await next_sample(watch)
        watch.stop()
        assert not watch.running
        taken = samples(watch)
        await asyncio.sleep(10 * watch.interval_s)
        assert samples(watch) == taken
        watch.start()
        await next_sample(watch)
        assert watch.running
        watch.stop()

    asyncio.run(test())


def test_metric_family_is_a_histogram_of_seconds() -> None:
    watch = LoopWatch()
    watch.lag.observe(0.003)
    watch.lag.observe(0.7)
    family, busy = list(watch.metric_families())
    assert busy.name == BUSY_METRIC and busy.type == "gauge" and busy.samples[0].value == 0.0
    assert family.name == METRIC and family.type == "histogram" and "event loop" in family.documentation
    values = {(s.name, s.labels.get("le")): s.value for s in family.samples}
    assert values[(METRIC + "_bucket", "0.001")] == 0
    assert values[(METRIC + "_bucket", "0.005")] == 1
    assert values[(METRIC + "_bucket", "1.0")] == 2
    assert values[(METRIC + "_bucket", "+Inf")] == 2
    assert values[(METRIC + "_count", None)] == 2
    assert values[(METRIC + "_sum", None)] == pytest.approx(0.703)


def test_config_requires_a_positive_threshold(tmp_path: Path) -> None:
    assert ServerConfig.build(model_repository=tmp_path).loop_lag_warn_s == 0.25
    assert ServerConfig.build(model_repository=tmp_path, loop_lag_warn_s=0.05).loop_lag_warn_s == 0.05
    for bad in (0.0, -1.0, math.nan):
        with pytest.raises(InvalidArgument, match="loop_lag_warn_s"):
            ServerConfig.build(model_repository=tmp_path, loop_lag_warn_s=bad)

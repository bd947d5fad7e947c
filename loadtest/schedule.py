"""Open-loop arrival schedules: the intended send time of every request, fixed before the first one is sent.

An open-loop generator sends on the schedule whatever the server does; latency is measured from the *intended*
send time, so a request the generator could only send late (because the server, or the generator itself, was
slow) is charged for the wait. Measuring from the actual send time instead is *coordinated omission*: the
generator stalls exactly when the server does, and the stalls vanish from the percentiles.

A rate is split over worker processes: each of ``n`` workers runs ``rate / n``. Constant arrivals are interleaved
(worker ``k`` is offset by ``k / rate``), so together they send exactly every ``1 / rate`` seconds; Poisson
arrivals are independent per worker (seeded by worker index), and a sum of independent Poisson processes is a
Poisson process of the summed rate.
"""

from __future__ import annotations

import numpy as np

MAX_SCHEDULED = 50_000_000
"""A schedule longer than this is refused: it would be an unbounded run, not a measurement."""


def intended_offsets(
    rate_per_s: float,
    duration_s: float,
    *,
    poisson: bool = False,
    seed: int = 0,
    worker: int = 0,
    workers: int = 1,
    max_requests: int | None = None,
) -> np.ndarray:
    """Seconds from the start of the run at which worker ``worker`` of ``workers`` sends, in ``[0, duration_s)``.

    The union over all workers is the schedule of ``rate_per_s``: constant spacing ``1 / rate_per_s``, or
    exponential gaps of mean ``1 / rate_per_s``. ``max_requests`` caps this worker's share.
    """
    if rate_per_s <= 0 or duration_s <= 0:
        return np.empty(0)
    if not 0 <= worker < workers:
        raise ValueError(f"worker {worker} out of range for {workers} workers")
    if rate_per_s * duration_s / workers > MAX_SCHEDULED:
        raise ValueError(f"{rate_per_s:g}/s for {duration_s:g} s is over {MAX_SCHEDULED} requests per worker")
    own_rate = rate_per_s / workers
    if poisson:
        rng = np.random.default_rng([seed, worker])
        expected = own_rate * duration_s
        n = int(expected + 10 * np.sqrt(expected) + 16)  # P(more arrivals than this) is negligible
        times = np.cumsum(rng.exponential(1 / own_rate, n))
        while times[-1] < duration_s:  # never taken in practice; keeps the schedule exact if it is
            times = np.concatenate([times, times[-1] + np.cumsum(rng.exponential(1 / own_rate, n))])
        times = times[times < duration_s]
    else:
        first = worker / rate_per_s
        times = first + np.arange(int(np.ceil((duration_s - first) * own_rate))) / own_rate
        times = times[times < duration_s]
    if max_requests is not None:
        times = times[:max_requests]
    return times


def split_evenly(total: int, parts: int) -> list[int]:
    """``total`` as ``parts`` integers differing by at most one, larger first (concurrency and request caps)."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]

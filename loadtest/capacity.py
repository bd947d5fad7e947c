"""Capacity: the highest request rate one replica sustains within the SLO, the knee of its latency curve, and
how many replicas a target peak needs.

The search knows nothing of gRPC: it calls ``measure(rate)`` for an open-loop step and judges each result with
:func:`judge`. It first brackets the capacity (doubling from the start rate while steps are stable, halving while
they are not), then bisects the bracket until ``hi / lo - 1 <= tolerance``, then measures the best stable rate
once more: a rate that passed by luck on a noisy machine fails the re-check, becomes the new upper bound, and the
search goes on below it. Every call is one bounded step and the number of steps is capped.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ferry.loadtest.steps import StepResult

KEEP_UP = 0.95
"""A step is stable only if answers arrived at >= 95% of the rate requests were sent in the window: below that
the server is falling behind and its queue grows, whatever the percentiles of a short window say."""


def judge(step: StepResult, slo_p99_ms: float | None, max_error_rate: float) -> tuple[bool, list[str]]:
    """Whether an open-loop step was sustainable, and if not, every reason why."""
    reasons = []
    if step.ok == 0:
        reasons.append("no successful answers")
    if slo_p99_ms is not None and step.p99_ms > slo_p99_ms:
        reasons.append(f"p99 {step.p99_ms:.3g} ms > SLO {slo_p99_ms:g} ms")
    if step.error_rate > max_error_rate:
        reasons.append(f"error rate {step.error_rate:.3%} > {max_error_rate:.3%}")
    if not keeps_up(step):
        reasons.append(f"falling behind: {step.throughput_rps:.4g}/s answered of {sent_rate(step):.4g}/s sent")
    return not reasons, reasons


def sent_rate(step: StepResult) -> float:
    return step.requests / step.window_s if step.window_s else 0.0


def keeps_up(step: StepResult) -> bool:
    """Whether answers arrived at >= KEEP_UP of the rate requests were sent (always true for a closed loop)."""
    return step.loop != "open" or not sent_rate(step) or step.throughput_rps >= KEEP_UP * sent_rate(step)


@dataclass(slots=True)
class Search:
    """Outcome of a capacity search. ``capacity_rps`` is the highest rate judged stable (and re-checked)."""

    capacity_rps: float | None
    lower_rps: float | None  # the bracket: stable ...
    upper_rps: float | None  # ... and the lowest unstable rate
    converged: bool
    steps: list[StepResult] = field(default_factory=list)
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "capacity_rps": self.capacity_rps,
            "lower_rps": self.lower_rps,
            "upper_rps": self.upper_rps,
            "converged": self.converged,
            "steps": [s.index for s in self.steps],
            "note": self.note,
        }


def search(
    measure: Callable[[float], StepResult],
    start_rps: float,
    slo_p99_ms: float | None,
    max_error_rate: float = 0.001,
    *,
    tolerance: float = 0.05,
    max_steps: int = 14,
    min_rps: float = 1.0,
    max_rps: float = 1e6,
) -> Search:
    """Binary search on open-loop rate for the highest stable one (see the module docstring)."""
    if start_rps <= 0 or tolerance <= 0:
        raise ValueError("start_rps and tolerance must be positive")
    out = Search(None, None, None, converged=False)
    lo: float | None = None
    hi: float | None = None
    rechecked: float | None = None
    history: list[tuple[float, bool]] = []  # (rate asked for, stable): the step may record a rounded rate
    rate = min(max(start_rps, min_rps), max_rps)

    def step(r: float) -> bool:
        result = measure(r)
        ok, reasons = judge(result, slo_p99_ms, max_error_rate)
        result.stable, result.unstable_because = ok, reasons
        out.steps.append(result)
        history.append((r, ok))
        return ok

    while len(out.steps) < max_steps:
        ok = step(rate)
        if ok:
            lo = rate if lo is None else max(lo, rate)
        else:
            hi = rate if hi is None else min(hi, rate)
            if lo is not None and lo >= rate:  # a re-check failed: the old best was luck
                lo = max((r for r, stable in history if stable and r < rate), default=None)
        if lo is None:
            if hi is not None and hi / 2 < min_rps:
                out.note = f"unstable even at {hi:g}/s"
                break
            rate = (hi or rate) / 2
        elif hi is None:
            if lo >= max_rps:
                out.note = f"stable at the --max-rps bound {max_rps:g}/s"
                out.converged = True
                break
            rate = min(lo * 2, max_rps)
        elif hi / lo - 1 <= tolerance:
            if rechecked == lo:
                out.converged = True
                break
            rechecked = rate = lo
        else:
            rate = math.sqrt(lo * hi)  # bisect on a log scale: rates span orders of magnitude
    else:
        out.note = f"stopped after {max_steps} steps"
    out.lower_rps, out.upper_rps = lo, hi
    out.capacity_rps = lo
    return out


def knee(points: Sequence[tuple[float, float]]) -> tuple[float, float] | None:
    """The knee of an increasing latency curve: where its flat part meets its steep part.

    With four points or more, the best two-segment least-squares fit (one line through the points left of a split,
    one through those right of it) locates the knee at the two lines' crossing, so it may fall between measured
    rates; the latency reported there is interpolated between the measured points. With three points (or when the
    fit has no crossing between the segments) it is the Kneedle point: on axes scaled to [0, 1], the measured
    point farthest below the chord from the first point to the last. None for fewer than three points or a curve
    that does not rise.
    """
    pts = sorted(points)
    if len(pts) < 3 or pts[-1][0] <= pts[0][0] or max(y for _, y in pts) <= min(y for _, y in pts):
        return None
    best: tuple[float, float] | None = None
    best_sse = math.inf
    for k in range(2, len(pts) - 1):
        left, right = _line(pts[:k]), _line(pts[k:])
        sse = left[2] + right[2]
        if sse < best_sse and right[0] > left[0]:
            x = (left[1] - right[1]) / (right[0] - left[0])
            lo_x, hi_x = pts[k - 1][0], pts[k][0]
            if lo_x <= x <= hi_x:
                best, best_sse = (x, _interpolate(pts, x)), sse
    return best if best is not None else _kneedle(pts)


def _line(pts: Sequence[tuple[float, float]]) -> tuple[float, float, float]:
    """Least-squares (slope, intercept, sum of squared errors) through ``pts``."""
    n = len(pts)
    mx = sum(x for x, _ in pts) / n
    my = sum(y for _, y in pts) / n
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    slope = sum((x - mx) * (y - my) for x, y in pts) / sxx if sxx else 0.0
    intercept = my - slope * mx
    return slope, intercept, sum((y - slope * x - intercept) ** 2 for x, y in pts)


def _interpolate(pts: Sequence[tuple[float, float]], x: float) -> float:
    for (x0, y0), (x1, y1) in itertools.pairwise(pts):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return pts[-1][1]


def _kneedle(pts: Sequence[tuple[float, float]]) -> tuple[float, float] | None:
    (x0, y0), (x1, y1) = pts[0], pts[-1]
    if y1 <= y0:
        return None
    best, best_gap = None, 0.0
    for x, y in pts[1:-1]:
        gap = (x - x0) / (x1 - x0) - (y - y0) / (y1 - y0)
        if gap > best_gap:
            best, best_gap = (x, y), gap
    return best


def plan(capacity_rps: float, peak_rps: float, headroom: float, instance_count: int = 1) -> dict[str, Any]:
    """Replicas for a peak rate, running each at ``(1 - headroom)`` of its measured capacity."""
    if capacity_rps <= 0:
        raise ValueError("capacity must be positive to plan replicas")
    if not 0 <= headroom < 1:
        raise ValueError(f"--headroom is the spare fraction of capacity, in [0, 1); got {headroom}")
    usable = capacity_rps * (1 - headroom)
    replicas = max(1, math.ceil(peak_rps / usable - 1e-9))
    return {
        "target_peak_rps": peak_rps,
        "headroom": headroom,
        "capacity_per_replica_rps": round(capacity_rps, 2),
        "usable_per_replica_rps": round(usable, 2),
        "replicas": replicas,
        "replicas_n_plus_1": replicas + 1,
        "utilisation_at_peak": round(peak_rps / (replicas * capacity_rps), 3),
        "instance_count": instance_count,
    }


def assumptions(model: dict[str, Any], settings: dict[str, Any], machine: str) -> list[str]:
    """What a replica count computed by :func:`plan` takes for granted, written out for the report."""
    rows = settings["rows"]
    return [
        f"Every replica runs on a machine like this one ({machine}) with the same model configuration: "
        f"{model['instance_count']} instance(s), dynamic batching {'on' if model['dynamic_batching'] else 'off'}, "
        f"response cache {'on' if model['response_cache'] else 'off'}. To compare instance counts, run one capacity "
        "search per `instance_group` setting.",
        "Capacity adds up linearly over replicas: requests (not connections) are balanced evenly, e.g. gRPC "
        "`round_robin` over all replicas, and nothing shared (balancer, network, a downstream service) saturates "
        "first.",
        f"Production traffic looks like the test traffic: {settings['mode']} calls, {rows} row(s) per request, "
        f"{settings['inputs']} inputs, duplicate fraction {settings['duplicate_fraction']:g} (so the same cache hit "
        "rate).",
        "Latency was measured on loopback: clients elsewhere add their network round trip to every percentile.",
        f"The capacity is judged on {settings['duration_s']:g}-second windows; headroom covers bursts above the "
        "peak, slow drift (garbage collection, noisy neighbours) and the measurement's own noise; the extra "
        "replica in N+1 covers losing one replica at peak.",
    ]

"""The shadow: a sampled share of a model's requests runs again on its shadow version after the answer was made, off
the request path, so a candidate version meets real traffic without answering any of it.

:meth:`ShadowRunner.submit` is called on the loop by a request's :class:`~ferry.server.inference.call.Call` once its
response is encoded; it never raises and never waits. A sampled run is dropped, and counted with its reason, when:

- ``max_in_flight``: the model already has that many shadow runs (its ``shadow`` parameter);
- ``queued``: the shadow version's batcher has requests waiting (real traffic to it comes first);
- ``saturated``: the event loop was busy (running, or waiting for a CPU) for more than ``max_loop_busy`` of its
  last sampled interval (:class:`~ferry.server.observability.loopwatch.LoopWatch`), and has not yet come back under
  ``max_loop_busy * (1 - HYSTERESIS)`` (one sample near the bound does not flip it back and forth). A busy loop has
  no spare capacity: a shadow's work on it, or on the CPUs it shares with the worker threads, would delay the calls
  it serves. Still, one sampled request per model per :data:`TRICKLE_S` runs its shadow however busy the server is,
  so a saturated server keeps comparing the two versions, at a cost no caller can see;
- ``withdrawn``: the model, or its shadow, was unloaded or reconfigured meanwhile; ``shutdown``: the server stops.

Otherwise a task queues the request's decoded inputs on the shadow version (through its batcher and worker threads,
as any request, at its lowest priority level) and, when it answers, compares its outputs with the primary's, exports
their agreement and the shadow's latency, and logs both when the request was sampled for the prediction log.

Agreement, per output the request asked for: integer, boolean and string outputs (labels) agree on a row when the
row is equal; float outputs give the mean absolute difference of their elements and, when a row holds several scores
(probabilities, logits), also agree on a row when its argmax is equal.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
from opentelemetry.trace import SpanContext
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from ferry.client.errors import FerryError
from ferry.server.models.model import ModelVersion
from ferry.server.models.repository import ModelRepository
from ferry.server.models.routing import SHADOW
from ferry.server.observability.predlog import Prediction, ShadowPrediction
from ferry.server.observability.stats import Histogram, latency_histogram
from ferry.server.observability.telemetry import NO_TRACING, Tracing

log = logging.getLogger(__name__)

TRICKLE_S = 1.0
"""However busy the server, one sampled request per model per this many seconds still runs its shadow."""

HYSTERESIS = 0.2
"""Saturated once the loop is busier than ``max_loop_busy``; no longer once it is this share less busy than that."""

DROP_REASONS = {
    "max_in_flight": "the model had max_in_flight shadow runs",
    "queued": "requests were waiting for the shadow version",
    "saturated": "the event loop was saturated",
    "withdrawn": "the model or its shadow was unloaded or reconfigured",
    "shutdown": "the server was shutting down",
}
"""Why a sampled shadow run was dropped: the ``reason`` label of ``ferry_shadow_dropped``, and what it means."""


@dataclass(slots=True)
class OutputAgreement:
    """How one output of the shadow compared with the primary's."""

    rows: int = 0
    """Rows compared."""
    labelled: int = 0
    """Rows compared as labels (label outputs, or the argmax of scores)."""
    agreed: int = 0
    """Of those, rows with the same label."""
    abs_difference: float = 0.0
    """Sum of |primary - shadow| over the finite elements of a float output."""
    elements: int = 0

    @property
    def agreement(self) -> float | None:
        return self.agreed / self.labelled if self.labelled else None

    @property
    def mean_abs_difference(self) -> float | None:
        return self.abs_difference / self.elements if self.elements else None


@dataclass(slots=True)
class ShadowStats:
    """One (model, primary version, shadow version) pair's shadow runs."""

    runs: int = 0
    dropped: Counter[str] = field(default_factory=Counter)  # by reason: DROP_REASONS
    failed: int = 0
    latency: Histogram = field(default_factory=latency_histogram)
    outputs: dict[str, OutputAgreement] = field(default_factory=dict)


def compare(primary: np.ndarray, shadow: np.ndarray, batched: bool, into: OutputAgreement) -> None:
    """Add one request's output to ``into`` (``batched``: dimension 0 holds the rows)."""
    rows = primary.shape[0] if batched and primary.ndim else 1
    into.rows += rows
    if primary.shape != shadow.shape:  # a shadow whose output has another shape agrees on nothing
        into.labelled += rows
        return
    a, b = primary.reshape(rows, -1), shadow.reshape(rows, -1)
    if a.dtype.kind == "f" and b.dtype.kind == "f":
        difference = np.abs(a.astype(np.float64) - b.astype(np.float64))
        finite = difference[np.isfinite(difference)]
        into.abs_difference += float(finite.sum())
        into.elements += int(finite.size)
        if a.shape[1] > 1:  # scores: compare the classes they pick
            into.labelled += rows
            into.agreed += int((a.argmax(axis=1) == b.argmax(axis=1)).sum())
    else:
        into.labelled += rows
        into.agreed += int((a == b).all(axis=1).sum())


class ShadowRunner:
    """Runs shadowed requests on their model's shadow version; close with :meth:`close` before the repository.

    ``loop_busy`` reads the event loop's busy share (0..1) over its last sampled interval; past ``max_loop_busy``
    the server counts as saturated and shadow runs are shed (the default reader never reports it busy)."""

    def __init__(
        self,
        repository: ModelRepository,
        tracing: Tracing = NO_TRACING,
        loop_busy: Callable[[], float] = lambda: 0.0,
        max_loop_busy: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._repository = repository
        self._clock = clock  # for the trickle
        self._tracing = tracing
        self._loop_busy = loop_busy
        self._max_loop_busy = max_loop_busy
        self._tasks: set[asyncio.Task[None]] = set()
        self._in_flight: Counter[str] = Counter()  # shadow runs per model
        self._started: dict[str, float] = {}  # per model: when its latest shadow run started (monotonic)
        self._saturated = False
        self._closed = False
        self.stats: dict[tuple[str, int, int], ShadowStats] = {}

    def submit(
        self,
        primary: ModelVersion,
        shadow: ModelVersion,
        feeds: Mapping[str, np.ndarray],
        rows: int,
        names: list[str],
        outputs: list[np.ndarray],
        entry: Prediction | None,
        span: SpanContext | None,
    ) -> None:
        """Start the shadow run of one answered request (its decoded feeds, requested output names and outputs), or
        drop it when the server is saturated. ``entry``: the request's prediction-log entry, held for the shadow's
        outputs (None: not sampled for the log)."""
        try:
            self._submit(primary, shadow, feeds, rows, names, outputs, entry, span)
        except Exception:  # a shadow never fails the request it shadows
            log.exception("shadow run of a request to %s not started", primary.describe())

    def _submit(
        self,
        primary: ModelVersion,
        shadow: ModelVersion,
        feeds: Mapping[str, np.ndarray],
        rows: int,
        names: list[str],
        outputs: list[np.ndarray],
        entry: Prediction | None,
        span: SpanContext | None,
    ) -> None:
        key = (primary.name, primary.version, shadow.version)
        stats = self.stats.get(key)
        if stats is None:
            stats = self.stats[key] = ShadowStats()
        reason = self._drop_reason(primary, shadow)
        if reason is not None:
            stats.dropped[reason] += 1
            if entry is not None:
                self._log(entry, shadow, {}, 0.0, f"dropped: {DROP_REASONS[reason]}")
            return
        self._in_flight[primary.name] += 1
        shadow.stats.routes[SHADOW] += 1
        run = self._run(stats, primary, shadow, dict(feeds), rows, names, outputs, entry, span)
        task = asyncio.get_running_loop().create_task(run, name=f"shadow {shadow.describe()}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _drop_reason(self, primary: ModelVersion, shadow: ModelVersion) -> str | None:
        """Why this shadow run may not start now (a key of DROP_REASONS), or None: it starts, and counts as
        started."""
        if self._closed:
            return "shutdown"
        try:  # the model's current routing: a reload may have changed the bound, an unload removed it
            routing = self._repository.get_model(primary.name).routing
        except FerryError:
            return "withdrawn"
        if routing is None or routing.shadow is None or routing.shadow.version != shadow.version:
            return "withdrawn"
        if self._in_flight[primary.name] >= routing.shadow.max_in_flight:
            return "max_in_flight"
        if shadow.queued:
            return "queued"
        now = self._clock()
        if self.saturated() and now - self._started.get(primary.name, -math.inf) < TRICKLE_S:
            return "saturated"
        self._started[primary.name] = now
        return None

    def saturated(self) -> bool:
        """Whether the event loop has no spare capacity for shadow runs, with hysteresis (see the module doc)."""
        busy = self._loop_busy()
        if busy > self._max_loop_busy:
            self._saturated = True
        elif busy < self._max_loop_busy * (1 - HYSTERESIS):
            self._saturated = False
        return self._saturated

    async def _run(
        self,
        stats: ShadowStats,
        primary: ModelVersion,
        shadow: ModelVersion,
        feeds: dict[str, np.ndarray],
        rows: int,
        names: list[str],
        primary_outputs: list[np.ndarray],
        entry: Prediction | None,
        span: SpanContext | None,
    ) -> None:
        began = time.perf_counter_ns()
        try:
            # at the lowest priority level the version has: real traffic to the shadow version comes first
            outputs, _, _ = await shadow.infer(feeds, rows, priority=len(shadow.policy.levels), span=span)
        except Exception as err:  # the shadow's failure is counted and logged, never the caller's
            stats.failed += 1
            log.debug("shadow run on %s failed: %s", shadow.describe(), err)
            if entry is not None:
                self._log(entry, shadow, {}, (time.perf_counter_ns() - began) / 1e6, f"failed: {err}")
            return
        finally:
            self._in_flight[primary.name] -= 1
        done = time.perf_counter_ns()
        stats.runs += 1
        stats.latency.observe(done - began)
        selected = {name: outputs[shadow.output_index[name]] for name in names if name in shadow.output_index}
        batched = primary.max_batch_size > 0
        for name, primary_output in zip(names, primary_outputs, strict=True):
            if name in selected:
                agreement = stats.outputs.get(name)
                if agreement is None:
                    agreement = stats.outputs[name] = OutputAgreement()
                compare(primary_output, selected[name], batched, agreement)
        if span is not None and self._tracing.enabled:
            attributes = {"ferry.model": shadow.name, "ferry.model_version": shadow.version, "ferry.route": SHADOW}
            attributes["ferry.model_sha256"] = shadow.sha256
            self._tracing.stage("shadow run", began, done, span, attributes)
        if entry is not None:
            self._log(entry, shadow, selected, (done - began) / 1e6, "")

    def _log(
        self, entry: Prediction, shadow: ModelVersion, outputs: dict[str, np.ndarray], latency_ms: float, error: str
    ) -> None:
        predlog = shadow.monitor.sinks.predlog if shadow.monitor is not None else None
        if predlog is not None:
            result = ShadowPrediction(shadow.version, shadow.sha256, outputs, latency_ms, error)
            predlog.record(dataclasses.replace(entry, shadow=result))

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    async def close(self) -> None:
        """Stop taking shadow runs and cancel those running (nobody waits for them)."""
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def metric_families(self) -> Iterator[Metric]:
        """The shadow's metrics, for the /metrics collector."""
        labels = ["model", "version", "shadow_version"]
        runs = CounterMetricFamily("ferry_shadow_runs", "Shadow runs that answered.", labels=labels)
        dropped = CounterMetricFamily(
            "ferry_shadow_dropped", "Sampled shadow runs not run, by reason.", labels=[*labels, "reason"]
        )
        failed = CounterMetricFamily("ferry_shadow_failures", "Shadow runs that failed.", labels=labels)
        latency = HistogramMetricFamily(
            "ferry_shadow_duration_seconds", "Shadow runs: queue and run on the shadow version.", labels=labels
        )
        per_output = [*labels, "output"]
        compared = CounterMetricFamily(
            "ferry_shadow_compared_rows", "Rows whose outputs were compared with the primary's.", labels=per_output
        )
        agreement = GaugeMetricFamily(
            "ferry_shadow_agreement", "Share of compared rows with the primary's label (or argmax).", labels=per_output
        )
        difference = GaugeMetricFamily(
            "ferry_shadow_mean_abs_difference", "Mean |primary - shadow| of a float output.", labels=per_output
        )
        for (model, version, shadow_version), stats in sorted(self.stats.items()):
            key = [model, str(version), str(shadow_version)]
            runs.add_metric(key, stats.runs)
            for reason in DROP_REASONS:  # every reason, 0 included: a rate over it needs the series to exist
                dropped.add_metric([*key, reason], stats.dropped[reason])
            failed.add_metric(key, stats.failed)
            buckets = [(le, float(count)) for le, count in stats.latency.cumulative()]
            latency.add_metric(key, buckets, stats.latency.sum / 1e9)
            for output, seen in sorted(stats.outputs.items()):
                compared.add_metric([*key, output], seen.rows)
                if (share := seen.agreement) is not None:
                    agreement.add_metric([*key, output], share)
                if (mean := seen.mean_abs_difference) is not None:
                    difference.add_metric([*key, output], mean)
        yield from (runs, dropped, failed, latency, compared, agreement, difference)


__all__ = ["DROP_REASONS", "HYSTERESIS", "TRICKLE_S", "OutputAgreement", "ShadowRunner", "ShadowStats", "compare"]

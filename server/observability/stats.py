"""Per-version inference statistics: the one record that both ``ModelStatistics`` (Triton's shape) and the
Prometheus ``/metrics`` endpoint read, so the hot path pays for counting once.

Updated only from the event loop thread (the model's worker thread hands its timings back with the result), so
plain integer adds need no lock.
"""

from __future__ import annotations

import bisect
import time
from collections import Counter
from dataclasses import dataclass, field

from ferry.client._proto import grpc_service_pb2 as pb


@dataclass(slots=True)
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns

    def to_proto(self) -> pb.StatisticDuration:
        return pb.StatisticDuration(count=self.count, ns=self.ns)


LATENCY_BUCKETS_S = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
BATCH_ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Histogram:
    """Fixed-bucket histogram (upper bounds inclusive, as Prometheus' ``le``); one bisect and two adds per value."""

    __slots__ = ("_scaled", "bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...], scale: float = 1.0) -> None:
        self.bounds = bounds
        self._scaled = [b * scale for b in bounds]  # bounds in the unit values are observed in
        self.counts = [0] * (len(bounds) + 1)  # the last slot is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self._scaled, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, int]]:
        """(le, cumulative count) pairs ending with +Inf, as Prometheus exposes them."""
        total = 0
        out = []
        for bound, count in zip([*(str(float(b)) for b in self.bounds), "+Inf"], self.counts, strict=True):
            total += count
            out.append((bound, total))
        return out


def latency_histogram() -> Histogram:
    """A latency histogram observed in nanoseconds, exposed in seconds."""
    return Histogram(LATENCY_BUCKETS_S, scale=1e9)


@dataclass(slots=True)
class BatchStats:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass(slots=True)
class VersionStats:
    """Cumulative counts and durations (ns) of one model version since it loaded."""

    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    cache_hit: Duration = field(default_factory=Duration)
    cache_miss: Duration = field(default_factory=Duration)
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    batches: dict[int, BatchStats] = field(default_factory=dict)
    failures: Counter[str] = field(default_factory=Counter)  # by gRPC status code name
    routes: Counter[str] = field(default_factory=Counter)  # requests (and shadow runs) by route: models.routing.ROUTES
    request_hist: Histogram = field(default_factory=latency_histogram)
    queue_hist: Histogram = field(default_factory=latency_histogram)
    encode_hist: Histogram = field(default_factory=latency_histogram)
    preprocess_hist: Histogram = field(default_factory=latency_histogram)
    compute_hist: Histogram = field(default_factory=latency_histogram)
    batch_rows_hist: Histogram = field(default_factory=lambda: Histogram(BATCH_ROWS_BUCKETS))

    def record_execution(self, rows: int, input_ns: int, infer_ns: int, output_ns: int) -> None:
        """One model execution of ``rows`` rows (one request now; one formed batch once batching lands)."""
        self.compute_input.add(input_ns)
        self.compute_infer.add(infer_ns)
        self.compute_output.add(output_ns)
        self.preprocess_hist.observe(input_ns)
        self.compute_hist.observe(infer_ns)
        self.batch_rows_hist.observe(rows)
        self.inference_count += rows
        self.execution_count += 1
        batch = self.batches.get(rows)
        if batch is None:
            batch = self.batches[rows] = BatchStats()
        batch.compute_input.add(input_ns)
        batch.compute_infer.add(infer_ns)
        batch.compute_output.add(output_ns)

    def record_request(self, total_ns: int, failure: str | None = None) -> None:
        """One request answered: ``failure`` is the status code name of a failed one."""
        if failure is None:
            self.success.add(total_ns)
        else:
            self.fail.add(total_ns)
            self.failures[failure] += 1
        self.request_hist.observe(total_ns)
        self.last_inference_ms = time.time_ns() // 1_000_000

    def record_queue(self, ns: int) -> None:
        self.queue.add(ns)
        self.queue_hist.observe(ns)

    def to_proto(self, name: str, version: int) -> pb.ModelStatistics:
        return pb.ModelStatistics(
            name=name,
            version=str(version),
            last_inference=self.last_inference_ms,
            inference_count=self.inference_count,
            execution_count=self.execution_count,
            inference_stats=pb.InferStatistics(
                success=self.success.to_proto(),
                fail=self.fail.to_proto(),
                queue=self.queue.to_proto(),
                compute_input=self.compute_input.to_proto(),
                compute_infer=self.compute_infer.to_proto(),
                compute_output=self.compute_output.to_proto(),
                cache_hit=self.cache_hit.to_proto(),
                cache_miss=self.cache_miss.to_proto(),
            ),
            batch_stats=[
                pb.InferBatchStatistics(
                    batch_size=size,
                    compute_input=b.compute_input.to_proto(),
                    compute_infer=b.compute_infer.to_proto(),
                    compute_output=b.compute_output.to_proto(),
                )
                for size, b in sorted(self.batches.items())
            ],
        )

"""Prometheus metrics, read at scrape time from the statistics the server keeps anyway.

Nothing here runs per request: counters and histograms live in each version's ``VersionStats`` (the same record
``ModelStatistics`` answers from), the cache keeps its own counts, and this collector turns them into the text
format when ``GET /metrics`` asks. Names follow Triton's (``nv_inference_*``) with a ``ferry_`` prefix.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from ferry.server.inference.cache import ResultCache
from ferry.server.models.repository import ModelRepository
from ferry.server.observability.stats import Histogram

LABELS = ["model", "version"]


@dataclass(frozen=True, slots=True)
class MetricDoc:
    name: str
    kind: str
    help: str


# Every metric Ferry exposes (the README table and the alert-rules test read this list).
METRICS = (
    MetricDoc("ferry_inference_request_success", "counter", "Requests answered successfully (cache hits included)."),
    MetricDoc("ferry_inference_request_failure", "counter", "Requests that failed, by gRPC status code."),
    MetricDoc("ferry_inference_count", "counter", "Rows run through the model (a request of n rows counts n)."),
    MetricDoc("ferry_inference_exec_count", "counter", "Model executions (a batch counts 1)."),
    MetricDoc("ferry_request_duration_seconds", "histogram", "Time from decoding a request to its encoded answer."),
    MetricDoc("ferry_queue_duration_seconds", "histogram", "Time requests waited in the batcher's queue."),
    MetricDoc("ferry_preprocess_duration_seconds", "histogram", "Per batch: concatenation and preprocessing."),
    MetricDoc("ferry_compute_duration_seconds", "histogram", "Per batch: onnxruntime's run."),
    MetricDoc("ferry_encode_duration_seconds", "histogram", "Per request: building the response message."),
    MetricDoc("ferry_batch_size_rows", "histogram", "Rows per executed batch."),
    MetricDoc("ferry_queue_depth", "gauge", "Requests waiting in the batcher's queue."),
    MetricDoc("ferry_cache_hits", "counter", "Result-cache hits (in-flight duplicates included)."),
    MetricDoc("ferry_cache_misses", "counter", "Result-cache misses."),
    MetricDoc("ferry_cache_evictions", "counter", "Result-cache entries evicted by the byte bound."),
    MetricDoc("ferry_cache_entries", "gauge", "Result-cache entries held."),
    MetricDoc("ferry_cache_bytes", "gauge", "Result-cache bytes held (inputs, outputs and overhead)."),
    MetricDoc("ferry_model_ready", "gauge", "1 if the model version is loaded and serving, else 0."),
    MetricDoc("ferry_inflight_requests", "gauge", "Inference requests being handled by the server."),
    MetricDoc("ferry_route_requests", "counter", "Requests by the route to their version (and shadow runs)."),
    MetricDoc("ferry_model_version_info", "gauge", "1 per serving version: the sha256 of the file it serves."),
    MetricDoc("ferry_model_load_timestamp_seconds", "gauge", "When the serving build finished loading (Unix time)."),
    MetricDoc("ferry_model_warmup_seconds", "gauge", "Time the serving build's warmup took."),
    MetricDoc(
        "ferry_model_load_failed", "gauge", "1 when the last load of this version failed and an earlier build serves."
    ),
)
_DOC = {m.name: m for m in METRICS}

Extra = Callable[[], Iterable[Metric]]
"""More metric families to add at scrape time (prediction log, outcomes, drift)."""


def _family(name: str, labels: list[str]) -> Any:
    doc = _DOC[name]
    kind = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily, "histogram": HistogramMetricFamily}
    return kind[doc.kind](name, doc.help, labels=labels)


def _buckets(hist: Histogram, scale: float) -> tuple[list[tuple[str, float]], float]:
    return [(le, float(count)) for le, count in hist.cumulative()], hist.sum / scale


class FerryCollector(Collector):
    """Builds every Ferry metric from the live statistics at scrape time."""

    def __init__(self, repository: ModelRepository, cache: ResultCache, in_flight: Callable[[], int]) -> None:
        self._repository = repository
        self._cache = cache
        self._in_flight = in_flight
        self.extras: list[Extra] = []

    def collect(self) -> Iterator[Metric]:
        # One family per name (the text format allows one HELP/TYPE block each): the two with other labels apart.
        own_labels = (
            "ferry_inflight_requests",
            "ferry_inference_request_failure",
            "ferry_route_requests",
            "ferry_model_version_info",
        )
        f = {doc.name: _family(doc.name, LABELS) for doc in METRICS if doc.name not in own_labels}
        failure = _family("ferry_inference_request_failure", [*LABELS, "code"])
        routes = _family("ferry_route_requests", [*LABELS, "route"])
        info = _family("ferry_model_version_info", [*LABELS, "sha256"])
        histograms = {
            "ferry_request_duration_seconds": ("request_hist", 1e9),
            "ferry_queue_duration_seconds": ("queue_hist", 1e9),
            "ferry_preprocess_duration_seconds": ("preprocess_hist", 1e9),
            "ferry_compute_duration_seconds": ("compute_hist", 1e9),
            "ferry_encode_duration_seconds": ("encode_hist", 1e9),
            "ferry_batch_size_rows": ("batch_rows_hist", 1.0),
        }
        for model in self._repository.models():
            for version in sorted(v for v in model.errors if v is not None):
                f["ferry_model_ready"].add_metric([model.name, str(version)], 0)
            for number, mv in sorted(model.versions.items()):
                labels = [model.name, str(number)]
                stats = mv.stats
                f["ferry_model_ready"].add_metric(labels, 1)
                info.add_metric([*labels, mv.sha256], 1)
                f["ferry_model_load_timestamp_seconds"].add_metric(labels, mv.loaded_at)
                f["ferry_model_warmup_seconds"].add_metric(labels, mv.warmup_seconds)
                failed = number in model.failed or None in model.failed
                f["ferry_model_load_failed"].add_metric(labels, 1 if failed else 0)
                f["ferry_inference_request_success"].add_metric(labels, stats.success.count)
                for code, count in sorted(stats.failures.items()):
                    failure.add_metric([*labels, code], count)
                for route, count in sorted(stats.routes.items()):
                    routes.add_metric([*labels, route], count)
                f["ferry_inference_count"].add_metric(labels, stats.inference_count)
                f["ferry_inference_exec_count"].add_metric(labels, stats.execution_count)
                for name, (attr, scale) in histograms.items():
                    buckets, total = _buckets(getattr(stats, attr), scale)
                    f[name].add_metric(labels, buckets, total)
                f["ferry_queue_depth"].add_metric(labels, mv.queued)
                cache = self._cache.stats(model.name, number)
                f["ferry_cache_hits"].add_metric(labels, cache.hits)
                f["ferry_cache_misses"].add_metric(labels, cache.misses)
                f["ferry_cache_evictions"].add_metric(labels, cache.evictions)
                f["ferry_cache_entries"].add_metric(labels, cache.entries)
                f["ferry_cache_bytes"].add_metric(labels, cache.bytes)
        yield from f.values()
        yield failure
        yield routes
        yield info
        in_flight = _family("ferry_inflight_requests", [])
        in_flight.add_metric([], self._in_flight())
        yield in_flight
        for extra in self.extras:
            yield from extra()


def registry_for(collector: FerryCollector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    """The Prometheus text format of everything in ``registry``."""
    return generate_latest(registry)

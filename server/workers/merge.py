"""One answer from every worker's: ``ModelStatistics`` summed, and the Prometheus text merged.

Statistics: counts and durations add up (Triton's ``StatisticDuration``, per batch size, per response), the last
inference is the latest of any worker's.

Metrics, family by family:

- counters and histograms add up, sample by sample (same name and labels);
- gauges of things held add up: queue depth, requests in flight, cache entries and bytes, outcomes in the window
  (:data:`SUMMED_GAUGES`);
- gauges of a version's state take the worst (ready: the least) or the newest (load time, warmup, sha256 info,
  failed load: the most) of the workers (:data:`LEAST_GAUGES`, :data:`MOST_GAUGES`), so a version that failed to
  load on one worker shows;
- any other gauge (a ratio such as drift's PSI, live accuracy, shadow agreement: one worker's window, which does not
  add) keeps each worker's value, labelled ``worker``.

``ferry_worker_requests`` says how many inference requests each worker answered (success and failure), which is how
evenly the kernel spreads connections over the workers.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from ferry.client._proto import grpc_service_pb2 as pb

SUMMED_GAUGES = frozenset(
    {
        "ferry_queue_depth",
        "ferry_inflight_requests",
        "ferry_cache_entries",
        "ferry_cache_bytes",
        "ferry_outcome_window",
    }
)
LEAST_GAUGES = frozenset({"ferry_model_ready"})
MOST_GAUGES = frozenset(
    {
        "ferry_model_version_info",
        "ferry_model_load_timestamp_seconds",
        "ferry_model_warmup_seconds",
        "ferry_model_load_failed",
    }
)
_REQUESTS = ("ferry_inference_request_success", "ferry_inference_request_failure")


# -- ModelStatistics


def add_statistics(into: pb.ModelStatisticsResponse, other: pb.ModelStatisticsResponse) -> None:
    """Add ``other``'s statistics to ``into``'s, version by version; versions only ``other`` has are not added
    (``into`` is the answer the caller may see: another worker's extra version is one this caller did not ask
    about, or one a swap is still publishing)."""
    mine = {(s.name, s.version): s for s in into.model_stats}
    for stats in other.model_stats:
        target = mine.get((stats.name, stats.version))
        if target is not None:
            _add_model(target, stats)


def _add_model(into: pb.ModelStatistics, other: pb.ModelStatistics) -> None:
    into.last_inference = max(into.last_inference, other.last_inference)
    into.inference_count += other.inference_count
    into.execution_count += other.execution_count
    _add_durations(into.inference_stats, other.inference_stats)
    batches = {b.batch_size: b for b in into.batch_stats}
    for batch in other.batch_stats:
        if batch.batch_size in batches:
            _add_durations(batches[batch.batch_size], batch)
        else:
            into.batch_stats.add().CopyFrom(batch)
    for key, response in other.response_stats.items():
        _add_durations(into.response_stats[key], response)


def _add_durations(into: pb.InferStatistics, other: pb.InferStatistics) -> None:
    """Every ``StatisticDuration`` field of a message (InferStatistics, InferBatchStatistics, ...)."""
    for field, value in other.ListFields():
        if field.message_type is not None and field.message_type.name == "StatisticDuration":
            target = getattr(into, field.name)
            target.count += value.count
            target.ns += value.ns


# -- Prometheus text


def merge_metrics(texts: Mapping[int, bytes] | Sequence[bytes], extra: Iterable[Metric] = ()) -> bytes:
    """The text format of the workers' expositions (``texts[i]`` is worker i's: a mapping leaves out the workers
    that did not answer, such as one starting again) merged as the module says, with ``extra`` families (the
    supervisor's) after them."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    requests = CounterMetricFamily(
        "ferry_worker_requests", "Inference requests each worker answered (success and failure).", labels=["worker"]
    )
    for worker, text in texts.items() if isinstance(texts, Mapping) else enumerate(texts):
        answered = 0.0
        for family in text_string_to_metric_families(text.decode()):
            families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
            merged = values.setdefault(family.name, {})
            rule = _rule(family)
            for sample in family.samples:
                labels = dict(sample.labels)
                if rule == "worker":
                    labels["worker"] = str(worker)
                key = (sample.name, tuple(sorted(labels.items())))
                if family.name in _REQUESTS:
                    answered += sample.value
                if key not in merged:
                    merged[key] = sample.value
                elif rule == "least":
                    merged[key] = min(merged[key], sample.value)
                elif rule == "most":
                    merged[key] = max(merged[key], sample.value)
                else:
                    merged[key] += sample.value
        requests.add_metric([str(worker)], answered)
    out = []
    for name, family in families.items():
        family.samples = [Sample(sample, dict(labels), value) for (sample, labels), value in values[name].items()]
        out.append(family)
    return text_of([*out, requests, *extra])


def _rule(family: Metric) -> str:
    if family.type in ("counter", "histogram", "summary", "gaugehistogram"):
        return "sum"
    if family.name in SUMMED_GAUGES:
        return "sum"
    if family.name in LEAST_GAUGES:
        return "least"
    if family.name in MOST_GAUGES:
        return "most"
    return "worker"


class _Fixed(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


def text_of(families: list[Metric]) -> bytes:
    """The Prometheus text format of ``families``, as they are."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(families))
    return generate_latest(registry)


__all__ = ["LEAST_GAUGES", "MOST_GAUGES", "SUMMED_GAUGES", "add_statistics", "merge_metrics", "text_of"]

"""OpenTelemetry tracing: a SERVER span per RPC, stage spans per request, and a span per executed batch.

Configured by the standard environment variables: ``OTEL_TRACES_EXPORTER`` (``otlp``, ``console``, ``none``;
default ``none``), ``OTEL_EXPORTER_OTLP_ENDPOINT`` (OTLP over gRPC), ``OTEL_TRACES_SAMPLER`` /
``OTEL_TRACES_SAMPLER_ARG``, ``OTEL_SERVICE_NAME`` (default ``ferry``). Off, it costs one boolean test per request.

Stage spans are recorded after the fact from timestamps the data path takes anyway (``time.perf_counter_ns``),
so tracing adds no context switching to the hot path: a request's decode, cache, queue, preprocess, model and
encode spans are children of its RPC span; the batch span carries model, version, rows and request count, and a
link to every request span it served, while each request span records the id of its batch.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.propagate import extract
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
from opentelemetry.trace import Link, SpanContext, SpanKind

log = logging.getLogger(__name__)

SERVICE = "inference.GRPCInferenceService"
_EPOCH_OFFSET_NS = time.time_ns() - time.perf_counter_ns()


def epoch_ns(perf_ns: int) -> int:
    """A ``time.perf_counter_ns()`` reading as nanoseconds since the epoch (what span timestamps are)."""
    return perf_ns + _EPOCH_OFFSET_NS


class Tracing:
    """Ferry's tracer, or a disabled stand-in. Build with :meth:`from_env`, or from a provider in tests."""

    def __init__(self, provider: TracerProvider | None) -> None:
        self.provider = provider
        self.enabled = provider is not None
        self._tracer = provider.get_tracer("ferry") if provider is not None else None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Tracing:
        names = [n.strip() for n in environ.get("OTEL_TRACES_EXPORTER", "none").split(",") if n.strip()]
        processors: list[SpanProcessor] = []
        for name in names:
            if name == "none":
                continue
            if name == "otlp":
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

                processors.append(BatchSpanProcessor(OTLPSpanExporter()))
            elif name == "console":
                processors.append(BatchSpanProcessor(ConsoleSpanExporter()))
            else:
                raise ValueError(f"OTEL_TRACES_EXPORTER: unknown exporter {name!r} (otlp, console or none)")
        if not processors:
            return cls(None)
        service = environ.get("OTEL_SERVICE_NAME", "ferry")
        provider = TracerProvider(resource=Resource.create({"service.name": service}))  # sampler: OTEL_TRACES_*
        for processor in processors:
            provider.add_span_processor(processor)
        log.info("tracing on: exporters %s, service %s", names, service)
        return cls(provider)

    def shutdown(self) -> None:
        if self.provider is not None:
            self.provider.shutdown()

    def rpc_span(self, method: str, metadata: Iterable[tuple[str, Any]] | None) -> Any:
        """Start (as current) the SERVER span of one RPC, continuing the caller's W3C ``traceparent``."""
        assert self._tracer is not None
        carrier = {key: value for key, value in metadata or () if isinstance(value, str)}
        return self._tracer.start_as_current_span(
            f"{SERVICE}/{method}",
            context=extract(carrier),
            kind=SpanKind.SERVER,
            attributes={"rpc.system": "grpc", "rpc.service": SERVICE, "rpc.method": method},
            record_exception=False,
            set_status_on_exception=False,
        )

    def request_span(self, model: str, request_id: str) -> Any:
        """Start (as current) the span of one request on a stream (its parent is the stream's RPC span)."""
        assert self._tracer is not None
        return self._tracer.start_as_current_span(
            "ModelStreamInfer request", attributes={"ferry.model": model, "ferry.request_id": request_id}
        )

    def stage(
        self,
        name: str,
        start_perf_ns: int,
        end_perf_ns: int,
        parent: Context | None = None,
        attributes: Mapping[str, Any] | None = None,
        links: Sequence[Link] = (),
    ) -> SpanContext:
        """Record a finished span from two ``perf_counter_ns`` readings (as a child of ``parent``, or of the
        current span); returns its context, e.g. for links."""
        assert self._tracer is not None
        span = self._tracer.start_span(
            name, context=parent, attributes=attributes, links=links, start_time=epoch_ns(start_perf_ns)
        )
        span.end(end_time=epoch_ns(end_perf_ns))
        return span.get_span_context()


def current_span_context() -> SpanContext:
    return trace.get_current_span().get_span_context()


def set_attributes(attributes: Mapping[str, Any]) -> None:
    trace.get_current_span().set_attributes(attributes)


NO_TRACING = Tracing(None)
"""The disabled tracer: what components get when nobody wires tracing in."""

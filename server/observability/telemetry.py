"""OpenTelemetry tracing: a SERVER span per RPC, stage spans per request, and a span per executed batch.

Configured by the standard environment variables: ``OTEL_TRACES_EXPORTER`` (``otlp``, ``console``, ``none``;
default ``none``), ``OTEL_EXPORTER_OTLP_ENDPOINT`` (OTLP over gRPC), ``OTEL_TRACES_SAMPLER`` /
``OTEL_TRACES_SAMPLER_ARG``, ``OTEL_SERVICE_NAME`` (default ``ferry``). Off, it costs one boolean test per request.

How it stays cheap. Every span Ferry records is recorded *finished*: the data path takes ``time.perf_counter_ns``
readings anyway, and when a request ends its spans are built from them as SDK ``ReadableSpan`` objects and handed
straight to the provider's span processors (the batch processor and exporters then do what they always do). That
skips the SDK's live-span machinery (context attach and detach, locks, a span object per stage updated in place),
which measured ~28 µs per span against ~5 µs here. Head sampling happens first, by the trace settings
(:mod:`ferry.server.observability.tracesettings`, read from the provider's sampler and changed by the
TraceSetting RPC) with the provider's id generator, so an unsampled request costs ~1.5 µs and records nothing.

The span of the request being handled lives in a context variable (:func:`current_span`); a request's stage spans
are its children, the batch span carries model, version, rows and request count and links to every request span it
served, and each request span records the id of its batch.
"""

from __future__ import annotations

import contextvars
import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.propagate import extract, get_global_textmap
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags

from ferry.server.observability.tracesettings import Policy, TraceSettings

log = logging.getLogger(__name__)

SERVICE = "inference.GRPCInferenceService"
_EPOCH_OFFSET_NS = time.time_ns() - time.perf_counter_ns()
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_SCOPE = InstrumentationScope("ferry")


def epoch_ns(perf_ns: int) -> int:
    """A ``time.perf_counter_ns()`` reading as nanoseconds since the epoch (what span timestamps are)."""
    return perf_ns + _EPOCH_OFFSET_NS


class Span:
    """A sampled span in progress: recorded (as a finished ReadableSpan) by :meth:`Tracing.end`."""

    __slots__ = ("attributes", "context", "kind", "name", "parent", "start_ns", "status")

    def __init__(
        self, name: str, context: SpanContext, parent: SpanContext | None, kind: SpanKind, attributes: dict[str, Any]
    ) -> None:
        self.name = name
        self.context = context
        self.parent = parent
        self.kind = kind
        self.attributes = attributes
        self.start_ns = time.perf_counter_ns()
        self.status = Status(StatusCode.UNSET)


_LOW_64 = (1 << 64) - 1


class _HashedResource(Resource):
    """The provider's resource, hashed once. The OTLP encoder groups every batch of spans by resource, and the
    SDK's Resource hashes itself by serializing its attributes to JSON on each call: a fifth of the exporter's
    ~28 µs per span, measured here."""

    def __init__(self, resource: Resource) -> None:
        super().__init__(resource.attributes, resource.schema_url)
        self._hash = super().__hash__()

    def __hash__(self) -> int:
        return self._hash


_CURRENT: contextvars.ContextVar[Span | None] = contextvars.ContextVar("ferry_span", default=None)


def current_span() -> Span | None:
    """The sampled span of the request being handled in this task, or None (tracing off, or not sampled)."""
    return _CURRENT.get()


class Tracing:
    """Ferry's tracer, or a disabled stand-in. Build with :meth:`from_env`, or from a provider in tests: its
    sampler, id generator, resource and span processors are used as they are."""

    def __init__(self, provider: TracerProvider | None) -> None:
        self.provider = provider
        self.enabled = provider is not None
        self.settings = TraceSettings.from_sampler(provider.sampler if provider is not None else None)
        """What is sampled, changed at run time by the TraceSetting RPC (see its module, tracesettings)."""
        if provider is not None:
            self._sampler = provider.sampler
            self._ids = provider.id_generator
            self._resource: Resource = _HashedResource(provider.resource)
            # The SDK keeps its processors in this (private, long-stable) attribute; finished spans go straight to it.
            self._processor: SpanProcessor = provider._active_span_processor
            self._fields = {f.lower() for f in get_global_textmap().fields}

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Tracing:
        names = [n.strip() for n in environ.get("OTEL_TRACES_EXPORTER", "none").split(",") if n.strip()]
        processors: list[SpanProcessor] = []
        for name in names:
            if name == "none":
                continue
            if name == "otlp":
                from ferry.server.observability.otlp import (
                    FastOTLPSpanExporter,  # the SDK's OTLP/gRPC exporter, a faster encoder
                )

                processors.append(BatchSpanProcessor(FastOTLPSpanExporter()))
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

    def rpc_span(
        self, service: str, method: str, metadata: Iterable[tuple[str, Any]] | None, model: str = ""
    ) -> Span | None:
        """The SERVER span of one RPC, continuing the caller's trace (W3C ``traceparent``), when the trace settings
        (of ``model``, when the RPC names one) sample it; None when they do not. Make it current with :func:`use`,
        record it with :meth:`end`."""
        policy = self.settings.policy(model)
        if not policy.on or policy.counter.count == 0:
            return None
        carrier = {key: value for key, value in metadata or () if key in self._fields and isinstance(value, str)}
        parent = trace.get_current_span(extract(carrier)).get_span_context() if carrier else None
        if parent is not None and not parent.is_valid:
            parent = None
        attributes: dict[str, Any] = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}
        span = self._sampled(f"{service}/{method}", SpanKind.SERVER, parent, attributes, policy)
        if span is not None:
            policy.took(method)
        return span

    def child_span(self, name: str, parent: Span, attributes: dict[str, Any]) -> Span:
        """A span under a sampled one (e.g. one request of a stream under the stream's RPC span)."""
        context = SpanContext(parent.context.trace_id, self._ids.generate_span_id(), False, _SAMPLED)
        return Span(name, context, parent.context, SpanKind.INTERNAL, attributes)

    def _sampled(
        self, name: str, kind: SpanKind, parent: SpanContext | None, attributes: dict[str, Any], policy: Policy
    ) -> Span | None:
        ids = self._ids
        bound = policy.bound
        if bound is not None:  # the decision the SDK's ratio and parent-based samplers make, without the call
            if parent is None:
                trace_id = ids.generate_trace_id()
                if trace_id & _LOW_64 >= bound:
                    return None
                context = SpanContext(trace_id, ids.generate_span_id(), False, _SAMPLED)
                return Span(name, context, None, kind, attributes)
            keep = parent.trace_flags.sampled if policy.parent_based else parent.trace_id & _LOW_64 < bound
            if not keep:
                return None
            context = SpanContext(parent.trace_id, ids.generate_span_id(), False, _SAMPLED, parent.trace_state)
            return Span(name, context, parent, kind, attributes)
        trace_id = parent.trace_id if parent is not None else ids.generate_trace_id()
        parent_context = trace.set_span_in_context(trace.NonRecordingSpan(parent)) if parent is not None else None
        result = self._sampler.should_sample(parent_context, trace_id, name, kind, attributes)
        if not result.decision.is_sampled():
            return None
        if result.attributes:
            attributes.update(result.attributes)
        context = SpanContext(trace_id, ids.generate_span_id(), False, _SAMPLED, result.trace_state)
        return Span(name, context, parent, kind, attributes)

    def end(self, span: Span, end_ns: int | None = None) -> None:
        """Record ``span`` as finished now (or at ``end_ns``, a perf_counter_ns reading)."""
        self._record(
            span.name,
            span.context,
            span.parent,
            span.start_ns,
            time.perf_counter_ns() if end_ns is None else end_ns,
            span.attributes,
            kind=span.kind,
            status=span.status,
        )

    def stage(
        self,
        name: str,
        start_perf_ns: int,
        end_perf_ns: int,
        parent: SpanContext | None,
        attributes: Mapping[str, Any] | None = None,
        links: Sequence[Link] = (),
    ) -> SpanContext:
        """Record a finished span from two ``perf_counter_ns`` readings, as a child of ``parent`` (None: the root of
        a trace of its own); returns its context, e.g. for links."""
        trace_id = parent.trace_id if parent is not None else self._ids.generate_trace_id()
        context = SpanContext(trace_id, self._ids.generate_span_id(), False, _SAMPLED)
        self._record(name, context, parent, start_perf_ns, end_perf_ns, attributes, links)
        return context

    def _record(
        self,
        name: str,
        context: SpanContext,
        parent: SpanContext | None,
        start_ns: int,
        end_ns: int,
        attributes: Mapping[str, Any] | None,
        links: Sequence[Link] = (),
        kind: SpanKind = SpanKind.INTERNAL,
        status: Status | None = None,
    ) -> None:
        self._processor.on_end(
            ReadableSpan(
                name,
                context,
                parent,
                self._resource,
                dict(attributes) if attributes else {},
                links=links,
                kind=kind,
                status=status or Status(StatusCode.UNSET),
                start_time=epoch_ns(start_ns),
                end_time=epoch_ns(end_ns),
                instrumentation_scope=_SCOPE,
            )
        )


def use(span: Span | None) -> contextvars.Token[Span | None]:
    """Make ``span`` the current request span of this task (and of the tasks it creates from now on)."""
    return _CURRENT.set(span)


def restore(token: contextvars.Token[Span | None]) -> None:
    _CURRENT.reset(token)


NO_TRACING = Tracing(None)
"""The disabled tracer: what components get when nobody wires tracing in."""

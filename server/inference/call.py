"""One inference, end to end: resolve the model version, decode, run (at once, or through the cache and the
batcher), encode. Reading this explains a request.

A :class:`Call` is one request in flight. Creating it resolves and decodes (the errors a client can fix surface
here); :meth:`Call.now` answers it in the caller's turn of the event loop when the model can run it at once, which
is the common case for small models under light load; :meth:`Call.later` answers it through the result cache and
the batcher. :func:`infer` is the two together.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
from opentelemetry.trace import SpanContext

from ferry.client._proto import grpc_service_pb2 as pb
from ferry.client.errors import DeadlineExceeded, FerryError, InvalidArgument
from ferry.server.api.codec import decode_inputs, encode_response, requested_outputs
from ferry.server.inference.cache import ResultCache, cache_key
from ferry.server.inference.shadow import ShadowRunner
from ferry.server.models.model import BatchInfo, ModelVersion
from ferry.server.models.repository import ModelRepository
from ferry.server.models.routing import LABEL
from ferry.server.observability.telemetry import NO_TRACING, Span, Tracing, current_span


async def infer(
    request: pb.ModelInferRequest,
    repository: ModelRepository,
    cache: ResultCache,
    deadline: float | None,
    tracing: Tracing = NO_TRACING,
    shadows: ShadowRunner | None = None,
) -> pb.ModelInferResponse:
    """Answer one ModelInferRequest. ``deadline`` is on the ``time.monotonic()`` clock (None = no deadline).
    With tracing on, the current span is the request's: its stages are recorded under it when it ends.
    ``shadows`` runs the request again on its model's shadow version when it is sampled for it (None: never)."""
    call = Call(request, repository, cache, deadline, tracing, shadows)
    return call.now() or await call.later()


class Call:
    """One request in flight, decoded; answer it with :meth:`now` or, when that returns None, :meth:`later`.
    Its statistics (success or failure, latency) are recorded exactly once, when it is answered or fails."""

    __slots__ = (
        "_cache",
        "_decoded",
        "_shadows",
        "_span",
        "_start",
        "_tracing",
        "deadline",
        "feeds",
        "model",
        "names",
        "priority",
        "request",
        "route",
        "rows",
        "shadow",
        "timeout_s",
    )

    def __init__(
        self,
        request: pb.ModelInferRequest,
        repository: ModelRepository,
        cache: ResultCache,
        deadline: float | None,
        tracing: Tracing = NO_TRACING,
        shadows: ShadowRunner | None = None,
    ) -> None:
        self.request = request
        # the version (named, labelled, split or latest), how it was chosen, and the shadow version when sampled
        self.model, self.route, self.shadow = repository.route(request.model_name, request.model_version, request.id)
        model = self.model
        model.stats.routes[self.route] += 1
        self._shadows = shadows
        self._start = time.perf_counter_ns()
        self._cache = cache if model.cache_enabled and cache.max_bytes > 0 else None
        self._tracing = tracing
        self.deadline = deadline
        try:
            self.feeds, self.rows = decode_inputs(request, model)
            self.names = requested_outputs(request, model)
            self.priority, self.timeout_s = scheduling(request)
            if deadline is not None and time.monotonic() >= deadline:
                raise DeadlineExceeded(
                    f"{model.describe()}: the caller's deadline passed before the request was queued"
                )
        except BaseException as err:
            self._failed(err)
            raise
        self._decoded = time.perf_counter_ns()
        self._span = current_span() if tracing.enabled else None  # None: not traced, or not sampled

    def now(self) -> pb.ModelInferResponse | None:
        """The response, when the model can run this request at once without yielding the event loop (no queue,
        a free instance, a run shorter than a hand-off to a worker thread); None otherwise, changing nothing."""
        if self._cache is not None:
            return None  # lookups and single flight live in later()
        try:
            ran = self.model.run_now(self.feeds, self.rows, self._span_context)
            if ran is None:
                return None
            outputs, batch = ran
            self.model.stats.record_queue(0)
            return self._answer(self._selected(outputs), batch, None, queued=False)
        except BaseException as err:
            self._failed(err)
            raise

    async def later(self) -> pb.ModelInferResponse:
        """The response, through the result cache (when the model enables it) and the batcher's queue."""
        model = self.model
        batch: BatchInfo | None = None
        model_ns = 0
        queued = False

        async def run() -> list[np.ndarray]:
            nonlocal batch, model_ns, queued
            began = time.perf_counter_ns()
            outputs, queued_s, batch = await model.infer(
                self.feeds,
                self.rows,
                deadline=self.deadline,
                priority=self.priority,
                timeout_s=self.timeout_s,
                span=self._span_context,
            )
            model.stats.record_queue(int(queued_s * 1e9))
            queued = queued_s > 0
            model_ns = time.perf_counter_ns() - began
            return self._selected(outputs)

        try:
            if self._cache is None:
                return self._answer(await run(), batch, None, queued)
            key, key_bytes = cache_key(model.name, model.version, self.feeds, self.names)
            outputs, hit = await self._cache.get_or_run(key, key_bytes, run)
            cache_ns = time.perf_counter_ns() - self._decoded - model_ns
            if hit:
                model.stats.cache_hit.add(cache_ns)
                model.stats.record_queue(cache_ns)  # Triton counts hits in `queue` too (perf_analyzer relies on it)
            else:
                model.stats.cache_miss.add(cache_ns)
            return self._answer(outputs, batch, hit, queued)
        except BaseException as err:
            self._failed(err)
            raise

    @property
    def _span_context(self) -> SpanContext | None:
        """The request span's context, which the batch span links to (None: not traced, or not sampled)."""
        return self._span.context if self._span is not None else None

    def _selected(self, outputs: list[np.ndarray]) -> list[np.ndarray]:
        """The requested outputs, in the request's order, from all of the model's (in config order)."""
        model = self.model
        if self.names is model.output_names:
            return outputs
        return [outputs[model.output_index[n]] for n in self.names]

    def _answer(
        self, outputs: list[np.ndarray], batch: BatchInfo | None, hit: bool | None, queued: bool
    ) -> pb.ModelInferResponse:
        model = self.model
        encoding = time.perf_counter_ns()
        response = encode_response(self.request, model, self.names, outputs)
        done = time.perf_counter_ns()
        stats = model.stats
        stats.encode_hist.observe(done - encoding)
        monitor = model.monitor
        span = self._span
        shadow = self.shadow if self._shadows is not None else None
        entry = None
        if monitor is not None and monitor.active:
            trace_id = format(span.context.trace_id, "032x") if span is not None else ""
            entry = monitor.after_request(
                self.request.id, self.feeds, outputs, self.names, done - self._start, trace_id, shadow is not None
            )
        if span is not None:
            trace_stages(self._tracing, span, model, (self._start, self._decoded, encoding, done), hit, batch, queued)
            span.attributes["ferry.route"] = self.route
            if self.route == LABEL:
                span.attributes["ferry.version_label"] = self.request.model_version
            if shadow is not None:
                span.attributes["ferry.shadow_version"] = shadow.version
        if shadow is not None and self._shadows is not None:  # after the answer is made, off its path
            self._shadows.submit(model, shadow, self.feeds, self.rows, self.names, outputs, entry, self._span_context)
        stats.record_request(time.perf_counter_ns() - self._start)
        return response

    def _failed(self, err: BaseException) -> None:
        if isinstance(err, FerryError):
            failure = err.code.name
        elif isinstance(err, asyncio.CancelledError):
            failure = "CANCELLED"
        else:
            failure = "INTERNAL"
        self.model.stats.record_request(time.perf_counter_ns() - self._start, failure)


def trace_stages(
    tracing: Tracing,
    span: Span,
    model: ModelVersion,
    times: tuple[int, int, int, int],
    hit: bool | None,
    batch: BatchInfo | None,
    queued: bool,
) -> None:
    """Record the stages of one request where time was spent as children of its span (``times``: perf_counter_ns
    at start, decoded, encoding, done), and its model attributes on it. A request that did not wait in the queue
    gets no queue-wait span, and one that ran alone on a model without preprocessing kernels no preprocess span
    (no concatenation, no kernels: no time was spent there)."""
    start, decoded, encoding, done = times
    parent = span.context
    attributes = span.attributes
    attributes["ferry.model"] = model.name
    attributes["ferry.model_version"] = model.version
    attributes["ferry.model_sha256"] = model.sha256
    tracing.stage("decode", start, decoded, parent)
    if hit is not None:
        attributes["ferry.cache_hit"] = hit
        tracing.stage("cache lookup", decoded, encoding if hit else (batch.started_ns if batch else encoding), parent)
    if batch is not None:
        attributes["ferry.batch_id"] = batch.batch_id
        if queued:
            tracing.stage("queue wait", decoded, batch.started_ns, parent)
        if model.pipeline is not None or batch.requests > 1:  # else there was nothing to prepare: no stage
            tracing.stage("preprocess", batch.started_ns, batch.preprocessed_ns, parent)
        tracing.stage("model run", batch.preprocessed_ns, batch.computed_ns, parent)
    tracing.stage("encode", encoding, done, parent)


def scheduling(request: pb.ModelInferRequest) -> tuple[int, float | None]:
    """The request's ``priority`` (0 = the model's default level) and ``timeout`` (µs, as seconds) parameters."""
    params = request.parameters
    if not params:
        return 0, None
    priority = timeout_s = None
    if "priority" in params:
        priority = _integer(params["priority"], "priority")
    if "timeout" in params:
        timeout_us = _integer(params["timeout"], "timeout")
        timeout_s = timeout_us / 1e6 if timeout_us else None
    return priority or 0, timeout_s


def _integer(param: pb.InferParameter, name: str) -> int:
    kind = param.WhichOneof("parameter_choice")
    if kind not in ("int64_param", "uint64_param"):
        raise InvalidArgument(f"request parameter {name!r} must be an int64 or uint64, got {kind}")
    value = int(getattr(param, kind))
    if value < 0:
        raise InvalidArgument(f"request parameter {name!r} must be >= 0, got {value}")
    return value

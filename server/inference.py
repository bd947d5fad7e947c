"""One inference, end to end: resolve the model version, decode, queue for a batch, encode. Reading this
explains a request."""

from __future__ import annotations

import asyncio
import time

import numpy as np

from client._proto import grpc_service_pb2 as pb
from client.errors import DeadlineExceeded, FerryError, InvalidArgument
from server.cache import ResultCache, cache_key
from server.codec import decode_inputs, encode_response, requested_outputs
from server.model import BatchInfo, ModelVersion
from server.repository import ModelRepository
from server.telemetry import NO_TRACING, Tracing, current_span_context, set_attributes


async def infer(
    request: pb.ModelInferRequest,
    repository: ModelRepository,
    cache: ResultCache,
    deadline: float | None,
    tracing: Tracing = NO_TRACING,
) -> pb.ModelInferResponse:
    """Answer one ModelInferRequest. ``deadline`` is on the ``time.monotonic()`` clock (None = no deadline).
    With tracing on, the current span is the request's: its stages are recorded under it when it ends."""
    model = repository.resolve(request.model_name, request.model_version)
    stats = model.stats
    start = time.perf_counter_ns()
    failure: str | None = "INTERNAL"  # until proven otherwise
    try:
        feeds, rows = decode_inputs(request, model)
        names = requested_outputs(request, model)
        priority, timeout_s = scheduling(request)
        if deadline is not None and time.monotonic() >= deadline:
            raise DeadlineExceeded(f"{model.describe()}: the caller's deadline passed before the request was queued")
        decoded = time.perf_counter_ns()
        span = current_span_context() if tracing.enabled else None
        sampled = span is not None and span.trace_flags.sampled  # unsampled requests record no stage spans
        model_ns = 0
        batch: BatchInfo | None = None

        async def run() -> list[np.ndarray]:
            nonlocal model_ns, batch
            began = time.perf_counter_ns()
            outputs, queued_s, batch = await model.infer(
                feeds, rows, deadline=deadline, priority=priority, timeout_s=timeout_s, span=span
            )
            stats.record_queue(int(queued_s * 1e9))
            model_ns = time.perf_counter_ns() - began
            return outputs if names is model.output_names else [outputs[model.output_index[n]] for n in names]

        hit = None
        if model.cache_enabled and cache.max_bytes > 0:
            key, key_bytes = cache_key(model.name, model.version, feeds, names)
            outputs, hit = await cache.get_or_run(key, key_bytes, run)
            cache_ns = time.perf_counter_ns() - decoded - model_ns
            if hit:
                stats.cache_hit.add(cache_ns)
                stats.record_queue(cache_ns)  # Triton counts hits in `queue` too (perf_analyzer relies on it)
            else:
                stats.cache_miss.add(cache_ns)
        else:
            outputs = await run()
        encoding = time.perf_counter_ns()
        response = encode_response(request, model, names, outputs)
        done = time.perf_counter_ns()
        stats.encode_hist.observe(done - encoding)
        failure = None
        monitor = model.monitor
        if monitor is not None and monitor.active:
            trace_id = format(span.trace_id, "032x") if span is not None else ""
            monitor.after_request(request.id, feeds, outputs, names, done - start, trace_id)
        if sampled:
            trace_stages(tracing, model, start, decoded, encoding, done, hit, batch)
        return response
    except FerryError as err:
        failure = err.code.name
        raise
    except asyncio.CancelledError:
        failure = "CANCELLED"
        raise
    finally:
        stats.record_request(time.perf_counter_ns() - start, failure)


def trace_stages(
    tracing: Tracing,
    model: ModelVersion,
    start: int,
    decoded: int,
    encoding: int,
    done: int,
    hit: bool | None,
    batch: BatchInfo | None,
) -> None:
    """Record the finished stages of one request under its (current) span."""
    attributes: dict[str, str | int | bool] = {
        "ferry.model": model.name,
        "ferry.model_version": model.version,
        "ferry.model_sha256": model.sha256,
    }
    tracing.stage("decode", start, decoded)
    if hit is not None:
        attributes["ferry.cache_hit"] = hit
        tracing.stage("cache lookup", decoded, encoding if hit else (batch.started_ns if batch else encoding))
    if batch is not None:
        attributes["ferry.batch_id"] = batch.batch_id
        tracing.stage("queue wait", decoded, batch.started_ns)
        tracing.stage("preprocess", batch.started_ns, batch.preprocessed_ns)
        tracing.stage("model run", batch.preprocessed_ns, batch.computed_ns)
    tracing.stage("encode", encoding, done)
    set_attributes(attributes)


def scheduling(request: pb.ModelInferRequest) -> tuple[int, float | None]:
    """The request's ``priority`` (0 = the model's default level) and ``timeout`` (µs, as seconds) parameters."""
    params = request.parameters
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

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
from server.repository import ModelRepository


async def infer(
    request: pb.ModelInferRequest, repository: ModelRepository, cache: ResultCache, deadline: float | None
) -> pb.ModelInferResponse:
    """Answer one ModelInferRequest. ``deadline`` is on the ``time.monotonic()`` clock (None = no deadline)."""
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
        model_ns = 0

        async def run() -> list[np.ndarray]:
            nonlocal model_ns
            began = time.perf_counter_ns()
            outputs, queued_s = await model.infer(
                feeds, rows, deadline=deadline, priority=priority, timeout_s=timeout_s
            )
            stats.record_queue(int(queued_s * 1e9))
            model_ns = time.perf_counter_ns() - began
            return outputs if names is model.output_names else [outputs[model.output_index[n]] for n in names]

        if model.cache_enabled and cache.max_bytes > 0:
            key, key_bytes = cache_key(model.name, model.version, feeds, names)
            looked = time.perf_counter_ns()
            outputs, hit = await cache.get_or_run(key, key_bytes, run)
            cache_ns = time.perf_counter_ns() - looked - model_ns
            (stats.cache_hit if hit else stats.cache_miss).add(cache_ns)
        else:
            outputs = await run()
        encoding = time.perf_counter_ns()
        response = encode_response(request, model, names, outputs)
        stats.encode_hist.observe(time.perf_counter_ns() - encoding)
        failure = None
        return response
    except FerryError as err:
        failure = err.code.name
        raise
    except asyncio.CancelledError:
        failure = "CANCELLED"
        raise
    finally:
        stats.record_request(time.perf_counter_ns() - start, failure)


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

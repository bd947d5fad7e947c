"""The server's side of a load test: the model's shape (metadata and config) and its ``ModelStatistics`` deltas.

ModelStatistics counters are cumulative since the version loaded; the difference between two snapshots taken at
the edges of a measurement window is the server's view of that window: how long requests queued versus computed,
how many rows each model execution carried (``Δinference_count / Δexecution_count``: the mean batch size the
dynamic batcher formed) and how often the result cache answered.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import grpc

from ferry.client._proto import grpc_service_pb2 as pb
from ferry.client._proto import grpc_service_pb2_grpc as pb_grpc
from ferry.loadtest.rest import RestStub
from ferry.loadtest.workload import InputSpec, ModelSpec

DURATIONS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output", "cache_hit", "cache_miss")


class _Metadata(grpc.UnaryUnaryClientInterceptor):
    """Adds fixed metadata (``--metadata``: a bearer token) to every unary call of a channel."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self.metadata = metadata

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        details = details._replace(metadata=(*(details.metadata or ()), *self.metadata))
        return continuation(details, request)


def with_metadata(channel: grpc.Channel, metadata: tuple[tuple[str, str], ...]) -> grpc.Channel:
    """``channel``, sending ``metadata`` with each call (the channel itself when there is none)."""
    return grpc.intercept_channel(channel, _Metadata(metadata)) if metadata else channel


def stub_for(channel: grpc.Channel | RestStub) -> Any:
    """The RPCs read here, over gRPC (a channel) or REST (a :class:`~ferry.loadtest.rest.RestStub`)."""
    return channel if isinstance(channel, RestStub) else pb_grpc.GRPCInferenceServiceStub(channel)


def describe_model(channel: grpc.Channel | RestStub, model: str, version: str = "", timeout_s: float = 30) -> ModelSpec:
    """Read the model's inputs and batching from ModelMetadata and ModelConfig (raises grpc.RpcError)."""
    stub = stub_for(channel)
    meta = stub.ModelMetadata(pb.ModelMetadataRequest(name=model, version=version), timeout=timeout_s)
    config = stub.ModelConfig(pb.ModelConfigRequest(name=model, version=version), timeout=timeout_s).config
    mbs = int(config.max_batch_size)
    inputs = tuple(
        InputSpec(i.name, i.datatype, tuple(int(d) for d in (i.shape[1:] if mbs > 0 else i.shape))) for i in meta.inputs
    )
    return ModelSpec(
        name=model,
        version=version,
        max_batch_size=mbs,
        inputs=inputs,
        instance_count=sum(max(g.count, 1) for g in config.instance_group) or 1,
        dynamic_batching=config.HasField("dynamic_batching"),
        response_cache=config.response_cache.enable,
    )


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Cumulative counters of one model (summed over the versions asked for); durations as (count, ns)."""

    success: tuple[int, int] = (0, 0)
    fail: tuple[int, int] = (0, 0)
    queue: tuple[int, int] = (0, 0)
    compute_input: tuple[int, int] = (0, 0)
    compute_infer: tuple[int, int] = (0, 0)
    compute_output: tuple[int, int] = (0, 0)
    cache_hit: tuple[int, int] = (0, 0)
    cache_miss: tuple[int, int] = (0, 0)
    inference_count: int = 0
    execution_count: int = 0

    def minus(self, earlier: Snapshot) -> Snapshot:
        values: dict[str, Any] = {}
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(earlier, f.name)
            values[f.name] = (a[0] - b[0], a[1] - b[1]) if isinstance(a, tuple) else a - b
        return Snapshot(**values)


def snapshot(channel: grpc.Channel | RestStub, model: str, version: str = "", timeout_s: float = 5) -> Snapshot | None:
    """The model's counters now, or None when the server does not answer ModelStatistics."""
    stub = stub_for(channel)
    try:
        reply = stub.ModelStatistics(pb.ModelStatisticsRequest(name=model, version=version), timeout=timeout_s)
    except grpc.RpcError:
        return None
    totals: dict[str, Any] = {name: (0, 0) for name in DURATIONS}
    inference = execution = 0
    for s in reply.model_stats:
        for name in DURATIONS:
            d = getattr(s.inference_stats, name)
            c, ns = totals[name]
            totals[name] = (c + d.count, ns + d.ns)
        inference += s.inference_count
        execution += s.execution_count
    return Snapshot(**totals, inference_count=inference, execution_count=execution)


def view(delta: Snapshot) -> dict[str, Any]:
    """The server's view of a window from a counter delta: means in ms, batch size, cache hit rate."""

    def mean_ms(pair: tuple[int, int]) -> float | None:
        return round(pair[1] / pair[0] / 1e6, 4) if pair[0] else None

    hits, misses = delta.cache_hit[0], delta.cache_miss[0]
    return {
        "requests": delta.success[0],
        "failures": delta.fail[0],
        "inferences": delta.inference_count,
        "executions": delta.execution_count,
        "request_ms": mean_ms(delta.success),
        "queue_ms": mean_ms(delta.queue),
        "compute_input_ms": mean_ms(delta.compute_input),
        "compute_infer_ms": mean_ms(delta.compute_infer),
        "compute_output_ms": mean_ms(delta.compute_output),
        "mean_batch_size": round(delta.inference_count / delta.execution_count, 3) if delta.execution_count else None,
        "cache_hit_rate": round(hits / (hits + misses), 4) if hits + misses else None,
    }

"""OpenTelemetry tracing through a real server: span structure with the SDK's in-memory exporter, and a real
OTLP/gRPC round trip to a trace receiver started inside the test."""

from __future__ import annotations

import asyncio
import os
import queue
import shutil
import signal
from collections.abc import Iterator, Sequence
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from ferry.client._proto import grpc_service_pb2_grpc as pb_grpc
from ferry.server.observability.telemetry import Tracing
from tests.integration.test_rpcs import request_for
from tests.serving import BackgroundServer, background_server, ferry_serve, grpc_address

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


@pytest.fixture(scope="module")
def traced(
    example_repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[BackgroundServer, InMemorySpanExporter]]:
    root = tmp_path_factory.mktemp("traced")
    shutil.copytree(example_repo / "mlp" / "1", root / "mlp" / "1")
    (root / "mlp" / "config.pbtxt").write_text(
        "max_batch_size: 64\ndynamic_batching { max_queue_delay_microseconds: 20000 preferred_batch_size: [ 8 ] }\n"
    )
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with background_server(root, Tracing(provider), http_port=None) as running:
        yield running, exporter


def by_name(spans: Sequence[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


def children_of(spans: Sequence[ReadableSpan], parent: ReadableSpan) -> list[ReadableSpan]:
    return [s for s in spans if s.parent and s.parent.span_id == parent.context.span_id]


def test_rpc_span_continues_the_callers_trace_with_stage_children(
    traced: tuple[BackgroundServer, InMemorySpanExporter],
) -> None:
    server, exporter = traced
    exporter.clear()
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        stub.ModelInfer(
            request_for("mlp", {"input": np.ones((1, 256), np.float32)}), metadata=[("traceparent", TRACEPARENT)]
        )
    spans = exporter.get_finished_spans()
    (rpc,) = by_name(spans, "inference.GRPCInferenceService/ModelInfer")
    assert rpc.kind == SpanKind.SERVER
    assert format(rpc.context.trace_id, "032x") == TRACE_ID
    assert rpc.parent is not None and format(rpc.parent.span_id, "016x") == PARENT_ID
    assert rpc.attributes is not None
    assert rpc.attributes["rpc.system"] == "grpc"
    assert rpc.attributes["rpc.service"] == "inference.GRPCInferenceService"
    assert rpc.attributes["rpc.method"] == "ModelInfer"
    assert rpc.attributes["rpc.grpc.status_code"] == 0
    assert rpc.attributes["ferry.model"] == "mlp" and rpc.attributes["ferry.model_version"] == 1
    assert len(str(rpc.attributes["ferry.model_sha256"])) == 64
    for stage in ("decode", "queue wait", "model run", "encode"):
        children = children_of(by_name(spans, stage), rpc)
        assert len(children) == 1, stage
        assert children[0].start_time <= children[0].end_time  # type: ignore[operator]
    assert not by_name(spans, "preprocess")  # it ran alone and mlp has no kernels: no time went there
    (batch,) = by_name(spans, "batch")
    assert batch.attributes is not None and batch.attributes["ferry.batch_id"] == rpc.attributes["ferry.batch_id"]
    assert [link.context.span_id for link in batch.links] == [rpc.context.span_id]


def test_one_batch_span_links_every_request_it_served(traced: tuple[BackgroundServer, InMemorySpanExporter]) -> None:
    server, exporter = traced
    exporter.clear()

    async def fire() -> None:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            x = np.ones((2, 256), np.float32)
            await asyncio.gather(*(stub.ModelInfer(request_for("mlp", {"input": x})) for _ in range(4)))

    asyncio.run(fire())  # 4 requests of 2 rows reach the preferred size 8 inside the 20 ms window
    spans = exporter.get_finished_spans()
    requests = by_name(spans, "inference.GRPCInferenceService/ModelInfer")
    batches = by_name(spans, "batch")
    assert len(requests) == 4
    linked = {link.context.span_id for batch in batches for link in batch.links}
    assert linked == {r.context.span_id for r in requests}
    for batch in batches:
        assert batch.attributes is not None
        assert batch.attributes["ferry.batch_rows"] == 2 * batch.attributes["ferry.batch_requests"]
        served = [
            r for r in requests if r.attributes and r.attributes["ferry.batch_id"] == batch.attributes["ferry.batch_id"]
        ]
        assert len(served) == batch.attributes["ferry.batch_requests"] == len(batch.links)
        for request in served:  # inputs concatenated for a batch of several: a preprocess stage under each
            assert len(by_name(children_of(spans, request), "preprocess")) == (len(served) > 1)


def test_failed_rpc_span_records_its_status(traced: tuple[BackgroundServer, InMemorySpanExporter]) -> None:
    server, exporter = traced
    exporter.clear()
    with grpc.insecure_channel(server.address) as channel, pytest.raises(grpc.RpcError):
        pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            request_for("nope", {"input": np.ones((1, 256), np.float32)})
        )
    (rpc,) = by_name(exporter.get_finished_spans(), "inference.GRPCInferenceService/ModelInfer")
    assert rpc.attributes is not None and rpc.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert rpc.status.is_unset  # NOT_FOUND is the caller's mistake: not a server error by the RPC conventions


def test_stream_requests_get_spans_under_the_stream(traced: tuple[BackgroundServer, InMemorySpanExporter]) -> None:
    server, exporter = traced
    exporter.clear()
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        requests = [request_for("mlp", {"input": np.ones((1, 256), np.float32)}, id=f"s{i}") for i in range(3)]
        replies = list(stub.ModelStreamInfer(iter(requests), timeout=30))
    assert len(replies) == 3
    spans = exporter.get_finished_spans()
    (stream,) = by_name(spans, "inference.GRPCInferenceService/ModelStreamInfer")
    children = children_of(by_name(spans, "ModelStreamInfer request"), stream)
    assert len(children) == 3
    for request in children:  # each request's stages are children of its own span
        assert request.attributes is not None and request.attributes["ferry.model"] == "mlp"
        assert {"decode", "model run", "encode"} <= {s.name for s in children_of(spans, request)}


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP trace receiver: what a collector would be, in the test."""

    def __init__(self) -> None:
        self.requests: queue.Queue[trace_service_pb2.ExportTraceServiceRequest] = queue.Queue()

    def Export(self, request: trace_service_pb2.ExportTraceServiceRequest, context: object) -> object:
        self.requests.put(request)
        return trace_service_pb2.ExportTraceServiceResponse()


def test_spans_reach_an_otlp_receiver_over_grpc(example_repo: Path) -> None:
    receiver = Receiver()
    collector = grpc.server(futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, collector)
    port = collector.add_insecure_port("127.0.0.1:0")
    collector.start()
    env = {
        **os.environ,
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_SERVICE_NAME": "ferry-under-test",
        "OTEL_TRACES_SAMPLER": "always_on",
    }
    args = ("--model-repository", str(example_repo), "--grpc-port", "0", "--http-port", "-1")
    try:
        with ferry_serve(*args, env=env) as (proc, line):
            with grpc.insecure_channel(grpc_address(line)) as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                stub.ModelInfer(
                    request_for("tiny", {"input": np.ones((1, 16), np.float32)}),
                    metadata=[("traceparent", TRACEPARENT)],
                )
            proc.send_signal(signal.SIGTERM)  # shutdown flushes the batch span processor
            assert proc.wait(timeout=30) == 0
        names: set[str] = set()
        services: set[str] = set()
        trace_ids: set[str] = set()
        received = []
        while not receiver.requests.empty():
            for resource_spans in receiver.requests.get().resource_spans:
                for attribute in resource_spans.resource.attributes:
                    if attribute.key == "service.name":
                        services.add(attribute.value.string_value)
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        names.add(span.name)
                        trace_ids.add(span.trace_id.hex())
                        received.append(span)
        assert "inference.GRPCInferenceService/ModelInfer" in names and {"decode", "model run", "batch"} <= names
        assert services == {"ferry-under-test"}
        assert TRACE_ID in trace_ids
        # what the hand-written OTLP encoding carried: kind, parentage, attributes, links
        (rpc,) = [s for s in received if s.name == "inference.GRPCInferenceService/ModelInfer"]
        attributes = {a.key: a.value for a in rpc.attributes}
        assert rpc.kind == rpc.SPAN_KIND_SERVER and rpc.parent_span_id.hex() == PARENT_ID
        assert attributes["ferry.model"].string_value == "tiny" and attributes["ferry.model_version"].int_value == 1
        (decode,) = [s for s in received if s.name == "decode"]
        assert decode.parent_span_id == rpc.span_id and decode.end_time_unix_nano >= decode.start_time_unix_nano
        (batch,) = [s for s in received if s.name == "batch"]
        assert [link.span_id for link in batch.links] == [rpc.span_id]
    finally:
        collector.stop(0)


def test_unsampled_requests_record_nothing(example_repo: Path) -> None:
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ALWAYS_OFF)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with background_server(example_repo, Tracing(provider), http_port=None) as running:
        with grpc.insecure_channel(running.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            reply = stub.ModelInfer(request_for("tiny", {"input": np.ones((1, 16), np.float32)}))
        assert len(reply.outputs) == 1
    assert exporter.get_finished_spans() == ()


def test_the_providers_sampler_decides_and_unsampled_requests_record_nothing(example_repo: Path) -> None:
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(0.5)))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    unsampled_parent = f"00-{TRACE_ID}-{PARENT_ID}-00"
    with background_server(example_repo, Tracing(provider), http_port=None) as running:
        with grpc.insecure_channel(running.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            x = np.ones((1, 16), np.float32)
            for _ in range(200):
                stub.ModelInfer(request_for("tiny", {"input": x}))
            rpcs = by_name(exporter.get_finished_spans(), "inference.GRPCInferenceService/ModelInfer")
            assert 60 <= len(rpcs) <= 140  # about half of 200 (binomial: 5 standard deviations either side)
            for rpc in rpcs:  # a sampled request records its stages too; an unsampled one records nothing at all
                stages = children_of(exporter.get_finished_spans(), rpc)
                assert {s.name for s in stages} == {"decode", "model run", "encode"}
            exporter.clear()
            stub.ModelInfer(request_for("tiny", {"input": x}), metadata=[("traceparent", unsampled_parent)])
        assert exporter.get_finished_spans() == ()  # the caller did not sample this trace: parent-based says no


def test_outcome_service_calls_get_spans_of_their_own(example_repo: Path) -> None:
    from ferry.client._proto import ferry_pb2 as fpb
    from ferry.client._proto import ferry_pb2_grpc as fpb_grpc

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with background_server(example_repo, Tracing(provider), http_port=None) as running:
        with grpc.insecure_channel(running.address) as channel:
            reply = fpb_grpc.OutcomeServiceStub(channel).ReportOutcomes(
                fpb.ReportOutcomesRequest(outcomes=[fpb.Outcome(request_id="never-seen", model_name="digits", label=1)])
            )
        assert reply.unmatched == 1
    (span,) = by_name(exporter.get_finished_spans(), "ferry.v1.OutcomeService/ReportOutcomes")
    assert span.kind == SpanKind.SERVER and span.attributes is not None
    assert span.attributes["rpc.service"] == "ferry.v1.OutcomeService" and span.attributes["rpc.grpc.status_code"] == 0


def test_trace_settings_change_what_is_sampled_through_tritonclient(example_repo: Path) -> None:
    """Triton's trace extension through Triton's own client: read the settings, turn tracing off and on, cap it with
    a count, give one model settings of its own; bad settings and unknown models are refused."""
    import tritonclient.grpc as tc
    from tritonclient.utils import InferenceServerException

    exporter = InMemorySpanExporter()
    provider = TracerProvider()  # parentbased_always_on: every request, until the settings say otherwise
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    x = np.ones((1, 16), np.float32)

    def traced_calls(model: str, n: int) -> int:
        exporter.clear()
        for _ in range(n):
            inputs = [tc.InferInput("input", list(x.shape) if model == "tiny" else [1, 256], "FP32")]
            inputs[0].set_data_from_numpy(x if model == "tiny" else np.ones((1, 256), np.float32))
            client.infer(model, inputs)
        return len(by_name(exporter.get_finished_spans(), "inference.GRPCInferenceService/ModelInfer"))

    with background_server(example_repo, Tracing(provider), http_port=None) as running:
        client = tc.InferenceServerClient(running.address)
        try:
            assert "trace" in client.get_server_metadata().extensions
            settings = client.get_trace_settings(as_json=True)["settings"]
            assert {k: v["value"] for k, v in settings.items()} == {
                "trace_level": ["TIMESTAMPS"], "trace_rate": ["1"], "trace_count": ["-1"],
                "trace_mode": ["opentelemetry"],
            }  # fmt: skip
            assert traced_calls("tiny", 3) == 3
            client.update_trace_settings(settings={"trace_level": ["OFF"]})
            assert traced_calls("tiny", 3) == 0
            updated = client.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"], "trace_count": "2"})
            assert list(updated.settings["trace_count"].value) == ["2"]
            assert traced_calls("tiny", 5) == 2
            assert list(client.get_trace_settings().settings["trace_count"].value) == ["0"]
            # tiny gets a count of its own; mlp still follows the global count, spent
            client.update_trace_settings(model_name="tiny", settings={"trace_count": "1"})
            assert traced_calls("tiny", 3) == 1 and traced_calls("mlp", 3) == 0
            client.update_trace_settings(settings={"trace_count": None})  # cleared: the startup value, no limit
            assert traced_calls("mlp", 2) == 2
            assert list(client.get_trace_settings(model_name="tiny").settings["trace_count"].value) == ["0"]

            with pytest.raises(InferenceServerException) as refused:
                client.update_trace_settings(settings={"trace_level": ["TENSORS"]})
            assert refused.value.status() == "StatusCode.INVALID_ARGUMENT" and "TIMESTAMPS" in str(refused.value)
            with pytest.raises(InferenceServerException) as unknown:
                client.get_trace_settings(model_name="nope")
            assert unknown.value.status() == "StatusCode.NOT_FOUND" and "nope" in str(unknown.value)
        finally:
            client.close()

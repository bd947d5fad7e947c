"""``ferry.server.observability.otlp``'s hand-written span encoding against the SDK's own encoder: the same
ExportTraceServiceRequest, field for field, for spans using every feature a ReadableSpan can carry."""

from __future__ import annotations

from typing import Any

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, TraceFlags, TraceState
from opentelemetry.trace.status import Status, StatusCode

from ferry.server.observability.otlp import FastOTLPSpanExporter, encode_request

SAMPLED = TraceFlags(TraceFlags.SAMPLED)
RESOURCE = Resource.create({"service.name": "ferry", "host.cores": 2})
OTHER = Resource({"service.name": "other"}, schema_url="https://example.com/schema")
SCOPE = InstrumentationScope("ferry", "0.1", attributes={"scope.kind": "server"})


def context(trace_id: int, span_id: int, remote: bool = False, state: TraceState | None = None) -> SpanContext:
    return SpanContext(trace_id, span_id, remote, SAMPLED, state)


def spans() -> list[ReadableSpan]:
    root = context(0x0123456789ABCDEF0123456789ABCDEF, 0x1122334455667788)
    remote_parent = context(0x0123456789ABCDEF0123456789ABCDEF, 0x99AABBCCDDEEFF00, remote=True)
    attributes: Any = {  # beyond the SDK's AnyValue type on purpose: None and a mapping are encoded too
        "text": "naïve", "yes": True, "no": False, "small": 7, "big": 1 << 62, "negative": -5, "ratio": 0.25,
        "raw": b"\x00\xff", "ints": [1, 2, 3], "words": ("a", "b"), "mixed": [1.5, 2.5], "nothing": None,
        "nested": {"k": "v", "n": 1},
    }  # fmt: skip
    return [
        ReadableSpan("inference.GRPCInferenceService/ModelInfer", context(root.trace_id, 0x01, state=TraceState(
            [("vendor", "x1"), ("other", "y")])), remote_parent, RESOURCE, attributes, kind=SpanKind.SERVER,
            status=Status(StatusCode.ERROR, "model failed"), start_time=1_700_000_000_000_000_000,
            end_time=1_700_000_000_000_123_456, instrumentation_scope=SCOPE,
            events=[Event("retry", {"attempt": 2}, timestamp=1_700_000_000_000_050_000), Event("plain", None, 5)]),
        ReadableSpan("decode", context(root.trace_id, 0x02), root, RESOURCE, {}, start_time=10, end_time=20,
                     instrumentation_scope=SCOPE),
        ReadableSpan("batch", context(0xFEDCBA9876543210FEDCBA9876543210, 0x03), None, RESOURCE,
                     {"ferry.batch_rows": 5}, links=[Link(root, {"why": "served"}), Link(remote_parent)],
                     status=Status(StatusCode.OK), start_time=30, end_time=40, instrumentation_scope=SCOPE),
        ReadableSpan("elsewhere", context(root.trace_id, 0x04), root, OTHER, {"k": 1}, kind=SpanKind.CLIENT,
                     start_time=50, end_time=60),
        ReadableSpan("consumer", context(root.trace_id, 0x05), root, RESOURCE, None, kind=SpanKind.CONSUMER,
                     start_time=70, end_time=80, instrumentation_scope=InstrumentationScope("other.library")),
    ]  # fmt: skip


def test_the_hand_encoding_equals_the_sdks() -> None:
    batch = spans()
    ours = ExportTraceServiceRequest.FromString(encode_request(batch))
    theirs = encode_spans(batch)
    assert ours == theirs
    assert [len(r.scope_spans) for r in ours.resource_spans] == [2, 1]  # grouped by resource, then scope


def test_each_span_alone_and_an_empty_batch() -> None:
    for span in spans():
        assert ExportTraceServiceRequest.FromString(encode_request([span])) == encode_spans([span])
    assert encode_request([]) == b"" and ExportTraceServiceRequest.FromString(b"") == encode_spans([])


def test_the_exporter_is_the_sdks_with_its_encoder_replaced() -> None:
    """The SDK's exporter turns spans into a request in ``_translate_data``; if a release renames it, the fast
    encoder would silently stop being used: this fails first."""
    assert "_translate_data" in vars(OTLPSpanExporter)
    exporter = FastOTLPSpanExporter(endpoint="127.0.0.1:1", insecure=True)
    try:
        assert exporter._translate_data(spans()) == encode_spans(spans())
    finally:
        exporter.shutdown()


def test_repeated_attributes_keep_their_types_and_signs() -> None:
    """Encoded attributes are reused across spans: a key seen with True must not answer for 1, nor 0.0 for -0.0."""
    root = context(0x0123456789ABCDEF0123456789ABCDEF, 0x1122334455667788)
    values: list[Any] = [True, 1, 1, True, 0.0, -0.0, float("nan"), "1", 0, False]
    batch = [
        ReadableSpan("s", context(root.trace_id, i + 1), root, RESOURCE, {"v": v}, start_time=i, end_time=i + 1)
        for i, v in enumerate(values)
    ]
    assert ExportTraceServiceRequest.FromString(encode_request(batch)) == encode_spans(batch)
    assert ExportTraceServiceRequest.FromString(encode_request(batch[::-1])) == encode_spans(batch[::-1])

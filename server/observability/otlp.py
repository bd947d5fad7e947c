"""OTLP span export with the encoding written by hand: the official OTLP/gRPC exporter (its transport, retries,
compression and ``OTEL_EXPORTER_OTLP_*`` configuration), but each batch of spans is written straight to protobuf's
wire format and parsed once by protobuf's C code, instead of built message by message in Python.

Why: with tracing on, encoding was most of what a sampled request cost the server. The SDK's encoder
(``opentelemetry-exporter-otlp-proto-common``) builds a Python protobuf object per span, attribute and link: ~20 µs
a span here, on the exporter thread, which holds the GIL the event loop needs. This encoder writes the same
``ExportTraceServiceRequest`` in a few µs a span. A test checks it against the SDK's encoder field for field, on
spans with every feature the SDK can give them (links, events, trace state, remote parents, every attribute type).

The wire format (proto3, opentelemetry/proto/trace/v1/trace.proto): field numbers and types are the protocol's;
tags are precomputed below as bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, StatusCode

_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
_F64 = struct.Struct("<d")
_VARINT = [bytes([i]) for i in range(128)]
_HAS_IS_REMOTE, _IS_REMOTE = 0x100, 0x200  # SpanFlags: the parent's is-remote bit is known / set


def _varint(n: int) -> bytes:
    if 0 <= n < 128:
        return _VARINT[n]
    if n < 0:
        n += 1 << 64  # int64: two's complement, ten bytes
    out = bytearray()
    while n >= 128:
        out.append((n & 127) | 128)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field (``tag`` already holds the field number and wire type 2)."""
    return tag + _varint(len(payload)) + payload


def _value(value: Any) -> bytes:
    """An AnyValue: string 1, bool 2, int64 3, double 4, array 5, kvlist 6, bytes 7 (None: an empty one)."""
    if value is None:
        return b""
    if isinstance(value, str):
        return _field(b"\x0a", value.encode())
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, int):
        return b"\x18" + _varint(value)
    if isinstance(value, float):
        return b"\x21" + _F64.pack(value)
    if isinstance(value, bytes):
        return _field(b"\x3a", value)
    if isinstance(value, Mapping):
        return _field(b"\x32", b"".join(_field(b"\x0a", _key_value(str(k), v)) for k, v in value.items()))
    if isinstance(value, Sequence):
        return _field(b"\x2a", b"".join(_field(b"\x0a", _value(v)) for v in value))
    raise TypeError(f"cannot encode attribute value of type {type(value).__name__}")


def _key_value(key: str, value: Any) -> bytes:
    return _field(b"\x0a", key.encode()) + _field(b"\x12", _value(value))


_SCALARS = (str, bool, int)  # not float: -0.0 == 0.0 and nan != nan would mislead the memo
_MEMO_LIMIT = 4096
_attribute_memo: dict[tuple[bytes, str, type, Any], bytes] = {}
"""Encoded attributes by (tag, key, type, value): Ferry's spans repeat the same few (model, version, sha256, rpc.*).
The type is part of the key because ``True == 1``. Emptied when full, so it stays bounded."""


def _attributes(tag: bytes, attributes: Mapping[str, Any] | None) -> bytes:
    """Repeated KeyValue; an attribute whose value cannot be encoded is left out (as the SDK's encoder does)."""
    if not attributes:
        return b""
    out = []
    memo = _attribute_memo
    for key, value in attributes.items():
        kind = type(value)
        if kind in _SCALARS:
            encoded = memo.get((tag, key, kind, value))
            if encoded is None:
                if len(memo) >= _MEMO_LIMIT:
                    memo.clear()
                encoded = memo[(tag, key, kind, value)] = _field(tag, _key_value(key, value))
            out.append(encoded)
            continue
        try:
            out.append(_field(tag, _key_value(key, value)))
        except TypeError:
            continue
    return b"".join(out)


_FLAGS = {False: b"\x85\x01" + _U32.pack(_HAS_IS_REMOTE), True: b"\x85\x01" + _U32.pack(_HAS_IS_REMOTE | _IS_REMOTE)}
"""The span's flags field (16, fixed32) by whether its parent is remote."""
_LINK_FLAGS = {remote: b"\x35" + flags[2:] for remote, flags in _FLAGS.items()}  # a link's flags: field 6
_KINDS = {kind: b"\x30" + _varint(kind.value + 1) for kind in SpanKind}  # OTLP counts kinds from 1
_UNSET = _field(b"\x7a", b"")  # an empty Status
_names: dict[str, bytes] = {}  # a span's name field by name (Ferry's are a handful)


def _trace_state(context: SpanContext) -> str:
    state = context.trace_state
    return ",".join(f"{k}={v}" for k, v in state.items()) if state else ""


def encode_span(span: ReadableSpan) -> bytes:
    """One Span message."""
    context = span.context
    assert context is not None
    parent = span.parent
    out = [b"\x0a\x10", context.trace_id.to_bytes(16, "big"), b"\x12\x08", context.span_id.to_bytes(8, "big")]
    if context.trace_state and (state := _trace_state(context)):
        out.append(_field(b"\x1a", state.encode()))
    if parent is not None:
        out += (b"\x22\x08", parent.span_id.to_bytes(8, "big"))
    name = span.name
    if (name_field := _names.get(name)) is None:
        if len(_names) >= _MEMO_LIMIT:
            _names.clear()
        name_field = _names[name] = _field(b"\x2a", name.encode())
    out += (
        name_field,
        _KINDS[span.kind],
        b"\x39",
        _U64.pack(span.start_time or 0),
        b"\x41",
        _U64.pack(span.end_time or 0),
        _attributes(b"\x4a", span.attributes),
    )
    if span.dropped_attributes:
        out += (b"\x50", _varint(span.dropped_attributes))
    for event in span.events:
        body = b"\x09" + _U64.pack(event.timestamp) + _field(b"\x12", event.name.encode())
        body += _attributes(b"\x1a", event.attributes)
        if event.dropped_attributes:
            body += b"\x20" + _varint(event.dropped_attributes)
        out.append(_field(b"\x5a", body))
    if span.dropped_events:
        out += (b"\x60", _varint(span.dropped_events))
    for link in span.links:
        linked = link.context
        body = b"\x0a\x10" + linked.trace_id.to_bytes(16, "big") + b"\x12\x08" + linked.span_id.to_bytes(8, "big")
        body += _attributes(b"\x22", link.attributes)
        if link.dropped_attributes:
            body += b"\x28" + _varint(link.dropped_attributes)
        out.append(_field(b"\x6a", body + _LINK_FLAGS[linked.is_remote]))
    if span.dropped_links:
        out += (b"\x70", _varint(span.dropped_links))
    status = span.status
    if status.status_code is StatusCode.UNSET and not status.description:
        out.append(_UNSET)
    else:
        body = _field(b"\x12", status.description.encode()) if status.description else b""
        if code := status.status_code.value:
            body += b"\x18" + _varint(code)
        out.append(_field(b"\x7a", body))
    out.append(_FLAGS[parent is not None and parent.is_remote])  # flags (16, fixed32)
    return b"".join(out)


def _resource(resource: Resource) -> bytes:
    return _attributes(b"\x0a", resource.attributes)


def _scope(scope: InstrumentationScope | None) -> bytes:
    if scope is None:
        return b""
    body = _field(b"\x0a", scope.name.encode()) if scope.name else b""
    if scope.version:
        body += _field(b"\x12", scope.version.encode())
    return body + _attributes(b"\x1a", scope.attributes)


def encode_request(spans: Sequence[ReadableSpan]) -> bytes:
    """An ExportTraceServiceRequest: spans grouped by resource, then by instrumentation scope, in first-seen order
    (as the SDK's encoder groups them)."""
    groups: dict[Resource, dict[InstrumentationScope | None, list[bytes]]] = {}
    for span in spans:
        scopes = groups.setdefault(span.resource, {})
        scopes.setdefault(span.instrumentation_scope or None, []).append(encode_span(span))
    out = []
    for resource, scopes in groups.items():
        body = _field(b"\x0a", _resource(resource))
        for scope, encoded in scopes.items():
            scope_body = _field(b"\x0a", _scope(scope)) + b"".join(_field(b"\x12", s) for s in encoded)
            if scope is not None and scope.schema_url:
                scope_body += _field(b"\x1a", scope.schema_url.encode())
            body += _field(b"\x12", scope_body)
        if resource.schema_url:
            body += _field(b"\x1a", resource.schema_url.encode())
        out.append(_field(b"\x0a", body))
    return b"".join(out)


class FastOTLPSpanExporter(OTLPSpanExporter):
    """:class:`OTLPSpanExporter` with :func:`encode_request` as its encoder (everything else is the SDK's)."""

    def _translate_data(self, data: Sequence[ReadableSpan]) -> ExportTraceServiceRequest:
        return ExportTraceServiceRequest.FromString(encode_request(data))

"""REST answers: JSON (with binary tensor parts after it), compressed as ``Accept-Encoding`` allows; every
failure as the protocol's ``{"error": ...}`` (:func:`json_errors`, around every endpoint); protobuf replies as
Triton's REST JSON (:func:`message_json`)."""

from __future__ import annotations

import logging
import zlib
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from ferry.client.errors import FerryError
from ferry.server.api.rest_context import HttpAnswer, HttpRequest, RestError

log = logging.getLogger(__name__)

COMPRESS_MIN_BYTES = 1024
"""Answers shorter than this are sent uncompressed whatever ``Accept-Encoding`` allows: gzip's header alone is 18
bytes, and compressing costs more than it saves."""


def reply_json(request: HttpRequest, doc: Any, status: int = 200) -> HttpAnswer:
    return answer(request, orjson.dumps(doc), (), status)


def answer(request: HttpRequest, body: bytes, parts: Any = (), status: int = 200) -> HttpAnswer:
    """A JSON answer, with binary tensor parts after it when there are any; compressed as ``Accept-Encoding``
    allows."""
    headers: dict[str, str] | None = None
    if parts:
        headers = {"Inference-Header-Content-Length": str(len(body))}
        payload = b"".join((body, *parts))
        content_type = "application/octet-stream"
    else:
        payload = body
        content_type = "application/json"
    if len(payload) >= COMPRESS_MIN_BYTES:
        encoding = _accepted_encoding(request.headers.get("accept-encoding", ""))
        if encoding is not None:
            compressor = zlib.compressobj(1, wbits=31 if encoding == "gzip" else 15)  # level 1: tensors barely shrink
            payload = compressor.compress(payload) + compressor.flush()
            headers = {**(headers or {}), "Content-Encoding": encoding}
    return HttpAnswer(status, payload, content_type, headers)


def _accepted_encoding(accept: str) -> str | None:
    """gzip or deflate, when ``Accept-Encoding`` takes it (gzip first); None for identity."""
    if not accept:
        return None
    taken = set()
    for item in accept.lower().split(","):
        name, _, params = item.strip().partition(";")
        q = params.strip()
        if q.startswith("q="):
            try:
                if float(q[2:]) <= 0:
                    continue
            except ValueError:
                continue
        taken.add(name.strip())
    for encoding in ("gzip", "deflate"):
        if encoding in taken:
            return encoding
    return None


def error_answer(err: RestError) -> HttpAnswer:
    close = err.headers.get("Connection") == "close"
    return HttpAnswer(err.status, orjson.dumps({"error": err.message}), headers=err.headers, close=close)


async def json_errors(request: HttpRequest, handler: Callable[[HttpRequest], Awaitable[HttpAnswer]]) -> HttpAnswer:
    """Every failure as the protocol's ``{"error": ...}``: ours, and a FerryError raised while translating."""
    try:
        return await handler(request)
    except RestError as err:
        return error_answer(err)
    except FerryError as err:
        return error_answer(RestError.of(err.code, err.message))
    except Exception:
        log.exception("REST %s %s failed unexpectedly", request.method, request.path)
        return error_answer(RestError(500, f"internal error in {request.method} {request.path}"))


# -- protobuf replies as Triton's JSON


_INTS64 = {
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED64,
    FieldDescriptor.TYPE_SFIXED64,
}


def message_json(message: Message) -> dict[str, Any]:
    """A reply as Triton's REST answers have it: protobuf's JSON with the proto field names and every field
    present, but 64-bit integers as JSON numbers (protobuf's JSON writes them as strings)."""
    doc = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    _numbers(message.DESCRIPTOR, doc)
    return doc


def _numbers(descriptor: Descriptor, doc: dict[str, Any]) -> None:
    for field in descriptor.fields:
        value = doc.get(field.name)
        if value is None:
            continue
        entry = field.message_type
        if entry is not None and entry.GetOptions().map_entry:
            target = entry.fields_by_name["value"]
            if target.message_type is not None:
                for item in value.values():
                    _numbers(target.message_type, item)
            elif target.type in _INTS64:
                for key in value:
                    value[key] = int(value[key])
        elif entry is not None:
            for item in value if isinstance(value, list) else [value]:
                _numbers(entry, item)
        elif field.type in _INTS64:
            doc[field.name] = [int(v) for v in value] if isinstance(value, list) else int(value)


__all__ = ["COMPRESS_MIN_BYTES", "answer", "error_answer", "json_errors", "message_json", "reply_json"]

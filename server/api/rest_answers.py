"""REST answers: JSON (with binary tensor parts after it), compressed as ``Accept-Encoding`` allows; every
failure as the protocol's ``{"error": ...}`` (:func:`json_errors`, the app's middleware); protobuf replies as
Triton's REST JSON (:func:`message_json`)."""

from __future__ import annotations

import logging
import zlib
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from ferry.client.errors import FerryError
from ferry.server.api.rest_context import RestError

log = logging.getLogger(__name__)

COMPRESS_MIN_BYTES = 1024
"""Answers shorter than this are sent uncompressed whatever ``Accept-Encoding`` allows: gzip's header alone is 18
bytes, and compressing costs more than it saves."""


def reply_json(request: web.Request, doc: Any, status: int = 200) -> web.Response:
    return answer(request, orjson.dumps(doc), (), status)


def answer(request: web.Request, body: bytes, parts: Any = (), status: int = 200) -> web.Response:
    """A JSON answer, with binary tensor parts after it when there are any; compressed as ``Accept-Encoding``
    allows."""
    headers = {}
    if parts:
        headers["Inference-Header-Content-Length"] = str(len(body))
        payload = b"".join((body, *parts))
        content_type = "application/octet-stream"
    else:
        payload = body
        content_type = "application/json"
    if len(payload) >= COMPRESS_MIN_BYTES:
        encoding = _accepted_encoding(request.headers.get("Accept-Encoding", ""))
        if encoding is not None:
            compressor = zlib.compressobj(1, wbits=31 if encoding == "gzip" else 15)  # level 1: tensors barely shrink
            payload = compressor.compress(payload) + compressor.flush()
            headers["Content-Encoding"] = encoding
    return web.Response(body=payload, status=status, headers=headers, content_type=content_type)


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


def error_response(err: RestError) -> web.Response:
    response = web.Response(
        body=orjson.dumps({"error": err.message}),
        status=err.status,
        headers=err.headers,
        content_type="application/json",
    )
    if err.headers.get("Connection") == "close":
        response.force_close()
    return response


@web.middleware
async def json_errors(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> Any:
    """Every failure as the protocol's ``{"error": ...}``: ours, a FerryError raised while translating, and
    aiohttp's own (no such route, method not allowed, a malformed request)."""
    try:
        return await handler(request)
    except RestError as err:
        return error_response(err)
    except FerryError as err:
        return error_response(RestError.of(err.code, err.message))
    except web.HTTPException as err:
        if err.status < 400:
            raise
        headers = {"Allow": err.headers["Allow"]} if "Allow" in err.headers else {}
        if err.status == 404:
            message = f"no endpoint {request.path}"
        elif err.status == 405:
            message = f"{request.method} is not allowed on {request.path}; allowed: {headers.get('Allow', '')}"
        else:
            message = err.text or err.reason
        return error_response(RestError(err.status, message, headers))
    except Exception:
        log.exception("REST %s %s failed unexpectedly", request.method, request.path)
        return error_response(RestError(500, f"internal error in {request.method} {request.path}"))


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


__all__ = ["COMPRESS_MIN_BYTES", "answer", "error_response", "json_errors", "message_json", "reply_json"]

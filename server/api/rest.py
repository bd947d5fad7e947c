"""The Open Inference Protocol over HTTP/REST, with Triton's extensions, by translation only.

Each endpoint turns its JSON (or binary) body into the protobuf request of the matching RPC, runs the handler that
the gRPC services registered (looked up by method path in the table app.py builds, so whatever guards a gRPC
method guards its REST twin), with a :class:`~ferry.server.api.rest_context.RestContext` for context, and turns the
reply into JSON shaped as Triton's REST answers are. There is no second implementation of any RPC here.

Errors are the protocol's ``{"error": "..."}``, with the HTTP status of the RPC's gRPC status
(:data:`~ferry.server.api.rest_context.HTTP_STATUS`); what REST itself refuses: 413 (a body over the limit, before
it is read), 415 (a content type or encoding it does not read), 408 (a body that does not arrive in time), 404/405
(no such route or method), 400 (a body that does not parse). A call's deadline: the ``Ferry-Timeout`` or
``grpc-timeout`` header (grpc-timeout's format, e.g. ``250m``) or an inference's ``timeout`` parameter (µs),
whichever ends first; a call still running then is cancelled and answered 504.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import time
import zlib
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import grpc
from google.protobuf.message import Message

from ferry.client._proto import ferry_pb2 as fpb
from ferry.client._proto import grpc_service_pb2 as pb
from ferry.client.errors import InvalidArgument
from ferry.server.api.rest_answers import answer, message_json, reply_json
from ferry.server.api.rest_context import Aborted, HttpAnswer, HttpRequest, RestContext, RestError, parse_timeout
from ferry.server.api.rest_tensors import infer_request, infer_response, parse_json

log = logging.getLogger(__name__)

INFERENCE = "/inference.GRPCInferenceService/"
OUTCOMES = "/ferry.v1.OutcomeService/ReportOutcomes"
OPENAPI = Path(__file__).with_name("openapi.yaml")
"""The REST API's OpenAPI 3 document (docs/openapi.yaml links here), served at ``GET /v2/openapi.yaml``."""

JSON_TYPES = frozenset(
    {"", "application/json", "application/octet-stream", "application/x-www-form-urlencoded", "text/plain"}
)
"""Request content types read as the protocol's body: JSON, JSON with binary tensors, and what ``curl -d`` and a
browser's ``fetch`` send when not told (both carry the JSON unchanged). Anything else is 415."""


class Method(Protocol):
    """A registered handler as the services table keeps it (``ferry.server.transport.calls.Method``)."""

    kind: int  # 0: unary request, unary reply
    behavior: Callable[[Any, Any], Awaitable[Any]]


Lookup = Callable[[bytes], Method | None]
Handler = Callable[[HttpRequest], Coroutine[Any, Any, HttpAnswer]]
Route = tuple[str, str, Handler]
"""A route: its method, its path template (``{name}`` matches one path segment) and its endpoint."""


@dataclass(frozen=True, slots=True)
class RestLimits:
    """What one REST call may hold: its body's size, as sent and decompressed (the HTTP protocol bounds the time
    it takes to arrive)."""

    max_body_bytes: int = 64 * 1024 * 1024


class RestApi:
    """The REST endpoints, each a translation onto one RPC of the services ``lookup`` finds."""

    def __init__(self, lookup: Lookup, limits: RestLimits | None = None) -> None:
        self._lookup = lookup
        self.limits = limits or RestLimits()

    def routes(self) -> list[Route]:
        m, mv = "/v2/models/{model}", "/v2/models/{model}/versions/{version}"
        get: list[tuple[str, Handler]] = [
            ("/v2", self.server_metadata),
            ("/v2/health/live", self.live),
            ("/v2/health/ready", self.ready),
            ("/v2/models/stats", self.statistics),
            ("/v2/trace/setting", self.trace_setting),
            ("/v2/openapi.yaml", self.openapi),
        ]
        post: list[tuple[str, Handler]] = [
            ("/v2/repository/index", self.repository_index),
            ("/v2/repository/models/{model}/load", self.load),
            ("/v2/repository/models/{model}/unload", self.unload),
            ("/v2/trace/setting", self.trace_setting),
            ("/v2/outcomes", self.outcomes),
        ]
        for base in (m, mv):
            get += [
                (base, self.model_metadata),
                (f"{base}/ready", self.model_ready),
                (f"{base}/config", self.model_config),
                (f"{base}/stats", self.statistics),
            ]
            post.append((f"{base}/infer", self.infer))
        get.append((f"{m}/trace/setting", self.trace_setting))
        post.append((f"{m}/trace/setting", self.trace_setting))
        for kind in ("system", "cuda"):  # Triton's shared-memory extensions: the RPCs answer UNIMPLEMENTED
            base, rpc = f"/v2/{kind}sharedmemory", f"{kind.capitalize()}SharedMemory"
            region = f"{base}/region/{{region}}"
            status, register, unregister = (self._bare(f"{rpc}{verb}") for verb in ("Status", "Register", "Unregister"))
            get += [(f"{base}/status", status), (f"{region}/status", status)]
            post += [(f"{region}/register", register), (f"{base}/unregister", unregister)]
            post.append((f"{region}/unregister", unregister))
        get.append(("/v2/logging", self._bare("LogSettings")))
        post.append(("/v2/logging", self._bare("LogSettings")))
        # routes are tried in order: inference first, so the hot path matches at the first try (the others keep
        # their order: /v2/models/stats before /v2/models/{model})
        post.sort(key=lambda route: not route[0].endswith("/infer"))
        return [("POST", p, h) for p, h in post] + [("GET", p, h) for p, h in get]

    def _bare(self, rpc: str) -> Handler:
        """The endpoint of an RPC Ferry answers without reading a request (shared memory, log settings: all
        UNIMPLEMENTED, 501): its request message names the region, and the reply is the RPC's as JSON."""
        request_type = getattr(pb, f"{rpc}Request")

        async def endpoint(request: HttpRequest) -> HttpAnswer:
            region = request.match_info.get("region")
            message = request_type(name=region) if region is not None else request_type()
            return reply_json(request, message_json(await self.call(rpc, message, request)))

        return endpoint

    # -- the calls

    async def call(self, rpc: str, message: Message, request: HttpRequest, deadline: float | None = None) -> Any:
        """Run the registered handler of ``rpc`` (a method path, or a name of the inference service) on
        ``message``; its reply, or a RestError carrying its status."""
        path = rpc if rpc.startswith("/") else INFERENCE + rpc
        method = self._lookup(path.encode())
        if method is None or method.kind != 0:
            raise RestError(501, f"{path} is not served")
        context = RestContext(request, deadline)
        try:
            if deadline is None:
                reply = await method.behavior(message, context)
            else:
                reply = await _until(method.behavior(message, context), deadline, path)
        except Aborted as err:
            raise RestError.of(err.code, err.details) from None
        code = context.code()
        if reply is None or (code is not None and code != grpc.StatusCode.OK):
            raise RestError.of(code or grpc.StatusCode.UNKNOWN, context.details() or f"{path} gave no reply")
        return reply

    async def infer(self, request: HttpRequest) -> HttpAnswer:
        body = await self.body(request)
        info = request.match_info
        message, outputs = infer_request(
            info["model"], info.get("version", ""), body, request.headers.get("inference-header-content-length")
        )
        reply = await self.call("ModelInfer", message, request, self.deadline(request, message))
        header, parts = infer_response(reply, outputs)
        return answer(request, header, parts)

    async def server_metadata(self, request: HttpRequest) -> HttpAnswer:
        return reply_json(request, message_json(await self.call("ServerMetadata", pb.ServerMetadataRequest(), request)))

    async def live(self, request: HttpRequest) -> HttpAnswer:
        reply = await self.call("ServerLive", pb.ServerLiveRequest(), request)
        return reply_json(request, {"live": reply.live}, 200 if reply.live else 503)

    async def ready(self, request: HttpRequest) -> HttpAnswer:
        reply = await self.call("ServerReady", pb.ServerReadyRequest(), request)
        return reply_json(request, {"ready": reply.ready}, 200 if reply.ready else 503)

    async def model_ready(self, request: HttpRequest) -> HttpAnswer:
        name, version = _model(request)
        reply = await self.call("ModelReady", pb.ModelReadyRequest(name=name, version=version), request)
        return reply_json(request, {"name": name, "ready": reply.ready}, 200 if reply.ready else 503)

    async def model_metadata(self, request: HttpRequest) -> HttpAnswer:
        name, version = _model(request)
        reply = await self.call("ModelMetadata", pb.ModelMetadataRequest(name=name, version=version), request)
        return reply_json(request, message_json(reply))

    async def model_config(self, request: HttpRequest) -> HttpAnswer:
        name, version = _model(request)
        reply = await self.call("ModelConfig", pb.ModelConfigRequest(name=name, version=version), request)
        return reply_json(request, message_json(reply.config))

    async def statistics(self, request: HttpRequest) -> HttpAnswer:
        name, version = _model(request)
        reply = await self.call("ModelStatistics", pb.ModelStatisticsRequest(name=name, version=version), request)
        return reply_json(request, message_json(reply))

    async def repository_index(self, request: HttpRequest) -> HttpAnswer:
        doc = await self.json_body(request, {"repository_name": str, "ready": bool})
        reply = await self.call("RepositoryIndex", pb.RepositoryIndexRequest(**doc), request)
        return reply_json(request, [message_json(entry) for entry in reply.models])

    async def load(self, request: HttpRequest) -> HttpAnswer:
        message = pb.RepositoryModelLoadRequest(model_name=request.match_info["model"])
        await self._repository_parameters(request, message)
        await self.call("RepositoryModelLoad", message, request)
        return reply_json(request, {})

    async def unload(self, request: HttpRequest) -> HttpAnswer:
        message = pb.RepositoryModelUnloadRequest(model_name=request.match_info["model"])
        await self._repository_parameters(request, message)
        await self.call("RepositoryModelUnload", message, request)
        return reply_json(request, {})

    async def _repository_parameters(self, request: HttpRequest, message: Any) -> None:
        """The body's ``parameters``; a ``file:<path>`` one is the file's bytes in base64, as Triton's HTTP API
        (and tritonclient.http's ``load_model(files=...)``) sends them."""
        doc = await self.json_body(request, {"parameters": dict})
        for key, value in doc.get("parameters", {}).items():
            param = message.parameters[key]
            if key.startswith("file:") and isinstance(value, str):
                try:
                    param.bytes_param = base64.b64decode(value, validate=True)
                except binascii.Error:
                    raise InvalidArgument(f"repository parameter {key!r} must be the file's bytes in base64") from None
            elif isinstance(value, bool):
                param.bool_param = value
            elif isinstance(value, int) and -(2**63) <= value < 2**63:
                param.int64_param = value
            elif isinstance(value, str):
                param.string_param = value
            else:
                raise InvalidArgument(f"repository parameter {key!r} must be a bool, an int64 or a string")

    async def trace_setting(self, request: HttpRequest) -> HttpAnswer:
        message = pb.TraceSettingRequest(model_name=request.match_info.get("model", ""))
        if request.method == "POST":
            doc = await self.json_body(request, None)
            if not doc:
                raise InvalidArgument('the body must be a JSON object of settings to change, e.g. {"trace_rate": "10"}')
            for key, value in doc.items():
                values = [] if value is None else value if isinstance(value, list) else [value]
                if not all(isinstance(v, str) for v in values):
                    raise InvalidArgument(f"trace setting {key!r} must be a string, a list of strings or null")
                message.settings[key].value.extend(values)
        reply = await self.call("TraceSetting", message, request)
        settings = {
            key: list(v.value) if key == "trace_level" or len(v.value) != 1 else v.value[0]
            for key, v in reply.settings.items()
        }
        return reply_json(request, settings)

    async def outcomes(self, request: HttpRequest) -> HttpAnswer:
        doc = await self.json_body(request, {"outcomes": list})
        if "outcomes" not in doc:
            raise InvalidArgument("the body needs 'outcomes', a list")
        message = fpb.ReportOutcomesRequest()
        for i, item in enumerate(doc["outcomes"]):
            if not isinstance(item, dict):
                raise InvalidArgument(f"outcomes[{i}] must be a JSON object")
            outcome = message.outcomes.add()
            for key, value in item.items():
                kind = _OUTCOME_FIELDS.get(key)
                if kind is None:
                    raise InvalidArgument(f"outcomes[{i}]: unknown field {key!r}; fields are {sorted(_OUTCOME_FIELDS)}")
                if not _is(value, kind) or (key == "row" and not 0 <= value < 2**32):
                    raise InvalidArgument(f"outcomes[{i}]: {key!r} must be {_OUTCOME_KINDS[key]}, got {value!r}")
                setattr(outcome, key, value)
            if sum(k in item for k in ("label", "target", "class_label")) > 1:
                raise InvalidArgument(f"outcomes[{i}]: give one of 'label', 'target' and 'class_label'")
        return reply_json(request, message_json(await self.call(OUTCOMES, message, request)))

    async def openapi(self, request: HttpRequest) -> HttpAnswer:
        return HttpAnswer(200, OPENAPI.read_bytes(), "application/yaml")

    # -- bodies and deadlines

    async def body(self, request: HttpRequest) -> bytes:
        """The request's body, decompressed: 415 for a content type or encoding it cannot be, 413 past the limit
        (the protocol refuses a body declared over it before reading it, and bounds the time it takes to arrive)."""
        headers = request.headers
        mime = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if mime not in JSON_TYPES and not mime.endswith("+json"):
            raise RestError(415, f"content type {mime!r} is not read here; send application/json")
        encoding = headers.get("content-encoding")
        if encoding is None:
            body = request.body
        else:
            encoding = encoding.strip().lower()
            if encoding not in ("identity", "gzip", "deflate"):
                raise RestError(415, f"content encoding {encoding!r} is not read here; gzip and deflate are")
            body = request.body if encoding == "identity" else self._decompress(request.body, encoding)
        if len(body) > self.limits.max_body_bytes:
            raise RestError(413, f"the body is over the limit of {self.limits.max_body_bytes} bytes")
        return body

    def _decompress(self, body: bytes, encoding: str) -> bytes:
        """gzip, or deflate (zlib's format, or raw deflate as some clients send it), stopped one byte past the
        limit so a small bomb cannot make the server hold its gigabytes."""
        wbits = 31 if encoding == "gzip" else 15 if body[:1] and body[0] & 0x0F == 8 else -15
        decompressor = zlib.decompressobj(wbits)
        try:
            out = decompressor.decompress(body, self.limits.max_body_bytes + 1)
        except zlib.error as err:
            raise InvalidArgument(f"the body cannot be read: it is not valid {encoding} ({err})") from None
        if len(out) > self.limits.max_body_bytes:
            raise RestError(413, f"the body is over the limit of {self.limits.max_body_bytes} bytes")
        if not decompressor.eof:
            raise InvalidArgument(f"the body cannot be read: its {encoding} stream is cut short")
        return out

    async def json_body(self, request: HttpRequest, fields: dict[str, type] | None) -> dict[str, Any]:
        """A small JSON object body (empty: ``{}``); ``fields`` names the keys it may have and their types."""
        body = await self.body(request)
        if not body.strip():
            return {}
        doc = parse_json(body, "the body")
        if not isinstance(doc, dict):
            raise InvalidArgument("the body must be a JSON object")
        if fields is not None:
            for key, value in doc.items():
                kind = fields.get(key)
                if kind is None:
                    raise InvalidArgument(f"unknown field {key!r}; fields are {sorted(fields)}")
                if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
                    raise InvalidArgument(f"field {key!r} must be a {kind.__name__}")
        return doc

    def deadline(self, request: HttpRequest, message: pb.ModelInferRequest | None = None) -> float | None:
        """The call's deadline on the monotonic clock: the earliest its headers or ``timeout`` parameter set."""
        timeouts = []
        headers = request.headers
        for header, name in (("ferry-timeout", "Ferry-Timeout"), ("grpc-timeout", "grpc-timeout")):
            value = headers.get(header)
            if value is not None:
                timeouts.append(parse_timeout(value, name))
        if message is not None and "timeout" in message.parameters:
            param = message.parameters["timeout"]
            kind = param.WhichOneof("parameter_choice")
            if kind in ("int64_param", "uint64_param") and getattr(param, kind) > 0:
                timeouts.append(getattr(param, kind) / 1e6)
        return time.monotonic() + min(timeouts) if timeouts else None


_OUTCOME_FIELDS: dict[str, type] = {
    "request_id": str,
    "model_name": str,
    "label": int,
    "target": float,
    "class_label": str,
    "row": int,
}
_OUTCOME_KINDS = {"request_id": "a string", "model_name": "a string", "label": "an int64", "target": "a number",
                  "class_label": "a string", "row": "a uint32"}  # fmt: skip


def _is(value: Any, kind: type) -> bool:
    """A JSON value of ``kind``, strictly: no bools as numbers; ints count as floats; int64 range for ints."""
    if isinstance(value, bool):
        return kind is bool
    if kind is float:
        return isinstance(value, int | float)
    if kind is int:
        return isinstance(value, int) and -(2**63) <= value < 2**63
    return isinstance(value, kind)


async def _until(call: Awaitable[Any], deadline: float, path: str) -> Any:
    """``call``'s result, or 504 once ``deadline`` (monotonic) passes, with the call cancelled. A task of its own:
    the endpoint may run outside one (stepped in place by the HTTP protocol), where ``asyncio.timeout`` cannot."""
    task = asyncio.ensure_future(call)
    try:
        done, _ = await asyncio.wait((task,), timeout=max(0.0, deadline - time.monotonic()))
    finally:
        if not task.done():  # the deadline passed, or the caller was cancelled
            task.cancel()
    if not done:
        with contextlib.suppress(asyncio.CancelledError):
            await task  # gives back what the call holds before the answer goes
        raise RestError.of(grpc.StatusCode.DEADLINE_EXCEEDED, f"{path}: the deadline passed")
    return task.result()


def _model(request: HttpRequest) -> tuple[str, str]:
    info = request.match_info
    return info.get("model", ""), info.get("version", "")


__all__ = ["OPENAPI", "Lookup", "Method", "RestApi", "RestLimits", "Route"]

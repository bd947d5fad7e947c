"""The load generator over REST (``ferry loadtest --protocol http``): the same prepared ``ModelInferRequest``
bytes, sent to ``POST /v2/models/{model}[/versions/{v}]/infer`` as the Open Inference Protocol's JSON or with
Triton's binary tensor extension (``--http-data``), on keep-alive HTTP/1.1 connections (aiohttp's client); and
the server's side (metadata, config, statistics) read from the REST API as the gRPC stub would read it.

A request's body is made from its protobuf when it is sent (binary: a small JSON header and the raw bytes as they
are; JSON: the values as lists), so a stamped request stays unique and the REST path pays what a REST client
pays. An answer's status maps back to the gRPC status names the reports count.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import aiohttp
import grpc
import numpy as np
import orjson
from google.protobuf import json_format
from google.protobuf.message import Message

from ferry.client._proto import grpc_service_pb2 as pb
from ferry.client.tensors import DATATYPES, from_raw

HTTP_DATA = ("binary", "json")
MAX_CONNECTIONS = 512
"""Connections one worker process opens at most (HTTP/1.1 carries one request at a time on each): past it,
requests wait in the client for a connection, and that wait counts in their latency."""

STATUS_NAMES = {200: "OK", 400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
                404: "NOT_FOUND", 408: "DEADLINE_EXCEEDED", 409: "ABORTED", 413: "RESOURCE_EXHAUSTED",
                429: "RESOURCE_EXHAUSTED", 499: "CANCELLED", 500: "INTERNAL", 501: "UNIMPLEMENTED",
                503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}  # fmt: skip
"""HTTP status → the gRPC status name the reports count (the inverse of the server's table)."""


def status_name(status: int) -> str:
    return STATUS_NAMES.get(status, f"HTTP_{status}")


def infer_path(model: str, version: str) -> str:
    return f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"


def body_of(request: pb.ModelInferRequest, binary: bool) -> tuple[bytes, dict[str, str]]:
    """A ModelInferRequest as a REST body and its headers."""
    inputs: list[dict[str, Any]] = []
    parts: list[bytes] = []
    for tensor, raw in zip(request.inputs, request.raw_input_contents, strict=True):
        item: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        if binary:
            item["parameters"] = {"binary_data_size": len(raw)}
            parts.append(raw)
        else:
            array = from_raw(raw, DATATYPES[tensor.datatype], list(tensor.shape), tensor.name).reshape(-1)
            if tensor.datatype == "BYTES":
                item["data"] = [v.decode("utf-8", "replace") for v in array]
            else:
                item["data"] = array.astype(np.float32) if tensor.datatype == "FP16" else array
        inputs.append(item)
    doc: dict[str, Any] = {"inputs": inputs, "parameters": {"binary_data_output": binary}}
    if request.id:
        doc["id"] = request.id
    header = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    if not binary:
        return header, {"Content-Type": "application/json"}
    headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))}
    return b"".join((header, *parts)), headers


def base_url(target: str) -> str:
    return target if target.startswith(("http://", "https://")) else f"http://{target}"


class HttpClient:
    """``ferry.loadtest.generator.Client`` over REST: unary calls only (REST has no stream)."""

    def __init__(self, target: str, data: str = "binary") -> None:
        if data not in HTTP_DATA:
            raise ValueError(f"http data must be one of {HTTP_DATA}, got {data!r}")
        self.base = base_url(target)
        self.binary = data == "binary"
        self.session: aiohttp.ClientSession | None = None
        self._paths: dict[tuple[str, str], str] = {}

    def _session(self) -> aiohttp.ClientSession:
        if self.session is None:
            connector = aiohttp.TCPConnector(limit=MAX_CONNECTIONS, force_close=False, enable_cleanup_closed=True)
            self.session = aiohttp.ClientSession(self.base, connector=connector, auto_decompress=True)
        return self.session

    async def ready(self, timeout_s: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            try:
                async with self._session().get("/v2/health/ready", timeout=aiohttp.ClientTimeout(total=5)) as r:
                    if r.status == 200:
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass
            if loop.time() > deadline:
                raise TimeoutError(f"{self.base} is not ready after {timeout_s:g} s")
            await asyncio.sleep(0.1)

    async def unary(self, message: bytes, timeout_s: float, on_reply: Callable[[bytes], None] | None = None) -> str:
        request = pb.ModelInferRequest.FromString(message)
        key = (request.model_name, request.model_version)
        path = self._paths.get(key)
        if path is None:
            path = self._paths[key] = infer_path(*key)
        body, headers = body_of(request, self.binary)
        try:
            async with self._session().post(
                path, data=body, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout_s)
            ) as response:
                reply = await response.read()
                status = response.status
        except TimeoutError:
            return "DEADLINE_EXCEEDED"
        except aiohttp.ClientError:
            return "UNAVAILABLE"
        if status == 200 and on_reply is not None:
            on_reply(reply)
        return status_name(status)

    async def stream(self, on_reply: Callable[[bytes], None]) -> Any:
        raise ValueError("REST has no streaming inference: use --mode unary with --protocol http")

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()


class RestError(grpc.RpcError):
    """A failed REST call, read as the gRPC error the load generator's callers expect."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self._status = status
        self._message = message

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode[status_name(self._status)] if self._status in STATUS_NAMES else grpc.StatusCode.UNKNOWN

    def details(self) -> str:
        return self._message


class RestStub:
    """The three RPCs the load test reads about the server (``ModelMetadata``, ``ModelConfig``,
    ``ModelStatistics``), over REST, answering protobuf messages as a gRPC stub does."""

    def __init__(self, target: str) -> None:
        self.base = base_url(target)

    def _get(self, path: str, timeout: float) -> Any:
        try:
            with urllib.request.urlopen(self.base + path, timeout=timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as err:
            body = err.read()
            try:
                message = str(json.loads(body)["error"])
            except (ValueError, KeyError, TypeError):
                message = body.decode("utf-8", "replace")
            raise RestError(err.code, message) from None
        except OSError as err:
            raise RestError(503, f"cannot reach {self.base}: {err}") from None

    @staticmethod
    def _path(name: str, version: str, tail: str = "") -> str:
        return f"/v2/models/{name}" + (f"/versions/{version}" if version else "") + tail

    def _parse(self, doc: Any, message: Message) -> Any:
        return json_format.ParseDict(doc, message, ignore_unknown_fields=True)

    def ModelMetadata(self, request: pb.ModelMetadataRequest, timeout: float = 30) -> pb.ModelMetadataResponse:
        doc = self._get(self._path(request.name, request.version), timeout)
        return self._parse(doc, pb.ModelMetadataResponse())

    def ModelConfig(self, request: pb.ModelConfigRequest, timeout: float = 30) -> pb.ModelConfigResponse:
        doc = self._get(self._path(request.name, request.version, "/config"), timeout)
        return self._parse({"config": doc}, pb.ModelConfigResponse())

    def ModelStatistics(self, request: pb.ModelStatisticsRequest, timeout: float = 30) -> pb.ModelStatisticsResponse:
        doc = self._get(self._path(request.name, request.version, "/stats"), timeout)
        return self._parse(doc, pb.ModelStatisticsResponse())

    def close(self) -> None:
        return None


__all__ = ["HTTP_DATA", "HttpClient", "RestError", "RestStub", "body_of", "status_name"]

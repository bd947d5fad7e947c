"""Plain HTTP/1.1 calls for the REST tests (http.client: every header and byte as the test gives it), and a
protobuf inference request written as a REST body (binary tensor extension for raw contents, JSON for typed)."""

from __future__ import annotations

import http.client
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ferry.client._proto import grpc_service_pb2 as pb
from ferry.client.tensors import DATATYPES


@dataclass(frozen=True)
class Answer:
    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def error(self) -> str:
        doc = self.json()
        assert set(doc) == {"error"}, doc
        return str(doc["error"])


def call(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    timeout_s: float = 30,
) -> Answer:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        conn.request(method, path, body=body, headers=dict(headers or {}))
        response = conn.getresponse()
        return Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    finally:
        conn.close()


def post_json(port: int, path: str, doc: Any, headers: Mapping[str, str] | None = None) -> Answer:
    return call(port, "POST", path, json.dumps(doc).encode(), {"Content-Type": "application/json", **(headers or {})})


def infer_path(model: str, version: str = "") -> str:
    return f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"


def rest_body(request: pb.ModelInferRequest) -> tuple[str, bytes, dict[str, str]]:
    """``request`` as REST sends it: path, body and headers. Raw contents travel as binary tensor data, typed
    contents as JSON ``data`` (an input with both carries both, which REST refuses as gRPC does)."""
    raw = list(request.raw_input_contents)
    parts: list[bytes] = []
    inputs = []
    for i, tensor in enumerate(request.inputs):
        item: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        if i < len(raw):
            item["parameters"] = {"binary_data_size": len(raw[i])}
            parts.append(raw[i])
        if tensor.HasField("contents"):
            field = DATATYPES[tensor.datatype].contents_field
            assert field is not None
            item["data"] = [v.decode() if isinstance(v, bytes) else v for v in getattr(tensor.contents, field)]
        inputs.append(item)
    doc: dict[str, Any] = {"inputs": inputs}
    if request.id:
        doc["id"] = request.id
    if request.outputs:
        doc["outputs"] = [{"name": o.name} for o in request.outputs]
    header = json.dumps(doc).encode()
    headers = {"Content-Type": "application/octet-stream"}
    if parts:
        headers["Inference-Header-Content-Length"] = str(len(header))
    return infer_path(request.model_name, request.model_version), header + b"".join(parts), headers

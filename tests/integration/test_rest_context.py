"""What a servicer sees of a REST call (contract C1): the HTTP headers as metadata (lower-cased, ``authorization``
included), the peer, the deadline, ``abort``, and ``auth_context`` (empty without TLS; gRPC's keys under TLS with a
client certificate). Checked on the REST layer served by Ferry's HTTP/1.1 protocol on 127.0.0.1, plain and over
TLS, with a probe handler in the services table; and the headers reaching Ferry's own servicer: a W3C
``traceparent`` sent over REST continues the caller's trace as it does over gRPC."""

from __future__ import annotations

import asyncio
import json
import shutil
import ssl
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from ferry.client._proto import grpc_service_pb2 as pb
from ferry.server.api.http import HttpLimits, create_http_app
from ferry.server.observability.telemetry import Tracing
from ferry.server.transport.http1 import Http1Server
from tests.resthttp import call, post_json
from tests.serving import background_server

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"


@dataclass
class Probe:
    """A registered unary handler that records the context it was called with."""

    kind: int = 0
    seen: dict[str, Any] = field(default_factory=dict)
    abort_with: grpc.StatusCode | None = None

    async def behavior(self, request: Any, context: Any) -> Any:
        self.seen = {
            "metadata": dict(context.invocation_metadata()),
            "peer": context.peer(),
            "time_remaining": context.time_remaining(),
            "auth": context.auth_context(),
        }
        if self.abort_with is not None:
            await context.abort(self.abort_with, "refused by the probe")
        if isinstance(request, pb.ModelInferRequest):
            return pb.ModelInferResponse(model_name=request.model_name, model_version="1", id=request.id)
        return pb.ServerLiveResponse(live=True)


class ProbeServer:
    """The REST app on its own event loop thread, every method answered by ``probe``."""

    def __init__(self, probe: Probe, tls: ssl.SSLContext | None = None) -> None:
        self.probe = probe
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server: Http1Server | None = None
        self.port = asyncio.run_coroutine_threadsafe(self._start(tls), self.loop).result(30)

    async def _start(self, tls: ssl.SSLContext | None) -> int:
        limits = HttpLimits(max_connections=8)
        self.server = Http1Server(create_http_app(lambda: b"", lambda path: self.probe, limits), limits)
        await self.server.start("127.0.0.1", 0, ssl=tls)
        return self.server.port

    def close(self) -> None:
        assert self.server is not None
        asyncio.run_coroutine_threadsafe(self.server.stop(1.0), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def probe() -> Iterator[tuple[Probe, ProbeServer]]:
    p = Probe()
    server = ProbeServer(p)
    try:
        yield p, server
    finally:
        server.close()


def test_headers_peer_and_deadline(probe: tuple[Probe, ProbeServer]) -> None:
    p, server = probe
    headers = {"Authorization": "Bearer s3cret", "X-Tenant": "blue", "Ferry-Timeout": "20S"}
    answer = call(server.port, "GET", "/v2/health/live", headers=headers)
    assert (answer.status, answer.json()) == (200, {"live": True})
    seen = p.seen
    assert seen["metadata"]["authorization"] == "Bearer s3cret"
    assert seen["metadata"]["x-tenant"] == "blue"
    assert all(key == key.lower() for key in seen["metadata"])
    assert seen["peer"].startswith("ipv4:127.0.0.1:")
    assert int(seen["peer"].rsplit(":", 1)[1]) > 0
    assert seen["auth"] == {}
    assert seen["time_remaining"] is None  # health calls take no deadline; inference does (below)


def test_the_infer_deadline_reaches_the_handler(probe: tuple[Probe, ProbeServer]) -> None:
    p, server = probe
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}]}
    answer = post_json(server.port, "/v2/models/m/infer", body, {"grpc-timeout": "20S"})
    assert answer.json() == {"model_name": "m", "model_version": "1", "outputs": []}
    assert 0 < p.seen["time_remaining"] <= 20
    five_s = {**body, "parameters": {"timeout": 5_000_000}}  # µs
    post_json(server.port, "/v2/models/m/infer", five_s)
    assert 0 < p.seen["time_remaining"] <= 5
    post_json(server.port, "/v2/models/m/infer", five_s, {"Ferry-Timeout": "2S"})
    assert 0 < p.seen["time_remaining"] <= 2  # the earlier of the two


@pytest.mark.parametrize(
    ("code", "status"),
    [
        (grpc.StatusCode.UNAUTHENTICATED, 401),
        (grpc.StatusCode.PERMISSION_DENIED, 403),
        (grpc.StatusCode.UNAVAILABLE, 503),
    ],
)
def test_abort_is_the_mapped_status(probe: tuple[Probe, ProbeServer], code: grpc.StatusCode, status: int) -> None:
    p, server = probe
    p.abort_with = code
    answer = call(server.port, "GET", "/v2/health/live")
    assert (answer.status, answer.error) == (status, "refused by the probe")
    if status == 401:
        assert answer.headers["www-authenticate"] == "Bearer"
    if status == 503:
        assert answer.headers["retry-after"] == "1"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate (CN "alice", a DNS SAN), by openssl."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=test-ca", cwd=d)  # fmt: skip
    for name, subject, san in (("server", "/CN=127.0.0.1", "IP:127.0.0.1"), ("client", "/CN=alice", "DNS:alice.test")):
        (d / f"{name}.ext").write_text(f"subjectAltName={san}\n")
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", subject, cwd=d)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=d)  # fmt: skip
    return d


def test_auth_context_under_tls_with_a_client_certificate(pki: Path) -> None:
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki / "ca.pem"))
    server_tls.load_cert_chain(pki / "server.pem", pki / "server.key")
    server_tls.verify_mode = ssl.CERT_REQUIRED
    p = Probe()
    server = ProbeServer(p, server_tls)
    try:
        client_tls = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        client_tls.load_cert_chain(pki / "client.pem", pki / "client.key")
        url = f"https://127.0.0.1:{server.port}/v2/health/live"
        with urllib.request.urlopen(url, context=client_tls, timeout=30) as response:
            assert json.loads(response.read()) == {"live": True}
    finally:
        server.close()
    auth = p.seen["auth"]
    assert auth["transport_security_type"] == [b"ssl"]
    assert auth["x509_common_name"] == [b"alice"]
    assert auth["x509_subject_alternative_name"] == [b"alice.test"]
    assert auth["x509_pem_cert"][0].startswith(b"-----BEGIN CERTIFICATE-----")
    assert auth["x509_pem_cert"][0].strip() == (pki / "client.pem").read_bytes().strip()


def test_a_traceparent_over_rest_continues_the_callers_trace(example_repo: Path, tmp_path: Path) -> None:
    shutil.copytree(example_repo / "tiny", tmp_path / "tiny")
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with background_server(tmp_path, Tracing(provider)) as running:
        port = running.server.http_port
        assert port is not None
        body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 16], "data": [0.5] * 16}]}
        answer = post_json(port, "/v2/models/tiny/infer", body, {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"})
        assert answer.status == 200, answer.body
        deadline = time.monotonic() + 30
        while not (spans := [s for s in exporter.get_finished_spans() if s.name.endswith("/ModelInfer")]):
            assert time.monotonic() < deadline, "no span was recorded"
            time.sleep(0.05)
    (span,) = spans
    assert span.name == "inference.GRPCInferenceService/ModelInfer"
    assert format(span.context.trace_id, "032x") == TRACE_ID
    assert span.parent is not None and format(span.parent.span_id, "016x") == PARENT_ID

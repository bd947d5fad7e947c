"""TLS and mTLS on both gRPC transports and the HTTP port, through real servers and real clients: tritonclient,
grpcio, Ferry's SDK, perf_analyzer and curl; what a hostile or plaintext client gets; certificate reload under load.
Certificates are made at test time (tests/certs.py)."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc

from benchmarks import perf_analyzer as pa
from ferry.client import Client
from ferry.client._proto import grpc_service_pb2 as pb
from ferry.client._proto import grpc_service_pb2_grpc as pb_grpc
from ferry.client.errors import InvalidArgument, Unavailable
from ferry.server.app import FerryServer
from ferry.server.config import ServerConfig
from ferry.server.security.tls import CertificateReloader, TlsFiles
from tests.certs import PKI, Pair, make_pki, serial_of
from tests.integration.test_rpcs import request_for
from tests.serving import BackgroundServer, FerryProcess, background_server

TRANSPORTS = ("ferry", "grpcio")
X = np.arange(16, dtype=np.float32).reshape(1, 16) / 16
BOUND_S = 40.0  # the handshake timeout is 10 s; a busy machine gets the rest


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def repo(example_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tiny`` alone: every test here is about the wire, not the model."""
    root = tmp_path_factory.mktemp("repo")
    shutil.copytree(example_repo / "tiny", root / "tiny")
    return root


@dataclass
class Served:
    """A running server with TLS and what a client needs to reach it."""

    server: BackgroundServer
    transport: str
    mtls: bool
    pki: PKI

    @property
    def address(self) -> str:
        return self.server.address

    @property
    def https(self) -> str:
        return f"https://127.0.0.1:{self.server.server.http_port}"

    def credentials(self) -> grpc.ChannelCredentials:
        return client_credentials(self.pki, self.pki.client if self.mtls else None)

    def channel(self) -> grpc.Channel:
        return grpc.secure_channel(self.address, self.credentials())


def client_credentials(pki: PKI, client: Pair | None) -> grpc.ChannelCredentials:
    """Trusting the test CA; presenting ``client``'s certificate when given."""
    if client is None:
        return grpc.ssl_channel_credentials(pki.ca.read_bytes())
    return grpc.ssl_channel_credentials(pki.ca.read_bytes(), client.key.read_bytes(), client.cert.read_bytes())


@contextlib.contextmanager
def tls_server(repo: Path, pki: PKI, transport: str, mtls: bool, **overrides: Any) -> Iterator[Served]:
    settings: dict[str, Any] = {"transport": transport, "tls_cert": pki.server.cert, "tls_key": pki.server.key}
    if mtls:
        settings["tls_client_ca"] = pki.ca
    credentials = client_credentials(pki, pki.client if mtls else None)
    with background_server(repo, credentials=credentials, **settings, **overrides) as server:
        yield Served(server, transport, mtls, pki)


@pytest.fixture(scope="module", params=TRANSPORTS)
def tls(request: pytest.FixtureRequest, repo: Path, pki: PKI) -> Iterator[Served]:
    with tls_server(repo, pki, request.param, mtls=False) as served:
        yield served


@pytest.fixture(scope="module", params=TRANSPORTS)
def mtls(request: pytest.FixtureRequest, repo: Path, pki: PKI) -> Iterator[Served]:
    with tls_server(repo, pki, request.param, mtls=True) as served:
        yield served


def infer_request() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="tiny", id="tls")
    request.inputs.add(name="input", datatype="FP32", shape=[1, 16])
    request.raw_input_contents.append(X.tobytes())
    return request


def infer(channel: grpc.Channel, timeout: float = 30) -> np.ndarray:
    reply = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(infer_request(), timeout=timeout)
    return np.frombuffer(reply.raw_output_contents[0], dtype=np.float32).reshape(1, 4)


def successes(served: Served) -> int:
    with served.channel() as channel:
        reply = pb_grpc.GRPCInferenceServiceStub(channel).ModelStatistics(
            pb.ModelStatisticsRequest(name="tiny"), timeout=30
        )
    stats = reply.model_stats[0].inference_stats
    return int(stats.success.count + stats.fail.count)


# --- clients that infer over TLS ------------------------------------------------------------------------------


def tritonclient_infers(served: Served) -> None:
    pki = served.pki
    keys: dict[str, str] = {"root_certificates": str(pki.ca)}
    if served.mtls:
        keys |= {"private_key": str(pki.client.key), "certificate_chain": str(pki.client.cert)}
    client = tc.InferenceServerClient(served.address, ssl=True, **keys)
    try:
        x = tc.InferInput("input", [1, 16], "FP32")
        x.set_data_from_numpy(X)
        result = client.infer("tiny", [x])
        assert result.as_numpy("output").shape == (1, 4)
        assert client.is_server_ready()
    finally:
        client.close()


def test_tritonclient_infers_over_tls(tls: Served) -> None:
    tritonclient_infers(tls)


def test_tritonclient_infers_over_mtls(mtls: Served) -> None:
    tritonclient_infers(mtls)


def grpcio_infers(served: Served) -> None:
    with served.channel() as channel:
        unary = infer(channel)
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        replies = list(stub.ModelStreamInfer(iter([infer_request()] * 3), timeout=30))
    assert len(replies) == 3
    for reply in replies:
        assert not reply.error_message
        streamed = np.frombuffer(reply.infer_response.raw_output_contents[0], dtype=np.float32).reshape(1, 4)
        np.testing.assert_array_equal(streamed, unary)


def test_grpcio_secure_channel_infers_over_tls(tls: Served) -> None:
    grpcio_infers(tls)


def test_grpcio_secure_channel_infers_over_mtls(mtls: Served) -> None:
    grpcio_infers(mtls)


def sdk_infers(served: Served) -> None:
    pki = served.pki
    extra: dict[str, Any] = {}
    if served.mtls:
        extra = {"private_key": pki.client.key.read_bytes(), "certificate_chain": pki.client.cert.read_bytes()}
    with Client(served.address, tls=True, root_certificates=pki.ca.read_bytes(), timeout_s=30, **extra) as client:
        assert client.server_ready()
        out = client.infer("tiny", {"input": X})["output"]
    with served.channel() as channel:
        np.testing.assert_array_equal(out, infer(channel))


def test_ferry_sdk_infers_over_tls(tls: Served) -> None:
    sdk_infers(tls)


def test_ferry_sdk_infers_over_mtls(mtls: Served) -> None:
    sdk_infers(mtls)


def perf_analyzer_infers(served: Served) -> None:
    usable, why = pa.usable()
    if not usable:
        if os.environ.get("CI") == "true":
            pytest.fail(f"perf_analyzer must run in CI: {why}")
        pytest.skip(why)
    pki = served.pki
    flags = ["--ssl-grpc-use-ssl", "--ssl-grpc-root-certifications-file", str(pki.ca)]
    if served.mtls:
        flags += ["--ssl-grpc-private-key-file", str(pki.client.key)]
        flags += ["--ssl-grpc-certificate-chain-file", str(pki.client.cert)]
    before = successes(served)
    bounded = ["--max-trials", "3", "--stability-percentage", "1000", *flags]
    (step,) = pa.run(served.address, "tiny", [2], measurement_ms=300, extra=bounded, timeout_s=120)
    assert step.infer_per_s > 0
    assert successes(served) > before  # its calls reached the model


@pytest.mark.perf_analyzer
def test_perf_analyzer_infers_over_tls(tls: Served) -> None:
    perf_analyzer_infers(tls)


@pytest.mark.perf_analyzer
def test_perf_analyzer_infers_over_mtls(mtls: Served) -> None:
    perf_analyzer_infers(mtls)


# --- what is refused, and the server going on -----------------------------------------------------------------


def test_a_plaintext_client_fails_cleanly_and_the_server_keeps_serving(tls: Served) -> None:
    with grpc.insecure_channel(tls.address) as plain, pytest.raises(grpc.RpcError) as failed:
        infer(plain, timeout=10)
    assert failed.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    with tls.channel() as channel:
        assert infer(channel).shape == (1, 4)


def test_a_client_that_does_not_trust_the_server_fails(tls: Served) -> None:
    other = grpc.ssl_channel_credentials(tls.pki.self_signed.cert.read_bytes())  # not the server's CA
    with grpc.secure_channel(tls.address, other) as channel, pytest.raises(grpc.RpcError) as failed:
        infer(channel, timeout=10)
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("who", ["none", "self_signed", "other_client"])
def test_mtls_refuses_clients_without_a_certificate_from_its_ca(mtls: Served, who: str) -> None:
    before = successes(mtls)
    pki = mtls.pki
    credentials = client_credentials(pki, None if who == "none" else getattr(pki, who))
    with grpc.secure_channel(mtls.address, credentials) as channel, pytest.raises(grpc.RpcError) as failed:
        infer(channel, timeout=10)
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert successes(mtls) == before  # no handler ran: the model saw nothing
    with mtls.channel() as channel:
        assert infer(channel).shape == (1, 4)


def test_the_transport_gives_handlers_the_peer_certificate(repo: Path, pki: PKI) -> None:
    """Contract C1 on Ferry's transport: ``context.auth_context()`` as grpc.aio gives it (ssl, the client
    certificate's CN, SANs and PEM); empty without TLS."""

    def handler(request: bytes, context: Any) -> bytes:
        found = context.auth_context()
        return json.dumps({k: [v.decode() for v in vs] for k, vs in found.items()}).encode()

    method = grpc.unary_unary_rpc_method_handler(handler)
    generic = grpc.method_handlers_generic_handler("test.Peer", {"Auth": method})

    def ask(served: BackgroundServer, credentials: grpc.ChannelCredentials | None) -> dict[str, list[str]]:
        transport = served.server._transport
        assert transport is not None
        transport.services.add_generic_rpc_handlers([generic])
        channel_of = grpc.insecure_channel if credentials is None else grpc.secure_channel
        args = (served.address,) if credentials is None else (served.address, credentials)
        with channel_of(*args) as channel:  # type: ignore[operator]
            return dict(json.loads(channel.unary_unary("/test.Peer/Auth")(b"", timeout=30)))

    with tls_server(repo, pki, "ferry", mtls=True) as served:
        found = ask(served.server, served.credentials())
    assert found["transport_security_type"] == ["ssl"]
    assert found["x509_common_name"] == ["client.ferry.test"]
    assert found["x509_subject_alternative_name"] == ["spiffe://ferry.test/client"]
    assert found["x509_pem_cert"] == [pki.client.cert.read_text()]
    with background_server(repo) as plain:
        assert ask(plain, None) == {}

    # grpcio's own server, with the credentials Ferry gives it, reports the same properties
    reloader = CertificateReloader(TlsFiles(pki.server.cert, pki.server.key, pki.ca))
    reference = grpc.server(ThreadPoolExecutor(2))
    reference.add_generic_rpc_handlers([generic])
    port = reference.add_secure_port("127.0.0.1:0", reloader.grpc_credentials())
    reference.start()
    try:
        with grpc.secure_channel(f"127.0.0.1:{port}", served.credentials()) as channel:
            grpcio = json.loads(channel.unary_unary("/test.Peer/Auth")(b"", timeout=30))
    finally:
        reference.stop(None)
    assert {key: grpcio.get(key) for key in found} == found
    assert set(grpcio) - set(found) <= {"ssl_negotiated_key_exchange_group"}  # OpenSSL's name, not in Python 3.11


# --- the HTTP port ----------------------------------------------------------------------------------------------


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    return subprocess.run(["curl", "-sS", "--max-time", "30", *args], capture_output=True, text=True, timeout=60)


def curl_reaches_metrics_and_health(served: Served) -> None:
    pki = served.pki
    client = ["--cert", str(pki.client.cert), "--key", str(pki.client.key)] if served.mtls else []
    ready = curl(
        "--cacert", str(pki.ca), *client, "-o", "/dev/null", "-w", "%{http_code}", f"{served.https}/v2/health/ready"
    )
    assert ready.returncode == 0, ready.stderr
    assert ready.stdout == "200"
    metrics = curl("--cacert", str(pki.ca), *client, f"{served.https}/metrics")
    assert metrics.returncode == 0, metrics.stderr
    assert "ferry_" in metrics.stdout
    plain = curl("-o", "/dev/null", f"http://127.0.0.1:{served.server.server.http_port}/v2/health/live")
    assert plain.returncode != 0  # no plaintext answer from a TLS port
    if served.mtls:
        anonymous = curl("--cacert", str(pki.ca), f"{served.https}/v2/health/live")
        assert anonymous.returncode != 0
        wrong = curl("--cacert", str(pki.ca), "--cert", str(pki.other_client.cert), "--key", str(pki.other_client.key),
                     f"{served.https}/v2/health/live")  # fmt: skip
        assert wrong.returncode != 0


def test_https_curl_reaches_metrics_and_health_over_tls(tls: Served) -> None:
    curl_reaches_metrics_and_health(tls)


def test_https_curl_reaches_metrics_and_health_over_mtls(mtls: Served) -> None:
    curl_reaches_metrics_and_health(mtls)


def _http_request(port: int, header: bytes = b"") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n" + header + b"Connection: close\r\n\r\n")
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
        return out


def test_http_port_refuses_oversized_headers_and_too_many_connections(
    repo: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with background_server(repo, http_max_connections=2) as served:
        port = served.server.http_port
        assert port is not None
        assert _http_request(port).startswith(b"HTTP/1.1 200")
        secret = b"s3cr3t-" + b"x" * (16 << 10)
        with caplog.at_level("DEBUG"):
            refused = _http_request(port, b"Authorization: Bearer " + secret + b"\r\n")
            many = b"".join(b"X-%d: y\r\n" % i for i in range(200))
            too_many = _http_request(port, many)
        for answer in (refused, too_many):
            assert answer.split(b"\r\n", 1)[0] in (b"HTTP/1.0 400 Bad Request", b"HTTP/1.1 400 Bad Request"), answer
        assert b"s3cr3t" not in refused
        assert not [r for r in caplog.records if r.levelno >= 30 or "s3cr3t" in r.getMessage()]
        assert _http_request(port).startswith(b"HTTP/1.1 200")
        held = []
        for _ in range(2):  # keep-alive connections, each answered once and held open
            sock = socket.create_connection(("127.0.0.1", port), timeout=30)
            sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
            held.append(sock)
        assert _http_request(port).startswith(b"HTTP/1.1 503")
        for sock in held:
            sock.close()
        deadline = time.monotonic() + BOUND_S
        while not (answer := _http_request(port)).startswith(b"HTTP/1.1 200") and time.monotonic() < deadline:
            time.sleep(0.1)  # the server sees the closes on its next turns
        assert answer.startswith(b"HTTP/1.1 200")


# --- hostile handshakes -----------------------------------------------------------------------------------------


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes ``sock`` (EOF or reset) within ``seconds``, whatever it sends first."""
    sock.settimeout(seconds)
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            if not sock.recv(65536):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    return False


def _client_hello() -> bytes:
    """The first bytes a real TLS client sends (its ClientHello), captured from a handshake with no server."""
    context = ssl.create_default_context()
    context.set_alpn_protocols(["h2"])
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def hostile_handshakes(port: int, bystander: Callable[[], None]) -> None:
    """Garbage, a silent connection, half a ClientHello and a ClientHello never followed up, on ``port``: each is
    closed within the bound while ``bystander`` is served, before and after."""
    hello = _client_hello()
    garbage = socket.create_connection(("127.0.0.1", port), timeout=30)
    garbage.sendall(b"\x16\x03\x01\x00\x10" + os.urandom(16) + b"GET / HTTP/1.1\r\n\r\n" * 4)
    silent = socket.create_connection(("127.0.0.1", port), timeout=30)  # connects, never says a word
    half = socket.create_connection(("127.0.0.1", port), timeout=30)
    half.sendall(hello[: len(hello) // 2])  # a ClientHello that never completes
    stalled = socket.create_connection(("127.0.0.1", port), timeout=30)
    stalled.sendall(hello)  # a whole ClientHello, then nothing: the server's reply is never answered
    try:
        for _ in range(3):
            bystander()  # served while they hang
        started = time.monotonic()
        assert _closed_within(garbage, BOUND_S), "a garbage handshake was not closed"
        for sock in (silent, half, stalled):
            assert _closed_within(sock, max(1.0, BOUND_S - (time.monotonic() - started))), "a stalled handshake"
        bystander()
    finally:
        for sock in (garbage, silent, half, stalled):
            sock.close()


def test_garbage_and_half_open_handshakes_are_closed_while_others_are_served(tls: Served) -> None:
    def bystander() -> None:
        with tls.channel() as channel:
            assert infer(channel).shape == (1, 4)

    hostile_handshakes(int(tls.address.rsplit(":", 1)[1]), bystander)


def test_the_https_port_closes_garbage_and_half_open_handshakes(tls: Served) -> None:
    port = tls.server.server.http_port
    assert port is not None
    context = ssl.create_default_context(cafile=tls.pki.ca)

    def bystander() -> None:
        connection = http.client.HTTPSConnection("127.0.0.1", port, timeout=30, context=context)
        try:
            connection.request("GET", "/v2/health/live")
            assert connection.getresponse().status == 200
        finally:
            connection.close()

    hostile_handshakes(port, bystander)


def test_ferry_transport_closes_a_tls_connection_without_alpn_h2(repo: Path, pki: PKI) -> None:
    with tls_server(repo, pki, "ferry", mtls=False) as served:
        host, port = served.address.rsplit(":", 1)
        for offer in (["http/1.1"], None):
            context = ssl.create_default_context(cafile=pki.ca)
            if offer:
                context.set_alpn_protocols(offer)
            raw = socket.create_connection((host, int(port)), timeout=30)
            with context.wrap_socket(raw, server_hostname="localhost") as sock:
                sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
                assert _closed_within(sock, BOUND_S)
        with served.channel() as channel:
            assert infer(channel).shape == (1, 4)


# --- configuration ----------------------------------------------------------------------------------------------


def test_a_server_with_an_unloadable_certificate_does_not_start(repo: Path, pki: PKI, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    cases = [
        {"tls_cert": pki.server.cert, "tls_key": pki.client.key},  # a key that is not the certificate's
        {"tls_cert": garbage, "tls_key": pki.server.key},
        {"tls_cert": tmp_path / "missing.pem", "tls_key": pki.server.key},
        {"tls_cert": pki.server.cert, "tls_key": pki.server.key, "tls_client_ca": garbage},
    ]
    for case in cases:
        with pytest.raises(InvalidArgument, match="TLS"):
            FerryServer(ServerConfig.build(model_repository=repo, **case))
    with pytest.raises(InvalidArgument, match="tls_key"):
        ServerConfig.build(model_repository=repo, tls_cert=pki.server.cert)
    with pytest.raises(InvalidArgument, match="tls_client_ca"):
        ServerConfig.build(model_repository=repo, tls_client_ca=pki.ca)


def test_ferry_serve_with_a_bad_key_exits_with_the_reason(repo: Path, pki: PKI) -> None:
    command = [sys.executable, "-m", "ferry.server", "serve", "--model-repository", str(repo), "--grpc-port", "0"]
    command += ["--http-port", "-1", "--tls-cert", str(pki.server.cert), "--tls-key", str(pki.client.key)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert f"is not the key of the certificate {pki.server.cert}" in proc.stderr
    assert "ferry ready" not in proc.stdout


def test_one_warning_when_listening_beyond_loopback_without_tls(repo: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="ferry.server.app"), background_server(repo, host="0.0.0.0"):
        pass
    assert [r.getMessage() for r in caplog.records if "without TLS" in r.getMessage()] == [
        "listening on 0.0.0.0 without TLS: calls and models travel in plaintext"
    ]
    caplog.clear()
    with caplog.at_level("WARNING", logger="ferry.server.app"), background_server(repo):
        pass
    assert not [r for r in caplog.records if "without TLS" in r.getMessage()]


# --- reload -------------------------------------------------------------------------------------------------------


def served_serial(address: str, pki: PKI, alpn: str = "h2") -> int:
    """The serial of the certificate a new connection is served."""
    host, port = address.rsplit(":", 1)
    context = ssl.create_default_context(cafile=pki.ca)
    context.set_alpn_protocols([alpn])
    context.load_cert_chain(pki.client.cert, pki.client.key)
    raw = socket.create_connection((host, int(port)), timeout=30)
    with context.wrap_socket(raw, server_hostname="localhost") as sock:
        der = sock.getpeercert(binary_form=True)
    assert der is not None
    return serial_of(der)


def install(pair: Pair, live: Path) -> None:
    """Replace the live files as deploy tools do: write aside, then rename over (each file atomically)."""
    for source, name in ((pair.cert, "server.pem"), (pair.key, "server.key")):
        shutil.copy(source, live / f".{name}.new")
        os.replace(live / f".{name}.new", live / name)


class Load:
    """Calls on one long-lived channel and on a new channel each time, from two threads, until stopped."""

    def __init__(self, address: str, credentials: grpc.ChannelCredentials) -> None:
        self.address, self.credentials = address, credentials
        self.ok = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._kept), threading.Thread(target=self._fresh)]

    def _kept(self) -> None:
        with grpc.secure_channel(self.address, self.credentials) as channel:
            while not self._stop.is_set():
                self._one(channel)

    def _fresh(self) -> None:
        while not self._stop.is_set():
            with grpc.secure_channel(self.address, self.credentials) as channel:
                self._one(channel)

    def _one(self, channel: grpc.Channel) -> None:
        try:
            infer(channel)
            self.ok += 1
        except grpc.RpcError as err:
            self.failures.append(f"{err.code()}: {err.details()}")

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)


def wait_for(condition: Any, what: str, timeout_s: float = BOUND_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_reload_under_load_serves_the_new_pair_and_keeps_it_after_a_bad_reload(
    repo: Path, pki: PKI, tmp_path: Path, transport: str
) -> None:
    live = tmp_path / "live"
    live.mkdir()
    install(pki.server, live)
    credentials = client_credentials(pki, pki.client)
    args = ["--transport", transport, "--tls-cert", str(live / "server.pem"), "--tls-key", str(live / "server.key")]
    args += ["--tls-client-ca", str(pki.ca), "--tls-reload-check-s", "3600"]  # SIGHUP only, until the last step
    server = FerryProcess(repo, *args, log=tmp_path / "server.log", credentials=credentials)
    server.start()
    try:
        assert served_serial(server.address, pki) == pki.server.serial
        first = pki.issue_server(f"first-{transport}")
        with Load(server.address, credentials) as load:
            wait_for(lambda: load.ok >= 5, "calls before the reload")
            install(first, live)
            os.kill(server.pid, signal.SIGHUP)
            wait_for(lambda: served_serial(server.address, pki) == first.serial, "the new certificate")
            done = load.ok
            wait_for(lambda: load.ok >= done + 5, "calls after the reload")

            log = tmp_path / "server.log"
            (live / "server.key").write_bytes(pki.client.key.read_bytes())  # a key that is not the certificate's
            os.kill(server.pid, signal.SIGHUP)
            wait_for(lambda: "KEY_VALUES_MISMATCH" in log.read_text(), "the mismatched key's reload to fail")
            (live / "server.pem").write_text("-----BEGIN CERTIFICATE-----\ngarbage\n")
            os.kill(server.pid, signal.SIGHUP)
            wait_for(lambda: "holds no certificate" in log.read_text(), "the garbage certificate's reload to fail")
            done = load.ok
            wait_for(lambda: load.ok >= done + 5, "calls after the failed reloads")
            assert served_serial(server.address, pki) == first.serial  # the old pair stayed
        assert not load.failures, load.failures[:5]
        assert log.read_text().count("TLS reload (SIGHUP) failed, keeping the certificate in use") == 2
    finally:
        server.stop()


def test_changed_files_are_picked_up_without_a_signal(repo: Path, pki: PKI, tmp_path: Path) -> None:
    live = tmp_path / "live"
    live.mkdir()
    install(pki.server, live)
    with background_server(
        repo,
        credentials=client_credentials(pki, None),
        tls_cert=live / "server.pem",
        tls_key=live / "server.key",
        tls_reload_check_s=0.2,
    ) as served:
        with grpc.secure_channel(served.address, client_credentials(pki, None)) as kept:
            assert infer(kept).shape == (1, 4)
            fresh = pki.issue_server("by-mtime")
            install(fresh, live)
            wait_for(lambda: served_serial(served.address, pki) == fresh.serial, "the changed files")
            assert infer(kept).shape == (1, 4)  # the connection made before goes on
        https = f"127.0.0.1:{served.server.http_port}"
        assert served_serial(https, pki, "http/1.1") == fresh.serial  # the HTTP port's new connections too
        assert served.server.tls is not None and served.server.tls.generation == 2
        with pytest.raises(Unavailable), Client(served.address, retries=0, timeout_s=5) as plain:
            plain.server_live()  # and a plaintext client still gets nothing


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_client_certificate_is_an_identity_of_the_auth_file_on_grpc_and_rest(
    repo: Path, pki: PKI, tmp_path: Path, transport: str
) -> None:
    """mTLS and --auth-config together: the verified client certificate's CN names an identity, with its scopes and
    models, on the gRPC port (both transports) and on the HTTPS port; another identity's CN gets nothing more."""
    auth = tmp_path / "auth.json"
    identity = {"name": "cert-client", "certificate": {"cn": "client.ferry.test"}, "scopes": ["metadata", "health"]}
    auth.write_text(json.dumps({"identities": [{**identity, "models": ["tiny"]}]}))
    with tls_server(repo, pki, transport, mtls=True, auth_config_path=auth) as served, served.channel() as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ModelMetadata(pb.ModelMetadataRequest(name="tiny"), timeout=30).name == "tiny"
        with pytest.raises(grpc.RpcError) as hidden:
            stub.ModelMetadata(pb.ModelMetadataRequest(name="mlp"), timeout=30)
        assert hidden.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as denied:
            stub.ModelInfer(request_for("tiny", {"input": np.ones((1, 16), np.float32)}), timeout=30)
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        context = ssl.create_default_context(cafile=str(pki.ca))
        context.load_cert_chain(pki.client.cert, pki.client.key)

        def https(path: str) -> int:
            try:
                with urllib.request.urlopen(served.https + path, context=context, timeout=30) as answer:
                    return int(answer.status)
            except urllib.error.HTTPError as err:
                return err.code

        assert (https("/v2/models/tiny"), https("/v2/models/mlp"), https("/v2/models/tiny/config")) == (200, 404, 403)

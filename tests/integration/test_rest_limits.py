"""Slow and greedy HTTP clients cannot hold the REST port: slowloris headers, an idle connection and a body
trickled byte by byte are each cut off by their timeout while a bystander is served, and connections past the
cap are answered 503 and closed. 127.0.0.1 only; every loop is bounded."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from ferry.client.errors import InvalidArgument
from ferry.server.config import ServerConfig
from tests.resthttp import call
from tests.serving import BackgroundServer, background_server, ferry_serve

TIMEOUT_S = 2.0
"""The server's keep-alive (header) and body timeouts in this module."""

GIVE_UP_S = 60.0
"""How long a test keeps a slow client going before it calls the server's bound missing."""


@pytest.fixture(scope="module")
def port(example_repo: Path) -> Iterator[int]:
    with background_server(example_repo, http_keepalive_timeout_s=TIMEOUT_S, http_body_timeout_s=TIMEOUT_S) as running:
        assert running.server.http_port is not None
        yield running.server.http_port


def read_now(sock: socket.socket) -> tuple[bytes, bool]:
    """What the server has sent so far, and whether it has closed the connection."""
    sock.setblocking(False)
    data = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return data, True
            data += chunk
    except BlockingIOError:
        return data, False
    except ConnectionResetError:
        return data, True
    finally:
        sock.setblocking(True)


def trickle(sock: socket.socket, payload: bytes, bystander_port: int) -> bytes:
    """Send ``payload`` a byte at a time (10 a second), asking the bystander question between bytes, until the
    server closes the connection; returns what it answered. Fails if the payload runs out or GIVE_UP_S passes
    first."""
    started = time.monotonic()
    served = 0
    answer = b""
    for byte in payload:
        try:
            sock.sendall(bytes([byte]))
        except (BrokenPipeError, ConnectionResetError):
            break
        data, closed = read_now(sock)
        answer += data
        if closed:
            assert served > 0, "the bystander was never served while the slow client held its connection"
            return answer
        if call(bystander_port, "GET", "/v2/health/ready", timeout_s=30).status == 200:
            served += 1
        assert time.monotonic() - started < GIVE_UP_S, "the server never cut the slow client off"
        time.sleep(0.1)
    sock.settimeout(GIVE_UP_S)
    while chunk := sock.recv(65536):  # the server closed while a byte was in flight; read what it said
        answer += chunk
    return answer


def test_slowloris_headers_are_cut_off(port: int) -> None:
    headers = b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-Slow: " + b"a" * 4000
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        assert trickle(sock, headers, port) == b""  # closed without an answer: no request ever arrived


def test_an_idle_connection_is_closed(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.settimeout(GIVE_UP_S)
        assert sock.recv(1) == b""


def test_a_slow_keepalive_connection_is_closed_after_its_answer(port: int) -> None:
    request = b"GET /v2/health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200 ")
        assert trickle(sock, request[:-2] + b"X-Slow: " + b"b" * 4000, port) == b""


def test_a_trickled_body_is_answered_408(port: int) -> None:
    body = b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 16], "data": [' + b"0," * 2000
    head = f"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body) + 10}\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head.encode())
        answer = trickle(sock, body, port)
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:300]
    assert f'{{"error":"the body did not arrive within {TIMEOUT_S:g} s"}}'.encode() in answer


def test_connections_past_the_cap_get_503(example_repo: Path) -> None:
    cap = 4
    with background_server(example_repo, http_max_connections=cap) as running, contextlib.ExitStack() as stack:
        port = running.server.http_port
        assert port is not None
        held = [stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=30)) for _ in range(cap)]
        for sock in held:  # each admitted: it is answered
            sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
        with socket.create_connection(("127.0.0.1", port), timeout=30) as extra:
            refused = b""
            while chunk := extra.recv(65536):
                refused += chunk
        assert refused.startswith(b"HTTP/1.1 503 ")
        assert b"Retry-After: 1" in refused
        assert refused.endswith(b'{"error": "too many connections; try again"}')
        for sock in held:
            sock.close()
        deadline = time.monotonic() + GIVE_UP_S
        while True:  # the closed connections are given back: a new client is served
            try:
                if call(port, "GET", "/v2/health/live", timeout_s=30).status == 200:
                    break
            except (ConnectionError, OSError):
                pass
            assert time.monotonic() < deadline, "the cap was not given back"
            time.sleep(0.1)


@pytest.mark.parametrize(
    ("head", "answer"),
    [
        (b"X-Big: " + b"a" * 20000 + b"\r\n", b"LineTooLong"),
        (b"".join(b"X-%d: 1\r\n" % i for i in range(200)), b"BadHttpMessage"),
    ],
    ids=["a header past 16 KiB", "too many headers"],
)
def test_headers_past_the_limits_are_400(
    port: int, head: bytes, answer: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n" + head + b"\r\n")
        reply = b""
        while chunk := sock.recv(65536):  # answered, then closed
            reply += chunk
    assert reply.startswith(b"HTTP/1.0 400 ") and answer in reply, reply[:300]
    assert not [r for r in caplog.records if r.levelno >= 40], "a client's malformed request was logged as an error"
    assert call(port, "GET", "/v2/health/live").status == 200


def test_pipelined_requests_are_answered_in_order(port: int) -> None:
    count = 100
    requests = b"".join(
        b"GET /v2/models/%s/ready HTTP/1.1\r\nHost: x\r\n\r\n" % (b"tiny" if i % 2 else b"nope") for i in range(count)
    )
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(requests)
        reply = b""
        while reply.count(b"HTTP/1.1 ") < count:
            chunk = sock.recv(65536)
            assert chunk, "the connection closed before every pipelined request was answered"
            reply += chunk
    statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", reply)
    assert statuses == [b"200" if i % 2 else b"503" for i in range(count)]


def test_a_call_in_flight_finishes_when_the_server_stops(example_repo: Path, tmp_path: Path) -> None:
    """Drain, then close: a request queued in the batcher when shutdown begins is still answered."""
    shutil.copytree(example_repo / "tiny" / "1", tmp_path / "tiny" / "1")
    (tmp_path / "tiny" / "config.pbtxt").write_text(
        "max_batch_size: 8\ndynamic_batching { max_queue_delay_microseconds: 500000 preferred_batch_size: [ 8 ] }\n"
    )
    body = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 16], "data": [0.5] * 16}]})
    running = BackgroundServer(tmp_path, shutdown_grace_s=10.0)
    try:
        running.start()
        port = running.server.http_port
        assert port is not None
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(call, port, "POST", "/v2/models/tiny/infer", body.encode())
            deadline = time.monotonic() + GIVE_UP_S
            version = running.server.repository.get_model("tiny").versions[1]
            while version.queued == 0:  # in the batcher's queue, waiting for its batch to fill or its delay
                assert time.monotonic() < deadline
                time.sleep(0.02)
            running.call(running.server.stop(10.0))
            reply = answer.result(GIVE_UP_S)
    finally:
        running.stop()
    assert reply.status == 200, reply.body


@pytest.mark.parametrize(
    ("key", "value"),
    [("http_max_connections", 0), ("http_keepalive_timeout_s", 0.0), ("http_body_timeout_s", float("nan"))],
)
def test_the_http_limits_are_validated(tmp_path: Path, key: str, value: float) -> None:
    with pytest.raises(InvalidArgument, match=key):
        ServerConfig.build(model_repository=tmp_path, **{key: value})


def test_ferry_serve_takes_the_http_flags(example_repo: Path) -> None:
    """The flags reach the server: with --http-max-connections 1, a second connection is refused while the first
    is open."""
    args = ("--model-repository", str(example_repo), "--grpc-port", "0", "--http-port", "0", "--http-max-connections",
            "1", "--http-keepalive-timeout-s", "60", "--http-body-timeout-s", "60")  # fmt: skip
    with ferry_serve(*args) as (_, line):
        port = int(line.split(" http=127.0.0.1:")[1].split()[0])
        with socket.create_connection(("127.0.0.1", port), timeout=30) as first:
            first.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
            assert first.recv(65536).startswith(b"HTTP/1.1 200 ")
            with socket.create_connection(("127.0.0.1", port), timeout=30) as second:
                assert second.recv(65536).startswith(b"HTTP/1.1 503 ")

"""The HTTP/1.1 protocol's bounds on what one connection can make the server hold, on a real listener on 127.0.0.1
with a small app: pipelined requests past ``max_pipelined`` and answers the client does not read both stop the
server reading the connection (the client's sends back up), and everything queued is answered, in order, once the
client catches up. Request bodies sent chunked are bounded like declared ones."""

from __future__ import annotations

import asyncio
import re
import socket
import threading
from collections.abc import Iterator

import pytest

from ferry.server.api.http import HttpApp, HttpLimits
from ferry.server.api.rest_context import HttpAnswer, HttpRequest
from ferry.server.transport.http1 import Http1Server

BIG = b"x" * (1 << 20)
SEND_LIMIT = 256 * 1024 * 1024
"""What a test sends at most before it calls the server unbounded."""


class App:
    """``/hold`` waits for ``release``; ``/ok`` answers at once; ``/big`` answers a MiB; ``/echo`` its body's size."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.answered = 0

    async def hold(self, request: HttpRequest) -> HttpAnswer:
        await self.release.wait()
        return HttpAnswer(200, b"held")

    async def ok(self, request: HttpRequest) -> HttpAnswer:
        self.answered += 1
        return HttpAnswer(200, b"ok")

    async def big(self, request: HttpRequest) -> HttpAnswer:
        self.answered += 1
        return HttpAnswer(200, BIG, "application/octet-stream")

    async def echo(self, request: HttpRequest) -> HttpAnswer:
        return HttpAnswer(200, str(len(request.body)).encode())


class Serving:
    def __init__(self, limits: HttpLimits) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.app = App()
        self.server: Http1Server | None = None
        self.port = self.run(self._start(limits))

    def run(self, coro):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    async def _start(self, limits: HttpLimits) -> int:
        app = self.app
        routes = [("GET", "/hold", app.hold), ("GET", "/ok", app.ok), ("GET", "/big", app.big),
                  ("POST", "/echo", app.echo)]  # fmt: skip
        self.server = Http1Server(HttpApp(routes), limits)  # type: ignore[arg-type]
        await self.server.start("127.0.0.1", 0)
        return self.server.port

    def close(self) -> None:
        assert self.server is not None
        self.run(self.server.stop(1.0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def serving() -> Iterator[Serving]:
    running = Serving(HttpLimits(max_pipelined=8, max_body_bytes=1000))
    try:
        yield running
    finally:
        running.close()


def send_until_blocked(sock: socket.socket, chunk: bytes) -> int:
    """Send ``chunk`` again and again until the server stops taking it (a send blocks for 2 s); bytes sent."""
    sock.settimeout(2.0)
    sent = 0
    while sent < SEND_LIMIT:
        try:
            sock.sendall(chunk)
        except TimeoutError:
            return sent
        sent += len(chunk)
    pytest.fail(f"the server read {SEND_LIMIT} bytes of pipelined requests without answering them")


def answers(sock: socket.socket, count: int) -> list[bytes]:
    """The bodies of the next ``count`` answers (small ones)."""
    sock.settimeout(30)
    data = b""
    while data.count(b"HTTP/1.1 ") < count or not data.endswith((b"ok", b"held")):
        chunk = sock.recv(65536)
        assert chunk, "the connection closed before every pipelined request was answered"
        data += chunk
    return re.findall(rb"\r\n\r\n(ok|held)", data)


def test_pipelined_requests_past_the_limit_stop_the_reading(serving: Serving) -> None:
    request = b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection(("127.0.0.1", serving.port)) as sock:
        sock.sendall(b"GET /hold HTTP/1.1\r\nHost: x\r\n\r\n")
        sent = send_until_blocked(sock, request * 1000)  # the server holds its parsed requests and stops reading
        assert serving.app.answered == 0
        serving.loop.call_soon_threadsafe(serving.app.release.set)
        count = 1 + sent // len(request)
        assert answers(sock, count) == [b"held"] + [b"ok"] * (count - 1)


def test_answers_the_client_does_not_read_stop_the_reading(serving: Serving) -> None:
    request = b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection(("127.0.0.1", serving.port)) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        send_until_blocked(sock, request * 1000)
        answered = serving.app.answered
        assert answered < 200, f"{answered} MiB of answers made for a client that reads none"


def test_a_chunked_body_past_the_limit_is_413(serving: Serving) -> None:
    head = b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    with socket.create_connection(("127.0.0.1", serving.port), timeout=30) as sock:
        sock.sendall(head + b"200\r\n" + b"a" * 512 + b"\r\n" + b"200\r\n" + b"a" * 512 + b"\r\n0\r\n\r\n")
        reply = b""
        while chunk := sock.recv(65536):  # answered, then closed
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 413 "), reply[:200]
    assert b'{"error":"the body is over the limit of 1000 bytes"}' in reply
    with socket.create_connection(("127.0.0.1", serving.port), timeout=30) as sock:  # under the limit: read
        sock.sendall(head + b"200\r\n" + b"a" * 512 + b"\r\n0\r\n\r\n")
        assert sock.recv(65536).endswith(b"\r\n\r\n512")


def test_expect_100_continue(serving: Serving) -> None:
    head = b"POST /echo HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n"
    with socket.create_connection(("127.0.0.1", serving.port), timeout=30) as sock:
        sock.sendall(head % 600)
        assert sock.recv(65536) == b"HTTP/1.1 100 Continue\r\n\r\n"  # asked for the body: then it comes
        sock.sendall(b"a" * 600)
        assert sock.recv(65536).endswith(b"\r\n\r\n600")
    with socket.create_connection(("127.0.0.1", serving.port), timeout=30) as sock:
        sock.sendall(head % 5000)  # over the limit: refused before the body is asked for
        assert sock.recv(65536).startswith(b"HTTP/1.1 413 ")

"""HTTP/1.1 (RFC 9112) for the HTTP port: Ferry's own asyncio protocol, on the HTTP/2 transport's model.

Why: the REST API under aiohttp's server served 0.36 x the gRPC port's throughput on ``tiny`` at concurrency 16;
aiohttp's per-request machinery (a task, a ``Request`` and a ``Response`` object, ``finish_response``) was ~45% of
the event loop. Measured on this machine (a POST answered with 100 bytes, 16 keep-alive connections, uvloop): an
aiohttp application 8-9k req/s, aiohttp's low-level server 10-12k, this protocol with httptools' parser 31-39k, a
hand-written Python parser 33k. httptools (llhttp, the parser Node.js uses and aiohttp's C parser is built on)
costs nothing against hand-written code and brings a hardened parser: chunked bodies, request smuggling checks.

How a request runs: the parser's callbacks collect the request line, header fields and body; at the end of the
message the request is queued on its connection, and after the read, queued requests are answered in order. The
endpoint's coroutine is stepped once in place (in a copied context, as a gRPC call's): an answer ready at once is
written in the same turn, with no task; one that has to wait (a queued batch) is carried on by a task
(:class:`~ferry.server.transport.calls.Handler`, which gives back what it holds however it ends), and the
connection's next request waits for it (HTTP/1.1 answers in order).

The bounds (:class:`~ferry.server.api.http.HttpLimits`): a request line or header field past ``max_field_bytes``
and more than ``max_headers`` fields are 400 as the parser meets them; a body declared past ``max_body_bytes`` is
413 before it is read (one that arrives chunked, as it passes the limit); a header that is not complete within
``keepalive_timeout_s`` of the connection's start or its last answer closes the connection, a body not complete
within ``body_timeout_s`` of its header is 408; at most ``max_pipelined`` requests wait for their answers, and no
more is read from a connection while they do, or while the client does not read its answers (the transport's
write buffer is over its high-water mark); connections past ``max_connections`` are answered 503. An answer that
ends a connection before its request was read is followed by a half close, and what the client still sends is
dropped for ``linger_s`` so that it reads the answer rather than a reset.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections import deque
from email.utils import formatdate
from http import HTTPStatus
from typing import Any

import httptools
import orjson

from ferry.server.api.http import HttpApp, HttpLimits
from ferry.server.api.rest_context import HttpAnswer, HttpRequest
from ferry.server.transport.calls import Handler

log = logging.getLogger(__name__)

_REASONS = {status.value: status.phrase.encode() for status in HTTPStatus} | {499: b"Client Closed Request"}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
    b'Connection: close\r\nContent-Length: 44\r\n\r\n{"error": "too many connections; try again"}'
)
_HEAD_AT_ONCE = 64 * 1024
"""Answers up to this size go out as one write of head and body joined; larger ones as two buffers. Answers
waiting for the end of the loop's turn are written at once past it."""
_SLICE_BYTES = 16 * 1024
"""What the parser is fed at a time (a body under way: all of it that has come): a header's worth."""


class _Refused(Exception):
    """A request the protocol answers itself and then ends the connection: a malformed one (400, named by the
    kind of error only: the offending bytes may be an ``authorization`` value), one too large (413), one too slow
    (408)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def answer(self) -> bytes:
        if self.status == 400:  # as aiohttp answered a request its parser refused
            body = f"400 Bad Request: {self.message}\n".encode()
            content_type = b"text/plain; charset=utf-8"
            version = b"HTTP/1.0"
        else:
            body = orjson.dumps({"error": self.message})
            content_type = b"application/json"
            version = b"HTTP/1.1"
        return b"%s %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (
            version, self.status, _REASONS[self.status], content_type, len(body), body
        )  # fmt: skip


class _Date:
    """The ``Date`` field (RFC 9110, 6.6.1: a server with a clock sends one), made once a second."""

    __slots__ = ("field", "second")

    def __init__(self) -> None:
        self.second = -1
        self.field = b""

    def now(self) -> bytes:
        second = int(time.time())
        if second != self.second:
            self.second = second
            self.field = b"Date: " + formatdate(second, usegmt=True).encode() + b"\r\nServer: ferry\r\n"
        return self.field


_DATE = _Date()


class Http1Connection(asyncio.Protocol):
    """One client connection: parses requests and answers them in order (see the module's docstring)."""

    def __init__(self, server: Http1Server) -> None:
        self._server = server
        self._app = server.app
        self._limits = server.limits
        self._loop = server.loop
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._admitted = False
        # the request being parsed
        self._url = b""
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._body_bytes = 0
        self._line = 0  # bytes of the header line not yet complete
        self._in_head = False  # its request line has begun and its header is not complete
        self._in_body = False  # its header is complete and its body is not
        self._body_left = 0  # bytes of its body still to come, as its Content-Length declares
        self._unfed = bytearray()  # read and not yet parsed: requests wait for their answers
        self._continue = False  # it asked for "100 Continue" and has not had it
        # requests parsed and not yet answered: (request, keep-alive), or (None, False) for a refusal's answer
        self._queue: deque[tuple[HttpRequest | None, bool]] = deque()
        self._refusal = b""
        self._task: asyncio.Task[HttpAnswer] | None = None  # the call in flight, when it had to wait
        self._task_keep_alive = True
        self._since = 0.0  # when the wait for the next header (or this body) began
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._reading = True  # False: what the client sends is dropped (a refusal, an upgrade, the server stopping)
        self._read_paused = False
        self._write_paused = False
        self._eof = False
        self._stopping = False
        self._out: list[bytes] = []  # answers not yet written: written at the end of the loop's turn
        self._out_bytes = 0

    # -- asyncio's protocol

    def connection_made(self, transport: Any) -> None:  # uvloop's transports are not asyncio.Transport subclasses
        self._transport = transport
        server = self._server
        if len(server.connections) >= self._limits.max_connections:
            # answered at once; closed when the client closes, or after the linger: closing with its request
            # unread would reset the connection, and the client would lose the answer
            self._reading = False
            transport.write(_BUSY)
            self._linger()
            return
        self._admitted = True
        server.connections.add(self)
        self._since = self._loop.time()
        self._arm(self._since + self._limits.keepalive_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._admitted:
            self._server.connections.discard(self)
            self._server.changed()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._queue.clear()
        task = self._task
        if task is not None:  # the client went away: its call gives back what it holds
            self._task = None
            task.cancel()
        self._transport = None

    def data_received(self, data: bytes) -> None:
        if not self._reading:
            return
        if self._unfed:  # requests wait for their answers: read on only when they are answered
            self._unfed += data
            return
        self._feed(data)
        self._serve()

    def _feed(self, data: bytes) -> None:
        """Parse ``data``, a slice at a time while the requests parsed and not answered are under the limit; the
        rest waits in ``_unfed`` (and the connection is not read) until they are answered. A slice is one
        header's worth, or the body under way: a read full of small pipelined requests is not parsed at once."""
        view = memoryview(data)
        size = len(data)
        pos = 0
        parser = self._parser
        cap = self._limits.max_pipelined
        while pos < size:
            if len(self._queue) >= cap:
                self._unfed = bytearray(view[pos:])
                self._pause_reading()
                return
            step = max(_SLICE_BYTES, self._body_left) if self._in_body else _SLICE_BYTES
            piece = view[pos : pos + step] if pos or step < size else data
            pos += len(piece)
            began_in_head = self._in_head
            try:
                parser.feed_data(piece)
            except httptools.HttpParserUpgrade:  # a protocol switch Ferry does not make: answer, then close
                self._reading = False
                self._eof = True
                return
            except httptools.HttpParserCallbackError as err:
                cause = err.__context__
                self._refuse(cause if isinstance(cause, _Refused) else _Refused(400, "BadHttpMessage"))
                return
            except httptools.HttpParserError:
                self._refuse(_Refused(400, "BadHttpMessage"))
                return
            if self._in_head:
                self._check_line(bytes(piece), began_in_head)

    def eof_received(self) -> bool:
        self._eof = True  # what was read is still answered (and what waits unparsed, parsed)
        self._serve()
        return True  # the transport stays open for the answers still to write; _serve closes it

    def pause_writing(self) -> None:
        self._write_paused = True
        self._pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._serve()

    # -- httptools' callbacks

    def on_message_begin(self) -> None:
        self._in_head = True
        self._line = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self._limits.max_field_bytes:
            raise _Refused(400, "LineTooLong")

    def on_header(self, name: bytes, value: bytes) -> None:
        limits = self._limits
        if len(name) + len(value) > limits.max_field_bytes:
            raise _Refused(400, "LineTooLong")
        headers = self._headers
        if len(headers) >= limits.max_headers:
            raise _Refused(400, "BadHttpMessage")
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._in_body = True
        limits = self._limits
        length = self._headers.get("content-length")
        if length is not None and int(length) > limits.max_body_bytes:  # the parser has checked it is a number
            raise _Refused(413, f"the body is {int(length)} bytes; the limit is {limits.max_body_bytes}")
        self._body_left = int(length) if length is not None else 0
        self._since = self._loop.time()
        self._arm(self._since + limits.body_timeout_s)
        if self._headers.get("expect", "").lower() == "100-continue":
            self._continue = True
            self._send_continue()

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        self._body_left -= len(body)
        if self._body_bytes > self._limits.max_body_bytes:
            raise _Refused(413, f"the body is over the limit of {self._limits.max_body_bytes} bytes")
        self._body.append(body)

    def on_message_complete(self) -> None:
        parser = self._parser
        url = self._url
        if not url.startswith(b"/"):  # absolute form (a proxy's): its path
            url = httptools.parse_url(url).path or b"/"
        path = url.split(b"?", 1)[0].decode("latin-1")
        parts = self._body
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        request = HttpRequest(parser.get_method().decode(), path, self._headers, body, self._transport)
        self._queue.append((request, parser.should_keep_alive()))
        self._url = b""
        self._headers = {}
        self._body = []
        self._body_bytes = 0
        self._in_body = self._continue = False
        if len(self._queue) >= self._limits.max_pipelined:
            self._pause_reading()

    # -- answering

    def _serve(self, answered: bool = False) -> None:
        """Answer the queued requests in order, each in this turn when it can be; stops at one that has to wait
        (its task carries on, and calls this again when done) or while the client does not read its answers."""
        queue = self._queue
        while True:
            while queue and self._task is None and not self._write_paused:
                request, keep_alive = queue.popleft()
                if request is None:
                    self._finish_refused()
                    return
                coro = self._app.resolve(request)(request)
                context = contextvars.copy_context()
                try:
                    waiting = context.run(coro.send, None)
                except StopIteration as done:
                    if not self._write(done.value, keep_alive):
                        return
                    answered = True
                    continue
                task: asyncio.Task[HttpAnswer] = self._loop.create_task(Handler(coro, waiting), context=context)  # type: ignore[arg-type]
                self._task = task
                self._task_keep_alive = keep_alive
                task.add_done_callback(self._answered)
                return
            if self._transport is None or self._task is not None or queue or self._write_paused:
                return
            if not self._unfed or not self._reading:
                break
            unfed, self._unfed = bytes(self._unfed), bytearray()  # parse what waited, then answer it
            self._feed(unfed)
        transport = self._transport
        if self._eof or self._stopping:
            transport.close()
            return
        if self._continue:  # a body waits for our "100 Continue" until the answers ahead of it are out
            self._send_continue()
        if self._read_paused and self._reading:
            self._read_paused = False
            transport.resume_reading()
        if answered and not self._in_body:  # idle: the next header is due within the keep-alive timeout of this answer
            self._since = self._loop.time()
            self._arm(self._since + self._limits.keepalive_timeout_s)

    def _answered(self, task: asyncio.Task[HttpAnswer]) -> None:
        if task is not self._task:  # the connection was lost meanwhile
            return
        self._task = None
        if task.cancelled():
            self._close()
            return
        error = task.exception()
        if error is not None:  # json_errors answers every Exception: this is a BaseException
            log.error("an HTTP call ended with %r", error)
            self._close()
            return
        if self._write(task.result(), self._task_keep_alive):
            self._serve(answered=True)

    def _write(self, answer: HttpAnswer, keep_alive: bool) -> bool:
        """Write ``answer``; False when the connection ends with it."""
        transport = self._transport
        if transport is None:
            return False
        body = answer.body
        ending = answer.close or not keep_alive or self._stopping
        head = b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s" % (
            answer.status, _REASONS.get(answer.status, b"Unknown"), answer.content_type.encode(), len(body), _DATE.now()
        )  # fmt: skip
        if answer.headers:
            head += "".join(f"{name}: {value}\r\n" for name, value in answer.headers.items()).encode("latin-1")
        head += b"Connection: close\r\n\r\n" if ending else b"\r\n"
        out = self._out
        if not out:
            self._server.flush_soon(self)
        if len(body) <= _HEAD_AT_ONCE:
            out.append(head + body)
        else:
            out += (head, body)
        self._out_bytes += len(head) + len(body)
        if self._out_bytes > _HEAD_AT_ONCE:  # out now: the transport's high-water mark stops more answers
            self.flush()
        if not ending:
            return True
        self.flush()
        if answer.close:  # refused before its body was read (the REST layer's own refusals)
            self._reading = False
            self._linger()
        else:
            transport.close()
        return False

    def flush(self) -> None:
        """Write the answers made since the last flush, in one write."""
        out = self._out
        if out and self._transport is not None:
            self._transport.write(out[0] if len(out) == 1 else b"".join(out))
        out.clear()
        self._out_bytes = 0

    def _send_continue(self) -> None:
        if self._task is None and not self._queue and self._transport is not None:
            self._continue = False
            self._transport.write(_CONTINUE)

    # -- refusals, timers, closing

    def _refuse(self, refusal: _Refused) -> None:
        """Answer ``refusal`` after the answers ahead of it, then end the connection; nothing more is read."""
        self._reading = False
        self._in_head = self._in_body = False
        self._refusal = refusal.answer()
        self._queue.append((None, False))

    def _finish_refused(self) -> None:
        self._queue.clear()
        transport = self._transport
        if transport is not None:
            transport.write(self._refusal)
            self._linger()

    def _linger(self) -> None:
        """Half close after the last answer; the connection closes when the client closes or after the linger."""
        transport = self._transport
        if transport is None:
            return
        self._reading = False
        if transport.can_write_eof():
            transport.write_eof()
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_later(self._limits.linger_s, transport.close)
        self._timer_at = float("-inf")  # never moved by _arm

    def _arm(self, deadline: float) -> None:
        """Make sure the timer fires by ``deadline`` (one timer a connection, moved only to fire earlier; when it
        fires, :meth:`_expire` checks what is due and sets it again)."""
        timer = self._timer
        if timer is not None:
            if self._timer_at <= deadline:
                return
            timer.cancel()
        self._timer_at = deadline
        self._timer = self._loop.call_at(deadline, self._expire)

    def _expire(self) -> None:
        self._timer = None
        if not self._reading or self._transport is None:
            return
        limits = self._limits
        if self._in_body:
            deadline = self._since + limits.body_timeout_s
            if self._loop.time() >= deadline:
                self._refuse(_Refused(408, f"the body did not arrive within {limits.body_timeout_s:g} s"))
                self._serve()
                return
        elif self._task is None and not self._queue:
            deadline = self._since + limits.keepalive_timeout_s
            if self._loop.time() >= deadline:  # no complete header in time: idle, or a slowloris
                self._close()
                return
        else:
            return  # answering: the wait for the next header starts after the answers
        self._arm(deadline)

    def _check_line(self, data: bytes, began_in_head: bool) -> None:
        """Bound the header line still arriving: llhttp keeps a line's bytes until it ends."""
        end = data.rfind(b"\n")
        if not began_in_head:  # the header began in this read: count from its last line break only
            self._line = 0 if end < 0 else len(data) - end - 1
        else:
            self._line = self._line + len(data) if end < 0 else len(data) - end - 1
        if self._line > self._limits.max_field_bytes:
            self._refuse(_Refused(400, "LineTooLong"))

    def _pause_reading(self) -> None:
        if not self._read_paused and self._transport is not None:
            self._read_paused = True
            self._transport.pause_reading()

    def _close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def stop(self) -> None:
        """The server is stopping: close now when idle, else after the answers under way."""
        self._stopping = True
        self._reading = False
        if self._task is None and not self._queue:
            self._close()

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._close()


class Http1Server:
    """The HTTP port's listener: :class:`Http1Connection` for each client, at most ``max_connections`` at once."""

    def __init__(self, app: HttpApp, limits: HttpLimits) -> None:
        self.app = app
        self.limits = limits
        self.loop = asyncio.get_running_loop()
        self.connections: set[Http1Connection] = set()
        self._server: asyncio.Server | None = None
        self._idle: asyncio.Event | None = None
        self._flushing: list[Http1Connection] = []
        self.port = 0

    def flush_soon(self, conn: Http1Connection) -> None:
        """Write ``conn``'s answers after the other connections' reads of this loop turn are answered: each
        write on loopback runs the client's receive path and wakes it, so the turn's answers go out together."""
        if not self._flushing:
            self.loop.call_soon(self._flush)
        self._flushing.append(conn)

    def _flush(self) -> None:
        flushing, self._flushing = self._flushing, []
        for conn in flushing:
            conn.flush()

    async def start(self, host: str, port: int, ssl: Any = None, reuse_port: bool = False) -> None:
        """Listen on ``host:port`` (``port`` 0: any free one). ``reuse_port``: other processes serve the same port
        (``SO_REUSEPORT``)."""
        self._server = await self.loop.create_server(
            lambda: Http1Connection(self),
            host,
            port,
            ssl=ssl,
            ssl_handshake_timeout=self.limits.tls_handshake_timeout_s if ssl is not None else None,
            backlog=1024,
            reuse_port=reuse_port or None,
        )
        sockets = self._server.sockets
        self.port = sockets[0].getsockname()[1] if sockets else port

    @property
    def open_connections(self) -> int:
        return len(self.connections)

    def changed(self) -> None:
        if self._idle is not None and not self.connections:
            self._idle.set()

    async def stop(self, grace_s: float) -> None:
        """No new connections; calls in flight get ``grace_s`` seconds to be answered, then are cancelled."""
        if self._server is None:
            return
        self._server.close()
        self._idle = asyncio.Event()
        for conn in list(self.connections):
            conn.stop()
        self.changed()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), grace_s)
        for conn in list(self.connections):
            conn.cancel()
        await asyncio.sleep(0)  # connections close on the next loop turn
        self._server = None


__all__ = ["Http1Connection", "Http1Server"]

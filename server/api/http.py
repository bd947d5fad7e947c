"""The HTTP listener (aiohttp): the Open Inference Protocol over REST (:mod:`ferry.server.api.rest`) and
Prometheus ``/metrics``, with the bounds that keep one client from holding the port.

aiohttp stays the HTTP server: it is well kept, asyncio-native, parses HTTP/1.1 in C (llhttp), and bounds what a
client can make it hold (header line and field sizes, a header count, body size and decompressed size, and 32
pipelined requests queued a connection before it stops reading it). A faster server would save microseconds a
request against REST's JSON costs, not worth a second server stack. What aiohttp leaves to us: a cap on open
connections (:class:`LimitedSite`) and a body that trickles in (the REST layer reads it under a timeout).

Slow clients, each bounded: a connection that sends no complete request header within ``keepalive_timeout_s`` of
opening, or of its previous answer, is closed (aiohttp's keep-alive timer runs from the connection's start); a
body that has not fully arrived within the body timeout is answered 408 and the connection closed; connections
past ``max_connections`` are answered 503 and closed at once; a client that goes away cancels its handler
(``handler_cancellation``), which gives back whatever its call held.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from ferry.server.api.rest import Lookup, RestApi, RestLimits
from ferry.server.api.rest_answers import json_errors

_VERSION_HEADER = {"X-Prometheus-Exposition-Format": "0.0.4"}  # text format 0.0.4, as prometheus_client emits


class _NoClientErrors(logging.Filter):
    """Drops aiohttp's tracebacks for requests it could not parse (a header past the limits, bad framing): the
    client got its 400, and a client sending them by the thousand must not fill the server's log."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not isinstance(error, HttpProcessingError)


PROTOCOL_LOG = logging.getLogger("ferry.server.http")
PROTOCOL_LOG.addFilter(_NoClientErrors())


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """What the HTTP port lets clients hold, named with why."""

    max_body_bytes: int = 64 * 1024 * 1024
    """A request body's size, as sent and as decompressed (413 past it): the gRPC port's message limit."""

    body_timeout_s: float = 30.0
    """A body must arrive within this long of its headers (408 after): a trickled body holds a handler."""

    keepalive_timeout_s: float = 30.0
    """A connection closes when it has sent no complete request header within this long of opening or of its
    last answer: idle keep-alive connections and slowloris clients both."""

    max_connections: int = 1000
    """Open connections at once; one past it is answered 503 and closed. Each holds a file descriptor and a
    parser."""

    max_field_bytes: int = 16 * 1024
    """A header line's and a header field's size (aiohttp: max_line_size, max_field_size); gRPC's header list
    limit on the other port is 16 KiB too. A field past it is refused as the parser meets it, so an oversized
    ``authorization`` value is never parsed further."""

    max_headers: int = 100
    """Header fields in one request (aiohttp's max_headers)."""

    tls_handshake_timeout_s: float = 10.0
    """Under TLS, a connection whose handshake is not done by then is closed (the gRPC port's bound)."""

    def runner_options(self) -> dict[str, Any]:
        """The aiohttp ``AppRunner`` keywords these limits set."""
        return {
            "keepalive_timeout": self.keepalive_timeout_s,
            "max_line_size": self.max_field_bytes,
            "max_field_size": self.max_field_bytes,
            "max_headers": self.max_headers,
            "handler_cancellation": True,
            "logger": PROTOCOL_LOG,
            # after answering a request whose body it did not read (413, 408), aiohttp reads and drops the rest
            # for this long so the client sees the answer, then closes: a trickling client gets no more
            "lingering_time": 1.0,
        }


class _Handler(web.RequestHandler):
    """aiohttp's connection handler, but a request its parser refuses (an oversized line or header field, too many
    fields, not HTTP: a 400) is answered with the kind of error only and logged at DEBUG. aiohttp's own answer quotes
    the offending bytes, which may be an ``authorization`` value."""

    def handle_error(
        self, request: Any, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        if not isinstance(exc, HttpProcessingError):
            return super().handle_error(request, status, exc, message)
        PROTOCOL_LOG.debug("refused a malformed HTTP request from %s (%s)", request.remote, type(exc).__name__)
        response = web.Response(status=status, text=f"{status} {HTTPStatus(status).phrase}: {type(exc).__name__}\n")
        response.force_close()
        return response


def create_http_app(
    metrics: Callable[[], bytes | Awaitable[bytes]], lookup: Lookup | None = None, limits: HttpLimits | None = None
) -> web.Application:
    """``/metrics`` (the text ``metrics`` gives), and the REST API on the services ``lookup`` finds (without one,
    only ``/metrics``)."""
    limits = limits or HttpLimits()

    async def scrape(request: web.Request) -> web.Response:
        body = metrics()
        if inspect.isawaitable(body):  # several workers: gathered from the others
            body = await body
        return web.Response(body=body, content_type="text/plain", charset="utf-8", headers=_VERSION_HEADER)

    app = web.Application(middlewares=[json_errors], client_max_size=limits.max_body_bytes)
    if lookup is not None:  # first: aiohttp tries routes in registration order, and inference is the hot path
        rest = RestApi(lookup, RestLimits(limits.max_body_bytes, limits.body_timeout_s))
        app.router.add_routes(rest.routes())
    app.router.add_get("/metrics", scrape, allow_head=False)
    return app


_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
    b'Connection: close\r\nContent-Length: 44\r\n\r\n{"error": "too many connections; try again"}'
)


class _Gate:
    __slots__ = ("limit", "open")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0


class _Admitted(asyncio.Protocol):
    """aiohttp's protocol for one connection, made only when the connection is admitted under the limit."""

    __slots__ = ("_busy", "_gate", "_inner", "_make")

    def __init__(self, make: Callable[[], asyncio.Protocol], gate: _Gate) -> None:
        self._make = make
        self._gate = gate
        self._inner: Any = None
        self._busy: asyncio.TimerHandle | None = None  # refused past the limit: the close

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        gate = self._gate
        if gate.open >= gate.limit:
            # answered at once; closed when the client closes, or within a second: closing with its request unread
            # would reset the connection, and the client would lose the answer (what it sends meanwhile is dropped)
            write = getattr(transport, "write", None)  # uvloop's transports are not asyncio.WriteTransport subclasses
            if write is not None:
                write(_BUSY)
            can_write_eof = getattr(transport, "can_write_eof", None)
            if can_write_eof is not None and can_write_eof():
                transport.write_eof()  # type: ignore[attr-defined]
            self._busy = asyncio.get_running_loop().call_later(1.0, transport.close)
            return
        gate.open += 1
        self._inner = self._make()
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._busy is not None:
            self._busy.cancel()
        if self._inner is not None:
            self._gate.open -= 1
            self._inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else False  # refused: the client is done too

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()


class LimitedSite(web.TCPSite):
    """aiohttp's TCP site, admitting at most ``max_connections`` connections at once."""

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        *,
        max_connections: int,
        tls_handshake_timeout_s: float = 10.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(runner, host, port, **kwargs)
        self._gate = _Gate(max_connections)
        self._handshake_timeout_s = tls_handshake_timeout_s

    @property
    def port(self) -> int:
        """The port bound (the one asked for until :meth:`start`; port 0 asks for any free one)."""
        return int(getattr(self, "_bound_port", self._port))

    @property
    def open_connections(self) -> int:
        return self._gate.open

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site; TCPSite.start would bind without the limit
        factory = self._runner.server
        assert factory is not None
        gate = self._gate

        def handler() -> asyncio.Protocol:  # what the runner's factory makes, as our subclass
            return _Handler(factory, loop=factory._loop, **factory._kwargs)

        self._server = await asyncio.get_running_loop().create_server(
            lambda: _Admitted(handler, gate),
            self._host,
            self._port,
            ssl=self._ssl_context,
            ssl_handshake_timeout=self._handshake_timeout_s if self._ssl_context is not None else None,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
            reuse_port=self._reuse_port,
        )
        sockets = self._server.sockets
        self._bound_port = sockets[0].getsockname()[1] if sockets else self._port


__all__ = ["HttpLimits", "LimitedSite", "create_http_app"]

"""The HTTP listener (aiohttp): the Open Inference Protocol's health endpoints and Prometheus ``/metrics``.

aiohttp is used because it is a well-kept asyncio HTTP server that can also carry the REST form of the protocol
on the same port later.

Its bounds (:class:`HttpLimits`, the gRPC port's counterparts): a request body of at most ``--max-message-bytes``
(413); a request line or one header field over 8 KiB, or over 100 header fields, is refused (400) as the parser
meets it, so an oversized ``authorization`` value is never parsed further; at most ``--http-max-connections``
connections (past it: 503 and closed); idle keep-alive connections closed after 75 s; under TLS a handshake not done
within 10 s is closed.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from ferry.server.models.repository import ModelRepository

log = logging.getLogger("ferry.server.http")

_VERSION_HEADER = {"X-Prometheus-Exposition-Format": "0.0.4"}  # text format 0.0.4, as prometheus_client emits


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """What one HTTP client may make the server hold (module docstring)."""

    max_body_bytes: int = 64 << 20
    max_connections: int = 1024
    max_line_bytes: int = 8 << 10
    """Request line, and one header field (name and value): grpc-core's soft metadata limit is 8 KiB too."""
    max_headers: int = 100
    keepalive_s: float = 75.0
    tls_handshake_timeout_s: float = 10.0

    def runner_options(self) -> dict[str, Any]:
        """aiohttp's per-connection parser and keep-alive settings (``web.AppRunner`` passes them on)."""
        return {
            "max_line_size": self.max_line_bytes,
            "max_field_size": self.max_line_bytes,
            "max_headers": self.max_headers,
            "keepalive_timeout": self.keepalive_s,
        }


class _Handler(web.RequestHandler):
    """aiohttp's connection handler, but a request its parser refuses (an oversized line or header field, too many
    fields, not HTTP: a 400) is answered with the kind of error only and logged at DEBUG. aiohttp's own answer and
    its ERROR log line (with a traceback) quote the offending bytes, which may be an ``authorization`` value, and
    any client could fill the log with them."""

    def handle_error(
        self, request: Any, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        if not isinstance(exc, HttpProcessingError):
            return super().handle_error(request, status, exc, message)
        log.debug("refused a malformed HTTP request from %s (%s)", request.remote, type(exc).__name__)
        response = web.Response(status=status, text=f"{status} {HTTPStatus(status).phrase}: {type(exc).__name__}\n")
        response.force_close()
        return response


_BUSY = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class _Busy(asyncio.Protocol):
    """A connection past ``max_connections``: answered 503 and closed once the client closes or within a second
    (what it sends meanwhile is dropped: closing with its request unread would reset the connection, and the client
    would lose the answer)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(_BUSY)
        if transport.can_write_eof():
            transport.write_eof()
        self._timer = asyncio.get_running_loop().call_later(1.0, transport.close)

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        return False  # the client is done too: close

    def connection_lost(self, exc: Exception | None) -> None:
        self._timer.cancel()


class HttpSite(web.BaseSite):
    """aiohttp's TCPSite with :class:`HttpLimits`' connection bound and TLS handshake timeout."""

    def __init__(
        self, runner: web.AppRunner, host: str, port: int, limits: HttpLimits, tls: ssl.SSLContext | None = None
    ) -> None:
        super().__init__(runner, ssl_context=tls, backlog=1024)
        self._host, self._port, self._limits = host, port, limits
        self.port = port

    @property
    def name(self) -> str:
        return f"{'https' if self._ssl_context else 'http'}://{self._host}:{self.port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        limit = self._limits.max_connections

        def connection() -> asyncio.BaseProtocol:
            if len(server.connections) >= limit:
                return _Busy()
            return _Handler(server, loop=server._loop, **server._kwargs)  # what server() makes, our subclass

        self._server = await asyncio.get_running_loop().create_server(
            connection,
            self._host.strip("[]"),
            self._port,
            ssl=self._ssl_context,
            ssl_handshake_timeout=self._limits.tls_handshake_timeout_s if self._ssl_context else None,
            backlog=self._backlog,
            reuse_address=True,
        )
        self.port = int(self._server.sockets[0].getsockname()[1]) if self._server.sockets else self._port


def create_http_app(
    repository: ModelRepository,
    is_ready: Callable[[], bool],
    metrics: Callable[[], bytes],
    limits: HttpLimits | None = None,
) -> web.Application:
    def status(ok: bool) -> web.Response:
        return web.Response(status=200 if ok else 503)

    async def live(request: web.Request) -> web.Response:
        return status(True)

    async def ready(request: web.Request) -> web.Response:
        return status(is_ready())

    async def model_ready(request: web.Request) -> web.Response:
        return status(repository.is_ready(request.match_info["model"], request.match_info.get("version", "")))

    async def scrape(request: web.Request) -> web.Response:
        return web.Response(body=metrics(), content_type="text/plain", charset="utf-8", headers=_VERSION_HEADER)

    app = web.Application(client_max_size=(limits or HttpLimits()).max_body_bytes)
    app.router.add_get("/metrics", scrape)
    app.router.add_get("/v2/health/live", live)
    app.router.add_get("/v2/health/ready", ready)
    app.router.add_get("/v2/models/{model}/ready", model_ready)
    app.router.add_get("/v2/models/{model}/versions/{version}/ready", model_ready)
    return app

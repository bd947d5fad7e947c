"""The listener: serves :class:`~ferry.server.transport.calls.Services` on one TCP address, one
:class:`~ferry.server.transport.connection.Connection` per client; graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl

import grpc

from ferry.server.transport.calls import Services
from ferry.server.transport.connection import Connection
from ferry.server.transport.limits import Limits


def bound_socket(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """A TCP socket bound to ``host:port`` (``port`` 0: any free port), not listening: connections to it are refused
    until someone listens. ``reuse_port``: another socket may bind the same address (SO_REUSEPORT, as grpc-core
    binds). Raises OSError if the address is taken."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    return sock


class Transport:
    """Serves :class:`Services` on one TCP address; :meth:`start`, then :meth:`stop`."""

    def __init__(self, services: Services, limits: Limits | None = None) -> None:
        self.services = services
        self.limits = limits or Limits()
        self.connections: set[Connection] = set()
        self.tls = False
        self._server: asyncio.Server | None = None
        self._idle: asyncio.Event | None = None
        self._socket: socket.socket | None = None

    async def start(self, host: str, port: int, tls: ssl.SSLContext | None = None) -> int:
        """Listen on ``host:port`` (``port`` 0: any free port); returns the port. Raises OSError if it is taken."""
        port = self.bind(host, port)
        await self.listen(tls)
        return port

    def bind(self, host: str, port: int, reuse_port: bool = False) -> int:
        """Take ``host:port`` without listening yet: connections are refused (not left hanging in a backlog) until
        :meth:`listen`, so balancers pass a replica that is still loading by. Returns the port bound.
        ``reuse_port``: other processes may serve the same port (``SO_REUSEPORT``; the kernel spreads
        connections over the sockets listening)."""
        self._socket = sock = bound_socket(host, port, reuse_port)
        return int(sock.getsockname()[1])

    async def listen(self, tls: ssl.SSLContext | None = None) -> None:
        """Accept connections on the address :meth:`bind` took. With ``tls`` (a server context offering ALPN
        ``h2``), connections are TLS: a handshake that has not completed within ``limits.tls_handshake_timeout_s``
        is closed, and a connection that did not choose ``h2`` by ALPN is closed."""
        assert self._socket is not None, "bind() first"
        loop = asyncio.get_running_loop()
        self.tls = tls is not None
        self._server = await loop.create_server(
            lambda: Connection(self),
            sock=self._socket,
            backlog=1024,
            ssl=tls,
            ssl_handshake_timeout=self.limits.tls_handshake_timeout_s if tls is not None else None,
        )

    def changed(self) -> None:
        if self._idle is not None and not any(c.streams for c in self.connections):
            self._idle.set()

    async def stop(self, grace_s: float) -> None:
        """No new connections; GOAWAY on each; calls in flight get ``grace_s`` seconds, then are cancelled."""
        if self._server is None:
            if self._socket is not None:  # bound, never listened
                self._socket.close()
                self._socket = None
            return
        self._server.close()
        self._idle = asyncio.Event()
        for conn in list(self.connections):
            conn.going_away()
        self.changed()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), grace_s)
        for conn in list(self.connections):
            for stream in list(conn.streams.values()):
                conn.end(stream, grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
                conn.drop(stream)
            conn.write_out()
            conn.close()
        await asyncio.sleep(0)  # connections close on the next loop turn
        self._server = None


__all__ = ["Transport", "bound_socket"]

"""What the HTTP port serves and what it lets a client hold: the Open Inference Protocol over REST
(:mod:`ferry.server.api.rest`) and Prometheus ``/metrics`` behind one router (:class:`HttpApp`), and the port's
bounds (:class:`HttpLimits`). The HTTP/1.1 protocol that parses requests and writes answers, under these bounds, is
:mod:`ferry.server.transport.http1`.

Slow clients, each bounded: a connection that sends no complete request header within ``keepalive_timeout_s`` of
opening, or of its previous answer, is closed; a body that has not fully arrived within ``body_timeout_s`` of its
header is answered 408 and the connection closed; connections past ``max_connections`` are answered 503 and closed
at once; a client that goes away cancels its call, which gives back whatever the call held.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from ferry.server.api.rest import Handler, Lookup, RestApi, RestLimits, Route
from ferry.server.api.rest_answers import error_answer, json_errors
from ferry.server.api.rest_context import HttpAnswer, HttpRequest, RestError

_VERSION_HEADER = {"X-Prometheus-Exposition-Format": "0.0.4"}  # text format 0.0.4, as prometheus_client emits


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """What the HTTP port lets clients hold, named with why."""

    max_body_bytes: int = 64 * 1024 * 1024
    """A request body's size, as sent and as decompressed (413 past it, before it is read when its length is
    declared): the gRPC port's message limit."""

    body_timeout_s: float = 30.0
    """A body must arrive within this long of its headers (408 after): a trickled body holds a buffer."""

    keepalive_timeout_s: float = 30.0
    """A connection closes when it has sent no complete request header within this long of opening or of its
    last answer: idle keep-alive connections and slowloris clients both."""

    max_connections: int = 1000
    """Open connections at once; one past it is answered 503 and closed. Each holds a file descriptor and a
    parser."""

    max_field_bytes: int = 16 * 1024
    """A request line's and a header field's size; gRPC's header list limit on the other port is 16 KiB too. A
    field past it is refused as the parser meets it, so an oversized ``authorization`` value is never parsed
    further."""

    max_headers: int = 100
    """Header fields in one request."""

    max_pipelined: int = 32
    """Requests a connection may have parsed and not yet answered (HTTP/1.1 pipelining); past it the connection
    is not read until answers catch up, so a client cannot queue unbounded work ahead of its answers."""

    tls_handshake_timeout_s: float = 10.0
    """Under TLS, a connection whose handshake is not done by then is closed (the gRPC port's bound)."""

    linger_s: float = 1.0
    """After an answer that ends a connection before its request was read (413, 408, a malformed request, the
    connection cap), how long what the client still sends is read and dropped before the connection is closed, so
    the client sees the answer rather than a reset."""


Endpoint = Callable[[HttpRequest], Coroutine[Any, Any, HttpAnswer]]


class HttpApp:
    """The routes of the HTTP port: ``resolve`` finds a request's endpoint, which answers it (every failure as
    the protocol's ``{"error": ...}``)."""

    def __init__(self, routes: list[Route]) -> None:
        self._routes = routes
        self._exact: dict[tuple[str, str], Handler] = {}
        self._patterns: list[tuple[str, re.Pattern[str], Handler]] = []
        for method, template, handler in routes:
            if "{" in template:
                pattern = re.compile(re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", template) + r"\Z")
                self._patterns.append((method, pattern, handler))
            else:
                self._exact.setdefault((method, template), handler)
        self._infer = re.compile(r"/v2/models/(?P<model>[^/]+)(?:/versions/(?P<version>[^/]+))?/infer\Z")
        self._infer_handler = next((h for m, t, h in routes if m == "POST" and t.endswith("/infer")), None)

    def routes(self) -> list[tuple[str, str]]:
        """Every (method, path template) served."""
        return [(method, template) for method, template, _ in self._routes]

    def resolve(self, request: HttpRequest) -> Endpoint:
        """The endpoint that answers ``request`` (its path parameters set in ``match_info``): the route's, or one
        that answers 404 or 405."""
        method, path = request.method, request.path
        if method == "POST" and self._infer_handler is not None and path.endswith("/infer"):  # the hot path
            match = self._infer.match(path)
            if match is not None:
                info = request.match_info
                info["model"] = unquote(match["model"])
                if match["version"] is not None:
                    info["version"] = unquote(match["version"])
                return self._guarded(self._infer_handler)
        handler = self._exact.get((method, path))
        if handler is not None:
            return self._guarded(handler)
        allowed = set()
        for route_method, pattern, handler in self._patterns:
            match = pattern.match(path)
            if match is None:
                continue
            if route_method == method:
                request.match_info.update((k, unquote(v)) for k, v in match.groupdict().items())
                return self._guarded(handler)
            allowed.add(route_method)
        allowed.update(m for m, template in self._exact if template == path)
        if allowed:
            allow = ",".join(sorted(allowed))
            message = f"{method} is not allowed on {path}; allowed: {allow}"
            return _refusal(RestError(405, message, {"Allow": allow}))
        return _refusal(RestError(404, f"no endpoint {path}"))

    @staticmethod
    def _guarded(handler: Handler) -> Endpoint:
        def endpoint(request: HttpRequest) -> Coroutine[Any, Any, HttpAnswer]:
            return json_errors(request, handler)

        return endpoint


def _refusal(err: RestError) -> Endpoint:
    async def endpoint(request: HttpRequest) -> HttpAnswer:
        return error_answer(err)

    return endpoint


def create_http_app(
    metrics: Callable[[], bytes | Awaitable[bytes]], lookup: Lookup | None = None, limits: HttpLimits | None = None
) -> HttpApp:
    """``/metrics`` (the text ``metrics`` gives), and the REST API on the services ``lookup`` finds (without one,
    only ``/metrics``)."""
    limits = limits or HttpLimits()

    async def scrape(request: HttpRequest) -> HttpAnswer:
        body = metrics()
        if inspect.isawaitable(body):  # several workers: gathered from the others
            body = await body
        return HttpAnswer(200, body, "text/plain; charset=utf-8", _VERSION_HEADER)

    routes: list[Route] = []
    if lookup is not None:  # first: inference is the hot path
        routes += RestApi(lookup, RestLimits(limits.max_body_bytes)).routes()
    routes.append(("GET", "/metrics", scrape))
    return HttpApp(routes)


__all__ = ["Endpoint", "HttpApp", "HttpLimits", "create_http_app"]

"""An HTTP request and its answer as the REST layer sees them (:class:`HttpRequest`, :class:`HttpAnswer`: what
``ferry.server.transport.http1`` parses and writes), what a servicer sees of a REST call (:class:`RestContext`, the
same surface as a gRPC context), and the one table from gRPC status codes to HTTP statuses (:data:`HTTP_STATUS`)."""

from __future__ import annotations

import asyncio
import re
import ssl
import time
from collections.abc import Mapping, Sequence
from typing import Any

import grpc

from ferry.client.errors import InvalidArgument

HTTP_STATUS: Mapping[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,  # the client went away (nginx's and Google's "client closed request")
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}
"""gRPC status → HTTP status, as google.rpc.Code documents the mapping; the only place REST picks a status for an
RPC's outcome. 503 and 429 answers carry ``Retry-After``."""

RETRY_AFTER_S = 1
"""``Retry-After`` of a 503 or 429: the same retry a gRPC client's UNAVAILABLE would make, after a second."""


class HttpRequest:
    """One request as the HTTP/1.1 protocol parsed it, its body whole (as sent: the REST layer decompresses).
    ``headers`` has lower-cased names; a field sent more than once is joined with ", " (RFC 9110, 5.3).
    ``match_info`` holds the path's parameters, percent-decoded, once a route has matched."""

    __slots__ = ("body", "headers", "match_info", "method", "path", "transport")

    def __init__(
        self, method: str, path: str, headers: dict[str, str], body: bytes, transport: asyncio.BaseTransport | None
    ) -> None:
        self.method = method
        self.path = path
        self.headers = headers
        self.body = body
        self.transport = transport
        self.match_info: dict[str, str] = {}


class HttpAnswer:
    """An answer: its status, body (with its content type) and further header fields; ``close`` ends the
    connection after it."""

    __slots__ = ("body", "close", "content_type", "headers", "status")

    def __init__(
        self,
        status: int,
        body: bytes,
        content_type: str = "application/json",
        headers: Mapping[str, str] | None = None,
        close: bool = False,
    ) -> None:
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = headers
        self.close = close


class RestError(Exception):
    """An answer other than 200: ``{"error": message}`` with ``status`` (and ``headers``)."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})

    @classmethod
    def of(cls, code: grpc.StatusCode, message: str) -> RestError:
        status = HTTP_STATUS.get(code, 500)
        headers = {}
        if status in (429, 503):
            headers["Retry-After"] = str(RETRY_AFTER_S)
        elif status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        return cls(status, message, headers)


class Aborted(Exception):
    """``context.abort`` of a REST call: ends the handler with this status."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


_TIMEOUT = re.compile(r"(\d{1,8})([HMSmun])")
_UNIT_S = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}


def parse_timeout(value: str, header: str) -> float:
    """A ``grpc-timeout`` value (up to 8 digits and a unit: H, M, S, m, u, n) in seconds."""
    match = _TIMEOUT.fullmatch(value.strip())
    if match is None:
        raise InvalidArgument(
            f"{header} must be up to 8 digits and a unit (H, M, S, m, u or n), as grpc-timeout; got {value!r}"
        )
    return int(match[1]) * _UNIT_S[match[2]]


class RestContext:
    """A REST call as a servicer sees it: grpc.aio's ``ServicerContext`` methods that server handlers use.
    Metadata is the HTTP headers (names lower-cased, ``authorization`` included); the deadline is the call's on
    the ``time.monotonic()`` clock."""

    __slots__ = ("_code", "_deadline", "_details", "_metadata", "_request", "_trailing")

    def __init__(self, request: HttpRequest, deadline: float | None) -> None:
        self._request = request
        self._deadline = deadline
        self._metadata: tuple[tuple[str, str], ...] | None = None
        self._code: grpc.StatusCode | None = None
        self._details = ""
        self._trailing: Sequence[tuple[str, str | bytes]] = ()

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        if self._metadata is None:
            self._metadata = tuple(self._request.headers.items())
        return self._metadata

    def peer(self) -> str:
        transport = self._request.transport
        address = transport.get_extra_info("peername") if transport is not None else None
        if not address:
            return "unknown"
        host, port = address[0], address[1]
        return f"ipv6:[{host}]:{port}" if ":" in host else f"ipv4:{host}:{port}"

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def auth_context(self) -> dict[str, list[bytes]]:
        """gRPC's keys: ``transport_security_type`` under TLS, and the client certificate's when it sent one."""
        transport = self._request.transport
        tls = transport.get_extra_info("ssl_object") if transport is not None else None
        if not isinstance(tls, ssl.SSLObject | ssl.SSLSocket):
            return {}
        out = {"transport_security_type": [b"ssl"]}
        der = tls.getpeercert(binary_form=True)
        if der:
            out["x509_pem_cert"] = [ssl.DER_cert_to_PEM_cert(der).encode()]
            cert: Any = tls.getpeercert() or {}
            names = [value for rdn in cert.get("subject", ()) for key, value in rdn if key == "commonName"]
            if names:
                out["x509_common_name"] = [names[0].encode()]
            sans = [value.encode() for _, value in cert.get("subjectAltName", ())]
            if sans:
                out["x509_subject_alternative_name"] = sans
        return out

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Sequence[tuple[str, str | bytes]] = ()
    ) -> None:
        if code == grpc.StatusCode.OK:
            raise ValueError("abort() needs a status other than OK")
        self._trailing = trailing_metadata or self._trailing
        raise Aborted(code, details)

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def set_details(self, details: str) -> None:
        self._details = details

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def details(self) -> str:
        return self._details

    def set_trailing_metadata(self, metadata: Sequence[tuple[str, str | bytes]]) -> None:
        self._trailing = metadata

    def trailing_metadata(self) -> Sequence[tuple[str, str | bytes]]:
        return self._trailing

    async def send_initial_metadata(self, metadata: Sequence[tuple[str, str | bytes]]) -> None:
        return None  # HTTP answers carry no gRPC metadata

    def cancelled(self) -> bool:
        transport = self._request.transport
        return transport is None or transport.is_closing()

    def done(self) -> bool:
        return False

    def set_compression(self, compression: grpc.Compression) -> None:
        return None  # REST compresses by Accept-Encoding

    def disable_next_message_compression(self) -> None:
        return None


__all__ = [
    "HTTP_STATUS",
    "RETRY_AFTER_S",
    "Aborted",
    "HttpAnswer",
    "HttpRequest",
    "RestContext",
    "RestError",
    "parse_timeout",
]

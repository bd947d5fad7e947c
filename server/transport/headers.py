"""Header blocks both ways: the request rules of RFC 9113 §8.2-8.3 (a malformed request is a stream error, never
served), gRPC metadata out of a request's fields, and our reply headers, HPACK-encoded with the two fields every
reply repeats indexed in the client's dynamic table (:class:`ReplyEncoder`)."""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable, Sequence

import grpc

from ferry.server.transport.http2 import Fields, _hpack_int, literal, percent_encoded, size_update

# --- requests -------------------------------------------------------------------------------------------------------

_NAME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+")  # RFC 9110's token characters, lowercase only (RFC 9113 §8.2)
_BAD_VALUE = re.compile(rb"[\x00\r\n]|\A[ \t]|[ \t]\Z")  # RFC 9113 §8.2.1
_CONNECTION_SPECIFIC = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"})
_REQUEST_PSEUDO = frozenset({b":method", b":scheme", b":path", b":authority"})
_REQUIRED = (b":method", b":scheme", b":path")
_GOOD_NAMES: set[bytes] = set()  # names already found valid (bounded below): most requests repeat a dozen
_GOOD_NAMES_MAX = 1024


def _field_problem(name: bytes, value: bytes) -> str:
    if name not in _GOOD_NAMES:
        if not _NAME.fullmatch(name):
            return f"header name {name!r} is empty, not lowercase, or has characters a name may not"
        if name in _CONNECTION_SPECIFIC:
            return f"connection-specific header {name.decode()!r}"
        if name != b"te" and len(_GOOD_NAMES) < _GOOD_NAMES_MAX:
            _GOOD_NAMES.add(name)
    if name == b"te" and value != b"trailers":
        return f"te: {value!r} (only 'trailers' is allowed)"
    if _BAD_VALUE.search(value):
        return f"header {name.decode()!r} has a value with NUL, CR, LF or surrounding whitespace"
    return ""


def request_problem(fields: Fields) -> str:
    """Why a request's header list is malformed (RFC 9113 §8.2-8.3), or "" when it is not; remembered on the list,
    so a block decoded once is checked once."""
    verdict = fields.verdict
    if verdict is None:
        verdict = fields.verdict = _request_problem(fields)
    return verdict  # type: ignore[return-value]  # only ever a str here


def _request_problem(fields: Fields) -> str:
    seen: set[bytes] = set()
    regular = False
    for name, value in fields:
        if name[:1] == b":":
            if regular:
                return f"pseudo-header {name.decode(errors='replace')} after a regular header"
            if name not in _REQUEST_PSEUDO:
                return f"{name.decode(errors='replace')} is not a request pseudo-header"
            if name in seen:
                return f"pseudo-header {name.decode()} twice"
            if not value or _BAD_VALUE.search(value):
                return f"pseudo-header {name.decode()} has an empty or malformed value"
            seen.add(name)
            continue
        regular = True
        problem = _field_problem(name, value)
        if problem:
            return problem
    missing = [name.decode() for name in _REQUIRED if name not in seen]
    return f"a request without {', '.join(missing)}" if missing else ""


def trailers_problem(fields: Fields) -> str:
    """Why a request's trailers are malformed (no pseudo-headers, the same field rules), or ""."""
    for name, value in fields:
        if name[:1] == b":":
            return f"pseudo-header {name.decode(errors='replace')} in trailers"
        problem = _field_problem(name, value)
        if problem:
            return problem
    return ""


_RESERVED = frozenset(
    {b"content-type", b"te", b"grpc-timeout", b"grpc-encoding", b"grpc-accept-encoding", b"content-length"}
)


def metadata(fields: Iterable[tuple[bytes, bytes]]) -> Iterable[tuple[str, str | bytes]]:
    """gRPC's request metadata: the fields that are not pseudo-headers or gRPC's own; ``-bin`` values decoded."""
    for key, value in fields:
        if key[:1] == b":" or key in _RESERVED:
            continue
        name = key.decode("ascii", errors="replace")
        if name.endswith("-bin"):
            try:
                yield name, base64.b64decode(value + b"=" * (-len(value) % 4))
            except ValueError:
                continue
        else:
            yield name, value.decode("latin-1")


# --- replies --------------------------------------------------------------------------------------------------------


def metadata_block(metadata: Sequence[tuple[str, str | bytes]]) -> bytes:
    """Reply metadata as literal fields (never indexed: values vary)."""
    block = b""
    for key, value in metadata:
        raw = base64.b64encode(value).rstrip(b"=") if isinstance(value, bytes) else value.encode("latin-1")
        block += literal(key.lower().encode("ascii"), raw)
    return block


_STATUS_200 = b"\x88"  # :status 200, static index 8
_CONTENT_TYPE = (b"content-type", b"application/grpc")
_OK = (b"grpc-status", b"0")
_DEFAULT_TABLE = 4096  # SETTINGS_HEADER_TABLE_SIZE until the client says otherwise (RFC 9113 §6.5.2)


def _entry_size(entry: tuple[bytes, bytes]) -> int:
    return len(entry[0]) + len(entry[1]) + 32  # RFC 7541 §4.1


_BOTH = _entry_size(_CONTENT_TYPE) + _entry_size(_OK)


def _inserted(name: bytes | int, value: bytes) -> bytes:
    """A literal field with incremental indexing (RFC 7541 §6.2.1), its name a static-table index or new."""
    head = _hpack_int(name, 6, 0x40) if isinstance(name, int) else b"\x40" + _hpack_int(len(name), 7) + name
    return head + _hpack_int(len(value), 7) + value


class ReplyEncoder:
    """Our side of one connection's HPACK state. Every reply repeats ``content-type: application/grpc`` and, when it
    succeeds, the trailer ``grpc-status: 0``: the first reply to carry each inserts it into the client's dynamic
    table, and later replies name it by index, one byte (a unary reply's headers and trailers go from ~34 bytes to
    2). Nothing else is ever inserted, so the two entries are never evicted while the client's table holds 104
    bytes; a client that allows less gets literals. When the client changes SETTINGS_HEADER_TABLE_SIZE, the next
    block starts with the size update RFC 7541 §4.2 asks for (to 0, emptying the table, then to the new size)."""

    __slots__ = ("_entries", "_head", "_limit", "_ok", "_update")

    def __init__(self) -> None:
        self._limit = _DEFAULT_TABLE
        self._entries: list[tuple[bytes, bytes]] = []  # inserted, oldest first
        self._update = b""  # a size update owed at the start of the next block
        self._head: bytes | None = None  # the steady state: ``:status 200`` and content-type, indexed
        self._ok: bytes | None = None  # and ``grpc-status: 0``

    def table_size(self, size: int) -> None:
        """The client's SETTINGS_HEADER_TABLE_SIZE."""
        if size != self._limit:
            self._limit = size
            self._entries.clear()
            self._update = size_update(0) + (size_update(min(size, _DEFAULT_TABLE)) if size else b"")
            self._head = self._ok = None

    def _field(self, entry: tuple[bytes, bytes], name: bytes | int) -> bytes:
        entries = self._entries
        if entry in entries:
            return _hpack_int(62 + len(entries) - 1 - entries.index(entry), 7, 0x80)
        if self._limit >= _BOTH:
            entries.append(entry)
            return _inserted(name, entry[1])
        return literal(name, entry[1])

    def _start(self) -> bytes:
        """The size update owed, if any; then what later blocks can reuse as they are (both fields in the table, or
        a table too small to hold them: literals for good)."""
        update, self._update = self._update, b""
        entries = self._entries
        if self._limit < _BOTH or (_CONTENT_TYPE in entries and _OK in entries):
            self._head = _STATUS_200 + self._field(_CONTENT_TYPE, 31)
            self._ok = self._field(_OK, _OK[0])
        return update

    def headers(self, metadata: bytes = b"") -> bytes:
        """A reply's HEADERS block: ``:status 200``, content-type, then ``metadata`` (literal fields)."""
        head = self._head
        if head is not None and not self._update:
            return head + metadata if metadata else head
        update = self._start()
        return update + _STATUS_200 + self._field(_CONTENT_TYPE, 31) + metadata

    def trailers(self, code: grpc.StatusCode, details: str = "", trailing: bytes = b"") -> bytes:
        """A reply's trailers: the status (``grpc-status: 0`` indexed), its message, trailing metadata."""
        if code is grpc.StatusCode.OK and not details and not trailing and self._ok is not None and not self._update:
            return self._ok
        return self._start() + self._status(code, details, trailing)

    def trailers_only(self, code: grpc.StatusCode, details: str = "", trailing: bytes = b"") -> bytes:
        """Headers and trailers in one block, for a call that ends before any reply message."""
        return self.headers() + self._status(code, details, trailing)

    def _status(self, code: grpc.StatusCode, details: str, trailing: bytes) -> bytes:
        if code is grpc.StatusCode.OK:
            block = self._field(_OK, _OK[0]) if not details else literal(b"grpc-status", b"0")
        else:
            block = literal(b"grpc-status", str(code.value[0]).encode())
        if details:
            block += literal(b"grpc-message", percent_encoded(details))
        return block + trailing


__all__ = ["ReplyEncoder", "metadata", "metadata_block", "request_problem", "trailers_problem"]

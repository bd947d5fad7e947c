"""HTTP/2 framing (RFC 9113) and gRPC's pieces of it, shared by Ferry's server transport (:mod:`ferry.server.transport`)
and the load generator's client (:mod:`ferry.loadtest.wire`): frame and settings constants, writing a frame, splitting
received bytes into frames, literal HPACK header fields, header blocks decoded with the hpack library, gRPC's
status names, ``grpc-timeout`` and ``grpc-message``'s percent-encoding.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

import hpack
import hpack.table

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY_FRAME, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY = 0x1, 0x1, 0x4, 0x8, 0x20
HEADER_TABLE_SIZE, ENABLE_PUSH, MAX_CONCURRENT_STREAMS, INITIAL_WINDOW_SIZE, MAX_FRAME_SIZE = 1, 2, 3, 4, 5
MAX_HEADER_LIST_SIZE = 6
DEFAULT_WINDOW = 65_535  # RFC 9113 §6.9.2, until the peer's SETTINGS say otherwise
DEFAULT_FRAME = 16_384
MAX_WINDOW = (1 << 31) - 1

# HTTP/2 error codes (RFC 9113 §7)
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR, SETTINGS_TIMEOUT, STREAM_CLOSED = 0, 1, 2, 3, 4, 5
FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL, COMPRESSION_ERROR, ENHANCE_YOUR_CALM = 6, 7, 8, 9, 11

FRAME_HEADER = struct.Struct(">BHBBI")  # length (24 bits: high byte, low 16), type, flags, stream id
SETTING = struct.Struct(">HI")
U32 = struct.Struct(">I")

# gRPC's status codes by number (the names grpc.StatusCode uses)
STATUS_NAMES = (
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
    "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED",
    "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
)  # fmt: skip


class ProtocolError(Exception):
    """The peer broke HTTP/2 in a way that ends the connection; ``code`` is the HTTP/2 error code for GOAWAY."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return FRAME_HEADER.pack(n >> 16, n & 0xFFFF, kind, flags, stream_id) + payload


def _hpack_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    """HPACK's integer representation (RFC 7541 §5.1); ``first`` holds the bits above the prefix."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = [first | limit]
    value -= limit
    while value >= 128:
        out.append((value & 127) | 128)
        value >>= 7
    out.append(value)
    return bytes(out)


def size_update(size: int) -> bytes:
    """A dynamic table size update (RFC 7541 §6.3): what an encoder owes at the start of its next block once the
    peer's SETTINGS_HEADER_TABLE_SIZE lowered the table below what it used."""
    return _hpack_int(size, 5, 0x20)


def literal(name: bytes | int, value: bytes) -> bytes:
    """A literal header field without indexing (RFC 7541 §6.2.2); ``name`` a static-table index or a new name."""
    head = _hpack_int(name, 4) if isinstance(name, int) else b"\x00" + _hpack_int(len(name), 7) + name
    return head + _hpack_int(len(value), 7) + value


def frames(buf: bytearray, start: int = 0) -> list[tuple[int, int, int, bytes]]:
    """The complete frames in ``buf`` from ``start`` on, as (type, flags, stream id, payload), removed from it (with
    whatever came before ``start``); an incomplete frame stays for the next read."""
    out = []
    pos, size = start, len(buf)
    while size - pos >= 9:
        high, low, kind, flags, stream_id = FRAME_HEADER.unpack_from(buf, pos)
        end = pos + 9 + (high << 16 | low)
        if end > size:
            break
        out.append((kind, flags, stream_id & 0x7FFFFFFF, bytes(buf[pos + 9 : end])))
        pos = end
    del buf[:pos]
    return out


def messages(buf: bytearray) -> list[bytes]:
    """The complete gRPC messages (a 5-byte prefix: compressed flag, length) at the front of ``buf``, removed from
    it; a partial one stays."""
    out = []
    while len(buf) >= 5:
        size = U32.unpack_from(buf, 1)[0]
        if len(buf) < 5 + size:
            break
        out.append(bytes(buf[5 : 5 + size]))
        del buf[: 5 + size]
    return out


DECODED_BLOCKS = 256
"""Distinct header blocks remembered decoded (a peer's requests or replies repeat a handful)."""
SIZE_UPDATES = 2
"""Dynamic table size updates a block may start with: RFC 7541 §4.2 needs at most two (the smallest size since the
last block, then the final one); more is only work for the decoder."""


class Fields(list[tuple[bytes, bytes]]):
    """A decoded header list. ``verdict`` is free for the receiver's check of it (e.g. RFC 9113 §8.2-8.3 request
    rules): a block decoded once and remembered is checked once too."""

    __slots__ = ("verdict",)

    def __init__(self, fields: Iterable[tuple[bytes, bytes]] = ()) -> None:
        super().__init__(fields)
        self.verdict: object = None


class _Insertion(Exception):
    pass


class _AdvertisedTable(hpack.table.HeaderTable):
    """The dynamic table we decode into. Once the peer has acknowledged our SETTINGS_HEADER_TABLE_SIZE of 0, its
    table must be 0 bytes too: an insertion into a table it never shrank is a broken promise (COMPRESSION_ERROR)
    and memory we said we would not hold. (Into a table of 0 bytes an insertion is legal and stores nothing, RFC
    7541 §4.4: grpc-core's encoder does that.)"""

    closed = False

    def add(self, name: bytes, value: bytes) -> None:
        if self.closed and self.maxsize > 0:
            raise _Insertion
        super().add(name, value)


class HeaderBlocks:
    """Header blocks as frames carry them: a HEADERS frame (padding and priority stripped) and the CONTINUATION
    frames that finish it, decoded with hpack. Once the peer has shrunk its HPACK table to the 0 bytes we allow, a
    block's meaning depends on its bytes alone (static-table references and literals), so the same headers and
    trailers, sent again and again, are decoded once (hpack's decoder costs ~20 µs a block here).

    The work a block can cost is bounded: a block larger than ``max_block`` bytes, or decoding to more than
    ``max_list`` bytes (RFC 9113's size: name + value + 32 per field, so an empty field counts 32), ends the
    connection (ENHANCE_YOUR_CALM), as does a block starting with more than :data:`SIZE_UPDATES` table size updates
    (COMPRESSION_ERROR: they cost the decoder work and mean nothing). HPACK's state is the connection's, so a block
    that cannot be decoded ends it: :class:`ProtocolError`."""

    def __init__(self, max_block: int = 1 << 20, max_list: int = 1 << 16) -> None:
        self._decoder = hpack.Decoder()
        self._decoder.max_header_list_size = max_list
        self._table = self._decoder.header_table = _AdvertisedTable()
        self._max_block = max_block
        self._decoded: dict[bytes, Fields] = {}
        self._pending: tuple[int, int, bytearray] | None = None  # a block waiting for CONTINUATION

    @property
    def open_block(self) -> int | None:
        """The stream whose block waits for CONTINUATION frames (no other frame may come between), if any."""
        return None if self._pending is None else self._pending[0]

    def table_acknowledged(self) -> None:
        """The peer acknowledged our SETTINGS_HEADER_TABLE_SIZE of 0: from now on it may not store entries."""
        self._table.closed = True

    def feed(self, kind: int, flags: int, stream_id: int, payload: bytes) -> tuple[int, int, Fields] | None:
        """A HEADERS or CONTINUATION frame; once its block is complete, (stream id, the HEADERS frame's flags, the
        fields), else None."""
        if kind == HEADERS:
            if self._pending is not None:
                raise ProtocolError(PROTOCOL_ERROR, "HEADERS while another header block was open")
            if flags & PADDED:
                if not payload or payload[0] >= len(payload):
                    raise ProtocolError(PROTOCOL_ERROR, "padding longer than the HEADERS frame")
                payload = payload[1 : len(payload) - payload[0]]
            if flags & PRIORITY:
                payload = payload[5:]
            if len(payload) > self._max_block:
                raise ProtocolError(ENHANCE_YOUR_CALM, f"a header block over {self._max_block} bytes")
            if not flags & END_HEADERS:
                self._pending = (stream_id, flags, bytearray(payload))
                return None
            return stream_id, flags, self._fields(payload)
        if self._pending is None or self._pending[0] != stream_id:
            raise ProtocolError(PROTOCOL_ERROR, "CONTINUATION without its HEADERS")
        block = self._pending[2]
        block += payload
        if len(block) > self._max_block:
            raise ProtocolError(ENHANCE_YOUR_CALM, f"a header block over {self._max_block} bytes")
        if not flags & END_HEADERS:
            return None
        stream_id, flags, _ = self._pending
        self._pending = None
        return stream_id, flags, self._fields(bytes(block))

    def _fields(self, block: bytes) -> Fields:
        table = self._table
        if table.maxsize == 0:
            fields = self._decoded.get(block)
            if fields is not None:
                return fields
        if block and block[0] & 0xE0 == 0x20:
            _size_updates(block)
        try:
            fields = Fields((bytes(k), bytes(v)) for k, v in self._decoder.decode(block, raw=True))
        except _Insertion:
            raise ProtocolError(COMPRESSION_ERROR, "a dynamic table insertion past our table size of 0") from None
        except hpack.OversizedHeaderListError as err:
            raise ProtocolError(ENHANCE_YOUR_CALM, f"header list too large: {err}") from None
        except hpack.HPACKError as err:
            raise ProtocolError(COMPRESSION_ERROR, f"header block cannot be decoded: {err}") from None
        if table.maxsize == 0:
            if len(self._decoded) >= DECODED_BLOCKS:
                self._decoded.clear()  # blocks that vary (deadlines, error messages) do not crowd out the rest
            self._decoded[block] = fields
        return fields


def _size_updates(block: bytes) -> None:
    """Refuse a block that starts with more than :data:`SIZE_UPDATES` dynamic table size updates (``001xxxxx``
    and the integer's continuation bytes), before hpack spends work on each."""
    pos = count = 0
    while pos < len(block) and block[pos] & 0xE0 == 0x20:
        count += 1
        if count > SIZE_UPDATES:
            raise ProtocolError(COMPRESSION_ERROR, f"more than {SIZE_UPDATES} table size updates in a header block")
        more = block[pos] & 0x1F == 0x1F
        pos += 1
        while more and pos < len(block):
            more = bool(block[pos] & 0x80)
            pos += 1


def grpc_timeout(seconds: float) -> bytes:
    """The ``grpc-timeout`` header value: at most 8 digits and a unit, rounded up."""
    for unit, scale in ((b"u", 1e6), (b"m", 1e3), (b"S", 1.0), (b"M", 1 / 60), (b"H", 1 / 3600)):
        amount = -int(-seconds * scale // 1)
        if amount < 100_000_000:
            return str(max(amount, 1)).encode() + unit
    return b"99999999H"


_TIMEOUT_UNITS = {ord("H"): 3600.0, ord("M"): 60.0, ord("S"): 1.0, ord("m"): 1e-3, ord("u"): 1e-6, ord("n"): 1e-9}


def parse_grpc_timeout(value: bytes) -> float | None:
    """Seconds from a ``grpc-timeout`` value (1-8 ASCII digits and a unit), or None when it is malformed."""
    if not 2 <= len(value) <= 9 or not value[:-1].isdigit():
        return None
    scale = _TIMEOUT_UNITS.get(value[-1])
    return None if scale is None else int(value[:-1]) * scale


_KEPT = frozenset(range(0x20, 0x7F)) - {ord("%")}


def percent_encoded(message: str) -> bytes:
    """``grpc-message``'s encoding: UTF-8, with every byte outside printable ASCII (and ``%``) as ``%XX``."""
    raw = message.encode()
    if all(b in _KEPT for b in raw):
        return raw
    return b"".join(bytes([b]) if b in _KEPT else b"%%%02X" % b for b in raw)


def percent_decoded(value: bytes) -> str:
    """``grpc-message`` is percent-encoded UTF-8."""
    if b"%" not in value:
        return value.decode(errors="replace")
    from urllib.parse import unquote_to_bytes

    return unquote_to_bytes(value).decode(errors="replace")

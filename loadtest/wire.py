"""A small gRPC client written straight onto HTTP/2, for the load generator: unary calls and bidirectional streams
over one connection, each call written as two prepared frames.

Why not grpcio: its Python client spends ~300-450 µs of CPU per call on this machine (the C core, its Cython layer,
the poller thread that wakes the event loop), where perf_analyzer's C++ client spends ~170 µs. The generator shares
the cores with the server it measures, so that CPU is taken from the server, and at low concurrency it is added to
every round trip: the generator read 12-39% below perf_analyzer at concurrency 1 and 4. This client spends about what
perf_analyzer does (see BENCHMARKS.md, section `loadtest`).

What it speaks of HTTP/2 (RFC 9113) and of gRPC over HTTP/2:

- the connection preface and SETTINGS: ours turn server push off, forbid the server a dynamic HPACK table (so each
  reply's header blocks are decoded by the hpack library with no state to keep in step) and open large receive
  windows; the server's SETTINGS are applied and acknowledged, its PINGs answered, its GOAWAY honoured (calls above
  its last stream id fail ``UNAVAILABLE``; later calls open a new connection);
- flow control both ways: a DATA frame never exceeds the server's connection and stream windows or its largest frame
  size (what does not fit waits for WINDOW_UPDATE); what we receive is given back in WINDOW_UPDATEs once half a
  window is used; calls above the server's SETTINGS_MAX_CONCURRENT_STREAMS wait for a stream to close;
- requests: a header block of literal fields without indexing, built once per method and timeout (``grpc-timeout``
  tells the server the deadline; the client enforces it too), then the message with gRPC's 5-byte length prefix;
  reply header blocks, which repeat, are decoded once each;
- replies: ``:status``, then messages reassembled from DATA frames, then trailers (``grpc-status``,
  ``grpc-message``); Trailers-Only replies; RST_STREAM mapped to a status as gRPC's spec maps HTTP/2 error codes.

Not spoken: TLS, compression, server push, sending CONTINUATION frames (our header blocks are small).
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

from ferry.server.transport.http2 import (  # the echo servers and tests use these through this module too
    ACK,
    CONTINUATION,
    DATA,
    DEFAULT_FRAME,
    DEFAULT_WINDOW,
    ENABLE_PUSH,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADER_TABLE_SIZE,
    HEADERS,
    INITIAL_WINDOW_SIZE,
    MAX_CONCURRENT_STREAMS,
    MAX_FRAME_SIZE,
    PADDED,
    PING,
    PREFACE,
    REFUSED_STREAM,
    RST_STREAM,
    SETTING,
    SETTINGS,
    STATUS_NAMES,
    U32,
    WINDOW_UPDATE,
    HeaderBlocks,
    frame,
    frames,
    grpc_timeout,
    literal,
    messages,
    percent_decoded,
    size_update,
)  # fmt: skip

RECEIVE_WINDOW = 1 << 24
"""The receive window we open per stream and for the connection (16 MiB); consumed halves are given back."""
REFUSED_RETRIES = 10
SWEEP_S = 0.05
"""How often calls past their deadline are looked for."""

_RESET_STATUS = {
    REFUSED_STREAM: "UNAVAILABLE",
    8: "CANCELLED",
    11: "RESOURCE_EXHAUSTED",
    12: "PERMISSION_DENIED",
}  # fmt: skip  (every other code: INTERNAL)
_HTTP_STATUS = {b"400": "INTERNAL", b"401": "UNAUTHENTICATED", b"403": "PERMISSION_DENIED", b"404": "UNIMPLEMENTED",
                b"429": "UNAVAILABLE", b"502": "UNAVAILABLE", b"503": "UNAVAILABLE", b"504": "UNAVAILABLE"}  # fmt: skip


def request_headers(
    authority: str, path: str, timeout_s: float | None, metadata: Sequence[tuple[str, str]] = ()
) -> bytes:
    """The HPACK block of a gRPC request; it never changes the server's decoding state, so it is reused as is.
    ``metadata``: fields sent with every call (``authorization: Bearer ...``)."""
    block = (
        b"\x83\x86"  # :method POST, :scheme http (static table 3 and 6)
        + literal(4, path.encode())  # :path
        + literal(1, authority.encode())  # :authority
        + literal(b"content-type", b"application/grpc")
        + literal(b"te", b"trailers")
        + literal(b"user-agent", b"ferry-loadtest")
    )
    if timeout_s is not None:
        block += literal(b"grpc-timeout", grpc_timeout(timeout_s))
    for key, value in metadata:
        block += literal(key.lower().encode("ascii"), value.encode("latin-1"))
    return block


class CallError(Exception):
    """A call that ended with a status other than OK; ``code`` is the status name (``grpc.StatusCode`` names)."""

    def __init__(self, code: str, message: str = "") -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message


class _Stream:
    """One HTTP/2 stream (one call) as the connection tracks it."""

    __slots__ = ("buffer", "deadline", "done", "ending", "http_status", "id", "message", "on_message", "pending",
                 "refused", "send_window", "status", "unacked")  # fmt: skip

    def __init__(self, stream_id: int, send_window: int, on_message: Callable[[bytes], None] | None,
                 deadline: float | None) -> None:  # fmt: skip
        self.id = stream_id
        self.send_window = send_window
        self.on_message = on_message  # None: replies are not read (unary calls of the load generator)
        self.buffer = bytearray()  # received bytes of a message not yet complete
        self.pending = bytearray()  # DATA waiting for window
        self.ending = False  # END_STREAM goes with the last pending byte
        self.refused = False  # the server reset it unprocessed (REFUSED_STREAM): safe to send again
        self.unacked = 0  # received bytes not yet given back in a stream WINDOW_UPDATE
        self.status: str | None = None
        self.http_status = b""
        self.message = ""
        self.deadline = deadline
        self.done: asyncio.Future[str] = asyncio.get_running_loop().create_future()  # the final status name


class Connection(asyncio.Protocol):
    """One HTTP/2 connection to a gRPC server; open it with :meth:`open`. Calls: :meth:`unary` and :meth:`stream`."""

    def __init__(
        self, authority: str, receive_window: int = RECEIVE_WINDOW, metadata: Sequence[tuple[str, str]] = ()
    ) -> None:
        self.authority = authority
        self.metadata = tuple(metadata)
        self.receive_window = receive_window
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, _Stream] = {}
        self.next_id = 1
        self.max_streams = 1 << 31
        self.peer_window = DEFAULT_WINDOW  # the server's initial stream window
        self.max_frame = DEFAULT_FRAME
        self.send_window = DEFAULT_WINDOW  # connection-level, towards the server
        self.unacked = 0  # connection-level bytes received and not yet given back
        self.blocked: dict[int, _Stream] = {}  # streams with DATA waiting for window, in order
        self.slot_free = asyncio.Event()
        self.settled = asyncio.get_running_loop().create_future()  # the server's first SETTINGS arrived
        self.closed_reason: str | None = None
        self.last_stream = 1 << 31  # GOAWAY's last stream id
        self._buffer = bytearray()
        self._headers = HeaderBlocks()
        self._blocks: dict[tuple[str, float | None], bytes] = {}
        self._table_size = 4096  # the server's SETTINGS_HEADER_TABLE_SIZE until it says otherwise
        self._owed = b""  # a table size update owed at the start of the next header block (RFC 7541 §4.2)
        self._sweeper: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, host: str, port: int, timeout_s: float = 10.0, **kw: Any) -> Connection:
        loop = asyncio.get_running_loop()
        _, conn = await asyncio.wait_for(loop.create_connection(lambda: cls(f"{host}:{port}", **kw), host, port),
                                         timeout_s)  # fmt: skip
        await asyncio.wait_for(asyncio.shield(conn.settled), timeout_s)
        return conn

    @property
    def usable(self) -> bool:
        """False once the connection is lost or the server said GOAWAY: open a new one."""
        return self.closed_reason is None and self.next_id <= self.last_stream

    # --- calls ----------------------------------------------------------------------------------------------------

    async def unary(
        self, path: str, message: bytes, timeout_s: float | None = None, on_reply: Callable[[bytes], None] | None = None
    ) -> str:
        """One unary call; returns its status name (``"OK"`` on success). The reply is read only for ``on_reply``. A
        call the server refused before looking at it (RST_STREAM REFUSED_STREAM: over its stream limit) is sent
        again once another call ends, as gRPC's own clients do."""
        data = b"\x00" + U32.pack(len(message)) + message
        for _ in range(REFUSED_RETRIES):
            stream = await self._start(path, timeout_s, on_reply, data)
            status = await stream.done
            if not stream.refused:
                return status
            if self.streams:
                self.slot_free.clear()
                await self.slot_free.wait()
        return status

    async def stream(self, path: str, on_message: Callable[[bytes], None], timeout_s: float | None = None) -> Call:
        """A bidirectional stream; each reply message (bytes) goes to ``on_message`` as it completes."""
        return Call(self, await self._start(path, timeout_s, on_message))

    async def _start(self, path: str, timeout_s: float | None, on_message: Callable[[bytes], None] | None,
                     data: bytes = b"") -> _Stream:  # fmt: skip
        """A new stream: HEADERS, then ``data`` (if any) as its only DATA, with END_STREAM; in one write when the
        windows allow."""
        while len(self.streams) >= self.max_streams and self.usable:
            self.slot_free.clear()
            await self.slot_free.wait()
        if not self.usable or self.transport is None:
            raise CallError("UNAVAILABLE", self.closed_reason or "the server is going away")
        block = self._blocks.get((path, timeout_s))
        if block is None:
            block = self._blocks[(path, timeout_s)] = request_headers(self.authority, path, timeout_s, self.metadata)
        stream_id = self.next_id
        self.next_id += 2
        deadline = time.monotonic() + timeout_s if timeout_s is not None else None
        stream = self.streams[stream_id] = _Stream(stream_id, self.peer_window, on_message, deadline)
        if self._owed:  # the server lowered our table (Ferry's to 0): say so, and its blocks repeat byte for byte
            block, self._owed = self._owed + block, b""
        headers = frame(HEADERS, END_HEADERS, stream_id, block)
        if data and self._fits(stream, len(data)):
            self.transport.write(headers + frame(DATA, END_STREAM, stream_id, data))  # one syscall for the call
        else:
            self.transport.write(headers)
            if data:
                self._send(stream, data, end=True)
        if deadline is not None and self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
        return stream

    def _send(self, stream: _Stream, data: bytes, end: bool) -> None:
        """DATA on ``stream`` within the windows (END_STREAM with it when ``end``); what does not fit waits in
        ``stream.pending`` for WINDOW_UPDATE."""
        transport = self.transport
        if stream.done.done() or transport is None:
            return
        if not stream.pending and self._fits(stream, len(data)):
            transport.write(frame(DATA, END_STREAM if end else 0, stream.id, data))
            return
        stream.pending += data
        stream.ending = stream.ending or end
        self.blocked[stream.id] = stream
        self._flush()

    def _fits(self, stream: _Stream, n: int) -> bool:
        """Whether ``n`` bytes go out as one DATA frame now; if so, they are taken from the windows."""
        if n <= stream.send_window and n <= self.send_window and n <= self.max_frame:
            stream.send_window -= n
            self.send_window -= n
            return True
        return False

    def _flush(self) -> None:
        """Send what blocked streams hold, in the order they blocked, as far as the windows allow."""
        transport = self.transport
        if transport is None:
            return
        for stream in list(self.blocked.values()):
            pending = stream.pending
            while pending and self.send_window > 0 and stream.send_window > 0:
                n = min(len(pending), self.send_window, stream.send_window, self.max_frame)
                last = stream.ending and n == len(pending)
                transport.write(frame(DATA, END_STREAM if last else 0, stream.id, bytes(pending[:n])))
                del pending[:n]
                stream.send_window -= n
                self.send_window -= n
            if pending:
                if self.send_window <= 0:
                    return
                continue
            del self.blocked[stream.id]

    def end_stream(self, stream: _Stream) -> None:
        """The client's half-close: no more messages on ``stream``."""
        if stream.pending:
            stream.ending = True  # sent with the last of the pending data
        elif self.transport is not None and not stream.done.done():
            self.transport.write(frame(DATA, END_STREAM, stream.id))

    def cancel(self, stream: _Stream, status: str = "CANCELLED") -> None:
        """Abandon a call: RST_STREAM(CANCEL) to the server, ``status`` to whoever waits on it."""
        if stream.id in self.streams and self.transport is not None:
            self.transport.write(frame(RST_STREAM, 0, stream.id, U32.pack(8)))
        self._end(stream, status, "cancelled by the client")

    def _end(self, stream: _Stream, status: str, message: str = "") -> None:
        if self.streams.pop(stream.id, None) is not None:
            self.slot_free.set()
        self.blocked.pop(stream.id, None)
        if not stream.done.done():
            stream.message = message or stream.message
            stream.done.set_result(status)

    async def _sweep(self) -> None:
        """Fails calls past their deadline with DEADLINE_EXCEEDED (the server should have ended them already)."""
        while self.closed_reason is None:
            await asyncio.sleep(SWEEP_S)
            now = time.monotonic()
            for stream in [s for s in self.streams.values() if s.deadline is not None and s.deadline <= now]:
                self.cancel(stream, "DEADLINE_EXCEEDED")

    def close(self) -> None:
        if self.transport is not None:
            self.transport.write(frame(GOAWAY, 0, 0, U32.pack(0) + U32.pack(0)))
            self.transport.close()
        self._lost("the client closed the connection")

    # --- asyncio.Protocol ----------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        ours = (SETTING.pack(HEADER_TABLE_SIZE, 0) + SETTING.pack(ENABLE_PUSH, 0)
                + SETTING.pack(INITIAL_WINDOW_SIZE, self.receive_window))  # fmt: skip
        grow = frame(WINDOW_UPDATE, 0, 0, U32.pack(self.receive_window - DEFAULT_WINDOW))
        transport.write(PREFACE + frame(SETTINGS, 0, 0, ours) + grow)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost(f"connection lost: {exc}" if exc else "the server closed the connection")

    def _lost(self, reason: str) -> None:
        if self.closed_reason is None:
            self.closed_reason = reason
        self.transport = None
        for stream in list(self.streams.values()):
            self._end(stream, "UNAVAILABLE", reason)
        if not self.settled.done():
            self.settled.set_exception(CallError("UNAVAILABLE", reason))
        if self._sweeper is not None:
            self._sweeper.cancel()
        self.slot_free.set()

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        for kind, flags, stream_id, payload in frames(self._buffer):
            self._frame(kind, flags, stream_id, payload)

    def _frame(self, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        if kind == DATA:
            self._data(flags, stream_id, payload)
        elif kind in (HEADERS, CONTINUATION):
            self._header_frame(kind, flags, stream_id, payload)
        elif kind == RST_STREAM:
            stream = self.streams.get(stream_id)
            if stream is not None:
                code = U32.unpack(payload[:4])[0]
                stream.refused = code == REFUSED_STREAM
                reason = f"stream reset by the server (HTTP/2 error {code})"
                self._end(stream, _RESET_STATUS.get(code, "INTERNAL"), reason)
        elif kind == SETTINGS:
            if not flags & ACK:
                self._settings(payload)
        elif kind == WINDOW_UPDATE:
            grow = U32.unpack(payload[:4])[0] & 0x7FFFFFFF
            if stream_id == 0:
                self.send_window += grow
            elif (stream := self.streams.get(stream_id)) is not None:
                stream.send_window += grow
            if self.blocked:
                self._flush()
        elif kind == PING:
            if not flags & ACK and self.transport is not None:
                self.transport.write(frame(PING, ACK, 0, payload))
        elif kind == GOAWAY:
            last, code = struct.unpack(">II", payload[:8])
            self.last_stream = last & 0x7FFFFFFF
            reason = f"the server sent GOAWAY (HTTP/2 error {code}: {payload[8:].decode(errors='replace')})"
            if self.closed_reason is None:
                self.closed_reason = reason
            for stream in [s for i, s in self.streams.items() if i > self.last_stream]:
                self._end(stream, "UNAVAILABLE", reason)
            self.slot_free.set()

    def _settings(self, payload: bytes) -> None:
        for offset in range(0, len(payload) - len(payload) % 6, 6):
            key, value = SETTING.unpack_from(payload, offset)
            if key == MAX_CONCURRENT_STREAMS:
                self.max_streams = value
                self.slot_free.set()
            elif key == INITIAL_WINDOW_SIZE:
                delta = value - self.peer_window
                self.peer_window = value
                for stream in self.streams.values():
                    stream.send_window += delta
            elif key == MAX_FRAME_SIZE:
                self.max_frame = value
            elif key == HEADER_TABLE_SIZE and value < self._table_size:  # we never index: nothing to evict
                self._table_size = value
                self._owed = size_update(value)
        if self.transport is not None:
            self.transport.write(frame(SETTINGS, ACK, 0))
        if not self.settled.done():
            self.settled.set_result(None)
        if self.blocked:
            self._flush()

    def _data(self, flags: int, stream_id: int, payload: bytes) -> None:
        counted = len(payload)
        if flags & PADDED:
            payload = payload[1 : len(payload) - payload[0]]
        self.unacked += counted
        if self.unacked >= self.receive_window // 2 and self.transport is not None:
            self.transport.write(frame(WINDOW_UPDATE, 0, 0, U32.pack(self.unacked)))
            self.unacked = 0
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        stream.unacked += counted
        if stream.unacked >= self.receive_window // 2 and not flags & END_STREAM and self.transport is not None:
            self.transport.write(frame(WINDOW_UPDATE, 0, stream_id, U32.pack(stream.unacked)))
            stream.unacked = 0
        if stream.on_message is not None:
            stream.buffer += payload
            for message in messages(stream.buffer):
                stream.on_message(message)
        if flags & END_STREAM:  # a reply that ends without trailers: no grpc-status
            self._finish(stream)

    def _header_frame(self, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        block = self._headers.feed(kind, flags, stream_id, payload)  # always fed: it may change the HPACK table
        if block is None:
            return
        stream_id, flags, fields = block
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        for name, value in fields:
            if name == b"grpc-status":
                code = int(value)
                stream.status = STATUS_NAMES[code] if 0 <= code < len(STATUS_NAMES) else "UNKNOWN"
            elif name == b"grpc-message":
                stream.message = percent_decoded(value)
            elif name == b":status":
                stream.http_status = value
        if flags & END_STREAM:
            self._finish(stream)

    def _finish(self, stream: _Stream) -> None:
        """The server ended the stream: its grpc-status, else what its HTTP status means to gRPC."""
        if stream.status is not None:
            self._end(stream, stream.status)
        elif stream.http_status not in (b"", b"200"):
            status = stream.http_status.decode(errors="replace")
            self._end(stream, _HTTP_STATUS.get(stream.http_status, "UNKNOWN"), f"HTTP status {status}")
        else:
            self._end(stream, "INTERNAL", "the reply ended without a grpc-status")


class Call:
    """A bidirectional stream in flight: :meth:`write` messages, :meth:`done_writing`, await :meth:`result`."""

    __slots__ = ("_conn", "_stream")

    def __init__(self, conn: Connection, stream: _Stream) -> None:
        self._conn = conn
        self._stream = stream

    def write(self, message: bytes) -> None:
        """Queue one message (never waits: flow control holds what the server's window cannot take yet)."""
        if self._stream.done.done():
            raise CallError(self._stream.done.result(), self._stream.message or "the stream has ended")
        self._conn._send(self._stream, b"\x00" + U32.pack(len(message)) + message, end=False)

    def done_writing(self) -> None:
        self._conn.end_stream(self._stream)

    def cancel(self) -> None:
        self._conn.cancel(self._stream)

    @property
    def message(self) -> str:
        """The server's ``grpc-message`` (or why the call ended), once it has."""
        return self._stream.message

    async def result(self) -> str:
        """The final status name, once the server has ended the stream."""
        return await self._stream.done


async def open_connection(target: str, timeout_s: float = 10.0, **kw: Any) -> Connection:
    """``HOST:PORT`` (IPv6 hosts in brackets) to an open connection."""
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"target must be HOST:PORT, got {target!r}")
    return await Connection.open(host.strip("[]"), int(port), timeout_s, **kw)

"""Ferry's own gRPC transport: gRPC over HTTP/2 (RFC 9113, gRPC's PROTOCOL-HTTP2) on asyncio, serving the same
servicers grpc.aio does.

Why: grpcio's server machinery costs ~400-700 µs of CPU per call on this machine (its C core, the Cython layer, the
thread that wakes the event loop), where Ferry's whole work on a `tiny` request is ~80-100 µs. Ferry's request
path over a few hundred lines of HTTP/2 on uvloop served 2.2-3.4x what it serves on grpc.aio (BENCHMARKS.md, "The
transport"). ``ferry serve --transport grpcio`` keeps grpc.aio.

What it serves: any servicer registered through the generated ``add_*Servicer_to_server`` functions
(:class:`Services` offers the two methods they call), with grpc.aio's calling conventions: ``async`` methods taking
``(request, context)``, request streams as async iterators, response streams written with ``context.write`` or
yielded by an async generator, ``context.abort`` for a status. Ferry's inference, health, reflection and outcome
services all run on it unchanged.

How a call runs: the request's header block is decoded (advertising an HPACK table of 0 bytes, so the blocks a
client repeats are decoded once each); a unary request runs when its message is complete, in the turn that read it:
the handler coroutine is stepped once in place, and only one that has to wait (a queued batch) becomes a task. So
a request the model answers at once costs no task, future or thread hop. Replies and the frames of one read go out
in one write.

HTTP/2 as a server must speak it, and the limits that keep one client from hurting the others:

- SETTINGS (ours: no HPACK table, ``max_concurrent_streams`` streams, 1 MiB stream and 16 MiB connection receive
  windows, 1 MiB frames, a 64 KiB header list); the client's are applied and acknowledged; PING answered;
- flow control both ways: DATA never exceeds the client's windows (what does not fit waits for WINDOW_UPDATE); the
  connection window is given back as bytes arrive, a unary stream's as its message arrives (the message size limit
  bounds it) and a request stream's as the handler reads its messages (a slow handler holds the client back);
  a client that sends past our windows loses the connection (FLOW_CONTROL_ERROR);
- limits: streams past ``max_concurrent_streams`` are refused (RST_STREAM REFUSED_STREAM, which gRPC clients
  retry); a message over ``max_message_bytes`` ends its call RESOURCE_EXHAUSTED as soon as its length prefix
  arrives; a header block over 1 MiB or a header list over 64 KiB ends the connection, as do frames over our frame
  size and a client that cancels streams faster than ``RESET_RATE`` (rapid reset: GOAWAY ENHANCE_YOUR_CALM); a
  connection that has not sent the HTTP/2 preface within ``PREFACE_TIMEOUT_S`` is closed;
- gRPC: ``grpc-timeout`` is the call's deadline (``context.time_remaining()``; a handler still running at the
  deadline is cancelled and the call ends DEADLINE_EXCEEDED); RST_STREAM or a lost connection cancels the handler;
  request metadata (``-bin`` values base64-decoded) is ``context.invocation_metadata()``; messages compressed with
  gzip or deflate are accepted (others: UNIMPLEMENTED), replies are not compressed; an unknown method is
  UNIMPLEMENTED; a body that does not parse is INTERNAL; a handler's unexpected exception is UNKNOWN (logged);
- shutdown (:meth:`Transport.stop`): no new connections, GOAWAY on each (streams the client opens later are
  refused), in-flight calls get the grace period, then are cancelled and the connections closed.

Not spoken: TLS (Ferry serves plaintext gRPC on a trusted network, as with grpcio), server push, HTTP/1.1.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import contextvars
import inspect
import logging
import time
import zlib
from collections import deque
from collections.abc import Callable, Generator, Iterable, Sequence
from typing import Any, cast

import grpc

from server.http2 import (
    ACK,
    CONTINUATION,
    DATA,
    DEFAULT_FRAME,
    DEFAULT_WINDOW,
    END_HEADERS,
    END_STREAM,
    ENHANCE_YOUR_CALM,
    FLOW_CONTROL_ERROR,
    FRAME_SIZE_ERROR,
    GOAWAY,
    HEADER_TABLE_SIZE,
    HEADERS,
    INITIAL_WINDOW_SIZE,
    MAX_CONCURRENT_STREAMS,
    MAX_FRAME_SIZE,
    MAX_HEADER_LIST_SIZE,
    MAX_WINDOW,
    NO_ERROR,
    PADDED,
    PING,
    PREFACE,
    PROTOCOL_ERROR,
    PUSH_PROMISE,
    REFUSED_STREAM,
    RST_STREAM,
    SETTING,
    SETTINGS,
    U32,
    WINDOW_UPDATE,
    HeaderBlocks,
    ProtocolError,
    frame,
    literal,
    parse_grpc_timeout,
    percent_encoded,
)

log = logging.getLogger(__name__)

STREAM_WINDOW = 1 << 20
"""Receive window we open per stream (given back as the handler consumes)."""
CONNECTION_WINDOW = 1 << 24
"""Receive window we open for the connection (given back as bytes arrive)."""
FRAME_LIMIT = 1 << 20
"""Largest frame payload we accept (SETTINGS_MAX_FRAME_SIZE)."""
HEADER_LIST_LIMIT = 1 << 16
"""Largest decoded request header list (SETTINGS_MAX_HEADER_LIST_SIZE)."""
RESET_RATE = 200.0
"""Streams a client may cancel per second on one connection, on average, with bursts of ``RESET_BURST``."""
RESET_BURST = 1000.0
PREFACE_TIMEOUT_S = 10.0
WRITE_HIGH_WATER = 1 << 20
"""Bytes a response stream may have waiting for the client's window before ``context.write`` waits."""

# reply header blocks: literal fields without indexing, so the client's HPACK state never changes
_OK_HEADERS = b"\x88" + literal(31, b"application/grpc")  # :status 200 (static 8), content-type (static 31)
_OK_TRAILERS = literal(b"grpc-status", b"0")
_ENCODINGS = "identity,deflate,gzip"
_RESERVED = frozenset(
    {b"content-type", b"te", b"grpc-timeout", b"grpc-encoding", b"grpc-accept-encoding", b"content-length"}
)
_UNARY, _SERVER_STREAM, _CLIENT_STREAM, _BIDI = 0, 1, 2, 3


class _Aborted(Exception):
    """``context.abort``: ends the handler; the call ends with this status."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class _Method:
    __slots__ = ("behavior", "deserialize", "kind", "serialize")

    def __init__(self, handler: grpc.RpcMethodHandler) -> None:
        self.kind = int(handler.response_streaming) | int(handler.request_streaming) << 1
        self.behavior = (handler.unary_unary, handler.unary_stream, handler.stream_unary, handler.stream_stream)[
            self.kind
        ]
        self.deserialize: Callable[[Any], Any] = handler.request_deserializer or bytes  # bytes or a memoryview
        self.serialize: Callable[[Any], bytes] = handler.response_serializer or bytes


class _Details:
    """The ``grpc.HandlerCallDetails`` a generic handler looks a method up by."""

    __slots__ = ("invocation_metadata", "method")

    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata: tuple[()] = ()


class Services:
    """The servicers a transport serves, registered the way generated code registers them on a grpc server."""

    def __init__(self) -> None:
        self._methods: dict[bytes, _Method] = {}
        self._generic: list[grpc.GenericRpcHandler] = []

    def add_generic_rpc_handlers(self, handlers: Iterable[grpc.GenericRpcHandler]) -> None:
        self._generic.extend(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        for name, handler in handlers.items():
            self._methods[f"/{service}/{name}".encode()] = _Method(handler)

    def lookup(self, path: bytes) -> _Method | None:
        method = self._methods.get(path)
        if method is None and self._generic:
            details = _Details(path.decode(errors="replace"))
            for generic in self._generic:
                handler = generic.service(details)
                if handler is not None:
                    method = self._methods[path] = _Method(handler)  # found ones only: the table stays bounded
                    break
        return method


class _Requests:
    """A request stream as the handler reads it (an async iterator of parsed messages); the stream's receive window
    is given back as messages are taken, so a client cannot queue more than a window ahead of the handler."""

    __slots__ = ("_conn", "_items", "_stream", "_waiter", "ended", "queued")

    def __init__(self, conn: _Connection, stream: _Stream) -> None:
        self._conn = conn
        self._stream = stream
        self._items: deque[tuple[Any, int]] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self.ended = False
        self.queued = 0  # bytes of messages received and not yet read

    def put(self, message: Any, size: int) -> None:
        self._items.append((message, size))
        self.queued += size
        self._wake()

    def end(self) -> None:
        self.ended = True
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def __aiter__(self) -> _Requests:
        return self

    async def __anext__(self) -> Any:
        while not self._items:
            if self.ended:
                raise StopAsyncIteration
            self._waiter = self._conn.loop.create_future()
            await self._waiter
        message, size = self._items.popleft()
        self.queued -= size
        self._conn.credit(self._stream)
        return message

    async def read(self) -> Any:
        """grpc.aio's ``context.read()``: the next message, or ``grpc.aio.EOF`` after the last."""
        try:
            return await self.__anext__()
        except StopAsyncIteration:
            return grpc.aio.EOF


class _Stream:
    """One call: what arrived of it, what waits to be sent, and the handler running it."""

    __slots__ = ("body", "closed", "context", "deadline", "encoding", "fields", "id", "method", "opened", "pending",
                 "remote_done", "requests", "task", "timer", "trailers", "unacked", "window", "writable")  # fmt: skip

    def __init__(self, stream_id: int, window: int, fields: list[tuple[bytes, bytes]]) -> None:
        self.id = stream_id
        self.fields = fields
        self.window = window  # what the client lets us send on this stream
        self.body = bytearray()  # received bytes of a message not yet complete
        self.unacked = 0  # received bytes not yet given back in a stream WINDOW_UPDATE
        self.method: _Method | None = None
        self.deadline: float | None = None  # loop time
        self.encoding = b""  # grpc-encoding of the request's compressed messages
        self.requests: _Requests | None = None
        self.context: Context | None = None
        self.task: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.opened = False  # our HEADERS are out
        self.pending = bytearray()  # DATA waiting for the client's window
        self.trailers: bytes | None = None  # to send once ``pending`` is out
        self.remote_done = False  # the client's END_STREAM arrived
        self.closed = False  # the call is over for us (its end is queued or sent)
        self.writable: asyncio.Future[None] | None = None  # a writer waiting for ``pending`` to drain


class Context:
    """What a servicer sees of its call: grpc.aio's ``ServicerContext`` methods that a server-side handler uses."""

    __slots__ = ("_code", "_conn", "_details", "_initial", "_metadata", "_stream", "_trailing")

    def __init__(self, conn: _Connection, stream: _Stream) -> None:
        self._conn = conn
        self._stream = stream
        self._metadata: tuple[tuple[str, str | bytes], ...] | None = None
        self._code: grpc.StatusCode | None = None
        self._details = ""
        self._trailing: Sequence[tuple[str, str | bytes]] = ()
        self._initial: Sequence[tuple[str, str | bytes]] = ()

    def invocation_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        if self._metadata is None:
            self._metadata = tuple(_metadata(self._stream.fields))
        return self._metadata

    def time_remaining(self) -> float | None:
        deadline = self._stream.deadline
        return None if deadline is None else max(0.0, deadline - self._conn.loop.time())

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Sequence[tuple[str, str | bytes]] = ()
    ) -> None:
        if code == grpc.StatusCode.OK:
            raise ValueError("abort() needs a status other than OK")
        if trailing_metadata:
            self._trailing = trailing_metadata
        raise _Aborted(code, details)

    async def write(self, message: Any) -> None:
        """Send one response message; waits only while the client's window holds back ``WRITE_HIGH_WATER`` bytes."""
        stream = self._stream
        if stream.closed:
            raise asyncio.CancelledError("the call has ended")
        data = stream.method.serialize(message)  # type: ignore[union-attr]  # set before the handler runs
        self._conn.send(stream, b"\x00" + U32.pack(len(data)) + data, self._initial)
        while len(stream.pending) > WRITE_HIGH_WATER and not stream.closed:
            stream.writable = self._conn.loop.create_future()
            await stream.writable

    async def read(self) -> Any:
        if self._stream.requests is None:
            raise RuntimeError("read() is for calls with a request stream")
        return await self._stream.requests.read()

    async def send_initial_metadata(self, metadata: Sequence[tuple[str, str | bytes]]) -> None:
        self._initial = metadata
        if not self._stream.opened:
            self._conn.send(self._stream, b"", metadata)

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

    def peer(self) -> str:
        return self._conn.peer

    def cancelled(self) -> bool:
        return self._stream.closed and self._stream.task is not None and self._stream.task.cancelled()

    def done(self) -> bool:
        return self._stream.closed

    def set_compression(self, compression: grpc.Compression) -> None:
        return None  # replies are sent uncompressed

    def disable_next_message_compression(self) -> None:
        return None


def _metadata(fields: list[tuple[bytes, bytes]]) -> Iterable[tuple[str, str | bytes]]:
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


def _header_block(metadata: Sequence[tuple[str, str | bytes]]) -> bytes:
    block = b""
    for key, value in metadata:
        raw = base64.b64encode(value).rstrip(b"=") if isinstance(value, bytes) else value.encode("latin-1")
        block += literal(key.lower().encode("ascii"), raw)
    return block


def _status_block(code: grpc.StatusCode, details: str, trailing: Sequence[tuple[str, str | bytes]]) -> bytes:
    if code == grpc.StatusCode.OK and not details and not trailing:
        return _OK_TRAILERS
    block = literal(b"grpc-status", str(code.value[0]).encode())
    if details:
        block += literal(b"grpc-message", percent_encoded(details))
    return block + _header_block(trailing)


class _Resume:
    """Continues a handler coroutine, already stepped once in place, inside a task: passes what it yields (the
    futures it waits on) up to the task, and what the task sends or throws (cancellation) down to it."""

    __slots__ = ("_coro", "_first")

    def __init__(self, coro: Any, first: Any) -> None:
        self._coro = coro
        self._first = first

    def __await__(self) -> Generator[Any, Any, None]:
        coro, waiting = self._coro, self._first
        while True:
            try:
                sent = yield waiting
            except BaseException as err:  # the task's cancellation, passed on to the handler
                try:
                    waiting = coro.throw(err)
                except StopIteration:
                    return
                continue
            try:
                waiting = coro.send(sent)
            except StopIteration:
                return


async def _resumed(coro: Any, first: Any) -> None:
    await _Resume(coro, first)


class _Connection(asyncio.Protocol):
    """One client connection."""

    def __init__(self, server: Transport) -> None:
        self.server = server
        self.services = server.services
        self.loop = asyncio.get_running_loop()
        self.max_message = server.max_message_bytes
        self.max_streams = server.max_concurrent_streams
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.buffer = bytearray()
        self.started = False
        self.headers = HeaderBlocks(max_block=1 << 20, max_list=HEADER_LIST_LIMIT)
        self.streams: dict[int, _Stream] = {}
        self.last_stream = 0  # highest stream id the client opened
        self.goaway_sent = False
        self.send_window = DEFAULT_WINDOW  # what the client lets us send on the connection
        self.peer_window = DEFAULT_WINDOW  # the client's initial stream window
        self.max_frame = DEFAULT_FRAME  # the client's largest frame
        self.received = 0  # connection-level bytes received and not yet given back
        self.blocked: dict[int, _Stream] = {}  # streams with DATA waiting for the client's window, in order
        self.out: list[bytes] = []
        self.reading = False  # inside data_received: writes go out together at its end
        self.flush_soon = False
        self.reset_tokens = RESET_BURST
        self.reset_at = time.monotonic()
        self.preface_timer: asyncio.TimerHandle | None = None

    # --- connection ------------------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self.peer = f"ipv6:[{peer[0]}]:{peer[1]}" if ":" in str(peer[0]) else f"ipv4:{peer[0]}:{peer[1]}"
        self.server.connections.add(self)
        ours = (
            SETTING.pack(HEADER_TABLE_SIZE, 0)
            + SETTING.pack(MAX_CONCURRENT_STREAMS, self.max_streams)
            + SETTING.pack(INITIAL_WINDOW_SIZE, STREAM_WINDOW)
            + SETTING.pack(MAX_FRAME_SIZE, FRAME_LIMIT)
            + SETTING.pack(MAX_HEADER_LIST_SIZE, HEADER_LIST_LIMIT)
        )
        grow = frame(WINDOW_UPDATE, 0, 0, U32.pack(CONNECTION_WINDOW - DEFAULT_WINDOW))
        self.transport.write(frame(SETTINGS, 0, 0, ours) + grow)
        self.preface_timer = self.loop.call_later(PREFACE_TIMEOUT_S, self._no_preface)

    def _no_preface(self) -> None:
        if not self.started and self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.server.connections.discard(self)
        if self.preface_timer is not None:
            self.preface_timer.cancel()
        for stream in list(self.streams.values()):
            self._drop(stream)
        self.streams.clear()
        self.blocked.clear()
        self.server.changed()

    def data_received(self, data: bytes) -> None:
        buf = self.buffer
        buf += data
        start = 0
        if not self.started:
            if len(buf) < len(PREFACE):
                if PREFACE[: len(buf)] != bytes(buf):
                    self._close()
                return
            if buf[: len(PREFACE)] != PREFACE:
                self._close()
                return
            start, self.started = len(PREFACE), True
            del buf[:start]
        self.reading = True
        view = memoryview(buf)  # DATA payloads are handed on as views: a large message is copied once, into its body
        pos = 0
        payload: bytes | memoryview = b""
        try:
            size = len(buf)
            while size - pos >= 9:
                length = buf[pos] << 16 | buf[pos + 1] << 8 | buf[pos + 2]
                if length > FRAME_LIMIT:
                    raise ProtocolError(FRAME_SIZE_ERROR, f"a frame of {length} bytes (ours: {FRAME_LIMIT})")
                end = pos + 9 + length
                if end > size:
                    break
                kind, flags, stream_id = buf[pos + 3], buf[pos + 4], U32.unpack_from(buf, pos + 5)[0] & 0x7FFFFFFF
                payload = view[pos + 9 : end] if kind == DATA else bytes(view[pos + 9 : end])
                pos = end
                self._frame(kind, flags, stream_id, payload)
                if self.transport is None:
                    return
            del payload
            view.release()
            try:
                del buf[:pos]
            except BufferError:  # a view of it outlived its frame: start a new buffer instead
                self.buffer = bytearray(buf[pos:])
            if self.received >= CONNECTION_WINDOW // 2:
                self.out.append(frame(WINDOW_UPDATE, 0, 0, U32.pack(self.received)))
                self.received = 0
        except ProtocolError as err:
            self._goaway(err.code, str(err))
        finally:
            view.release()
            self.reading = False
            self._write_out()

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _goaway(self, code: int, message: str) -> None:
        """End the connection (a protocol error): GOAWAY with the reason, then close."""
        log.info("closing gRPC connection from %s: %s", self.peer, message)
        self.out.append(frame(GOAWAY, 0, 0, U32.pack(self.last_stream) + U32.pack(code) + message.encode()[:256]))
        self._write_out()
        if self.transport is not None:
            self.transport.close()

    def going_away(self) -> None:
        """Graceful shutdown: streams up to the last one opened are served, later ones refused."""
        if not self.goaway_sent and self.transport is not None:
            self.goaway_sent = True
            self.emit(frame(GOAWAY, 0, 0, U32.pack(self.last_stream) + U32.pack(NO_ERROR)))

    # --- output ----------------------------------------------------------------------------------------------------

    def emit(self, data: bytes) -> None:
        self.out.append(data)
        if not self.reading and not self.flush_soon:
            self.flush_soon = True
            self.loop.call_soon(self._write_out)

    def _write_out(self) -> None:
        self.flush_soon = False
        if self.out:
            if self.transport is not None:
                self.transport.write(b"".join(self.out))
            self.out.clear()

    # --- frames ----------------------------------------------------------------------------------------------------

    def _frame(self, kind: int, flags: int, stream_id: int, payload: Any) -> None:
        """One frame; ``payload`` is bytes, or a memoryview for DATA (valid only during this call)."""
        opened = self.headers.open_block
        if opened is not None and (kind != CONTINUATION or stream_id != opened):
            raise ProtocolError(PROTOCOL_ERROR, "a frame inside a header block")
        if kind == DATA:
            self._data(flags, stream_id, payload)
        elif kind in (HEADERS, CONTINUATION):
            block = self.headers.feed(kind, flags, stream_id, payload)
            if block is not None:
                self._headers(*block)
        elif kind == SETTINGS:
            if stream_id != 0:
                raise ProtocolError(PROTOCOL_ERROR, "SETTINGS on a stream")
            if not flags & ACK:
                self._settings(payload)
        elif kind == WINDOW_UPDATE:
            if len(payload) != 4:
                raise ProtocolError(FRAME_SIZE_ERROR, "WINDOW_UPDATE of the wrong size")
            self._window_update(stream_id, U32.unpack(payload)[0] & 0x7FFFFFFF)
        elif kind == PING:
            if stream_id != 0:
                raise ProtocolError(PROTOCOL_ERROR, "PING on a stream")
            if len(payload) != 8:
                raise ProtocolError(FRAME_SIZE_ERROR, "a PING of the wrong size")
            if not flags & ACK:
                self.out.append(frame(PING, ACK, 0, payload))
        elif kind == RST_STREAM:
            if stream_id == 0:
                raise ProtocolError(PROTOCOL_ERROR, "RST_STREAM on stream 0")
            if len(payload) != 4:
                raise ProtocolError(FRAME_SIZE_ERROR, "RST_STREAM of the wrong size")
            self._reset(stream_id)
        elif kind == GOAWAY:
            self.going_away()  # the client will open no more streams: finish these, then it closes
        elif kind == PUSH_PROMISE:
            raise ProtocolError(PROTOCOL_ERROR, "PUSH_PROMISE from a client")
        # PRIORITY and unknown frame types are ignored (RFC 9113 §5.5)

    def _settings(self, payload: bytes) -> None:
        if len(payload) % 6:
            raise ProtocolError(FRAME_SIZE_ERROR, "SETTINGS of the wrong size")
        for offset in range(0, len(payload), 6):
            key, value = SETTING.unpack_from(payload, offset)
            if key == INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise ProtocolError(FLOW_CONTROL_ERROR, "initial window over 2^31-1")
                for stream in self.streams.values():
                    stream.window += value - self.peer_window
                self.peer_window = value
            elif key == MAX_FRAME_SIZE:
                if not DEFAULT_FRAME <= value <= (1 << 24) - 1:
                    raise ProtocolError(PROTOCOL_ERROR, f"max frame size {value}")
                self.max_frame = value
        self.out.append(frame(SETTINGS, ACK, 0))
        if self.blocked:
            self._flush()

    def _window_update(self, stream_id: int, grow: int) -> None:
        if stream_id == 0:
            if grow == 0:
                raise ProtocolError(PROTOCOL_ERROR, "a WINDOW_UPDATE of 0")
            self.send_window += grow
            if self.send_window > MAX_WINDOW:
                raise ProtocolError(FLOW_CONTROL_ERROR, "connection window over 2^31-1")
        elif (stream := self.streams.get(stream_id)) is not None:
            stream.window += grow
        if self.blocked:
            self._flush()

    def _reset(self, stream_id: int) -> None:
        stream = self.streams.pop(stream_id, None)
        if stream is None:
            return
        now = time.monotonic()
        self.reset_tokens = min(RESET_BURST, self.reset_tokens + (now - self.reset_at) * RESET_RATE) - 1
        self.reset_at = now
        self.blocked.pop(stream_id, None)
        self._drop(stream)
        self.server.changed()
        if self.reset_tokens < 0:
            raise ProtocolError(ENHANCE_YOUR_CALM, "too many streams cancelled")

    def _headers(self, stream_id: int, flags: int, fields: list[tuple[bytes, bytes]]) -> None:
        if stream_id == 0:
            raise ProtocolError(PROTOCOL_ERROR, "HEADERS on stream 0")
        stream = self.streams.get(stream_id)
        if stream is not None or stream_id <= self.last_stream:  # trailers (or late ones, of a stream that ended)
            if stream is None and any(key[:1] == b":" for key, _ in fields):
                raise ProtocolError(PROTOCOL_ERROR, f"a new stream {stream_id} below stream {self.last_stream}")
            if stream is not None and not stream.remote_done:
                if not flags & END_STREAM:
                    raise ProtocolError(PROTOCOL_ERROR, "trailers without END_STREAM")
                self._remote_end(stream)
            return
        if stream_id % 2 == 0:
            raise ProtocolError(PROTOCOL_ERROR, f"stream {stream_id} is a server stream id")
        self.last_stream = stream_id
        if self.goaway_sent or len(self.streams) >= self.max_streams:
            self.out.append(frame(RST_STREAM, 0, stream_id, U32.pack(REFUSED_STREAM)))
            return
        stream = self.streams[stream_id] = _Stream(stream_id, self.peer_window, fields)
        ending = bool(flags & END_STREAM)
        stream.remote_done = ending  # before any answer below: no RST_STREAM after the client's END_STREAM
        path = method = b""
        content_type = b""
        for key, value in fields:
            if key == b":path":
                path = value
            elif key == b":method":
                method = value
            elif key == b"content-type":
                content_type = value
            elif key == b"grpc-timeout":
                seconds = parse_grpc_timeout(value)
                if seconds is not None:
                    stream.deadline = self.loop.time() + seconds
                    stream.timer = self.loop.call_at(stream.deadline, self._expired, stream)
            elif key == b"grpc-encoding":
                stream.encoding = value
        if method != b"POST" or not content_type.startswith(b"application/grpc"):
            status = b"405" if method != b"POST" else b"415"
            self._answer_http(stream, status)
        elif (found := self.services.lookup(path)) is None:
            self._end(stream, grpc.StatusCode.UNIMPLEMENTED, f"Method not found: {path.decode(errors='replace')}")
        elif stream.encoding not in (b"", b"identity", b"gzip", b"deflate"):
            encoding = stream.encoding.decode(errors="replace")
            accepted = (("grpc-accept-encoding", _ENCODINGS),)
            self._end(stream, grpc.StatusCode.UNIMPLEMENTED, f"grpc-encoding {encoding} is not supported", accepted)
        else:
            stream.method = found
            stream.context = Context(self, stream)
            if found.kind & 2:  # a request stream: the handler starts now and reads messages as they come
                stream.requests = _Requests(self, stream)
                self._run(stream, stream.requests)
        if ending:
            self._remote_end(stream)

    def _data(self, flags: int, stream_id: int, payload: bytes | memoryview) -> None:
        counted = len(payload)
        self.received += counted
        if self.received > CONNECTION_WINDOW:
            raise ProtocolError(FLOW_CONTROL_ERROR, "data past the connection window")
        if flags & PADDED:
            if not payload or payload[0] >= len(payload):
                raise ProtocolError(PROTOCOL_ERROR, "padding longer than the DATA frame")
            payload = payload[1 : len(payload) - payload[0]]
        stream = self.streams.get(stream_id)
        if stream is None:
            if stream_id > self.last_stream or stream_id == 0:
                raise ProtocolError(PROTOCOL_ERROR, f"DATA on stream {stream_id}, never opened")
            return  # a stream that ended: the client may still be sending
        stream.unacked += counted
        if stream.unacked > STREAM_WINDOW:
            raise ProtocolError(FLOW_CONTROL_ERROR, f"data past stream {stream_id}'s window")
        if stream.remote_done:
            raise ProtocolError(PROTOCOL_ERROR, f"DATA on stream {stream_id} after its END_STREAM")
        ending = bool(flags & END_STREAM)
        stream.remote_done = ending
        if stream.closed:
            if ending:
                self._forget(stream)
        elif ending and stream.requests is None and not stream.body and stream.method is not None:
            self._unary(stream, payload)  # the usual small call: its one message in one frame, read from the frame
        else:
            body = stream.body
            body += payload
            self._messages(stream)
            self.credit(stream)
            if ending:
                self._remote_end(stream)

    def credit(self, stream: _Stream) -> None:
        """Give the stream's window back once half of it is used, unless the handler has half a window of messages
        still to read (it reads again: this is called then too)."""
        if stream.unacked < STREAM_WINDOW // 2 or stream.remote_done or stream.closed:
            return
        if stream.requests is None or stream.requests.queued < STREAM_WINDOW // 2:
            self.emit(frame(WINDOW_UPDATE, 0, stream.id, U32.pack(stream.unacked)))
            stream.unacked = 0

    def _messages(self, stream: _Stream) -> None:
        """Complete messages at the front of the stream's body: each goes to the handler (request stream) or is
        kept for the handler to start with (unary: at END_STREAM)."""
        body = stream.body
        while len(body) >= 5:
            size = U32.unpack_from(body, 1)[0]
            if size > self.max_message:
                message = f"Received message larger than max ({size} vs. {self.max_message})"
                self._end(stream, grpc.StatusCode.RESOURCE_EXHAUSTED, message)
                return
            if stream.requests is None:  # unary: parsed whole at END_STREAM
                if len(body) > 5 + size:
                    self._end(stream, grpc.StatusCode.INTERNAL, "a unary call needs exactly one request message")
                return
            if len(body) < 5 + size:
                return
            compressed, data = body[0], bytes(body[5 : 5 + size])
            del body[: 5 + size]
            request = self._parse(stream, compressed, data)
            if request is None:
                return
            stream.requests.put(request, 5 + size)

    def _parse(self, stream: _Stream, compressed: int, data: bytes | memoryview) -> Any:
        """A message's bytes to the request object; None (the call ended) when they cannot be read."""
        if compressed:
            if stream.encoding in (b"", b"identity"):
                self._end(stream, grpc.StatusCode.INTERNAL, "a compressed message without grpc-encoding")
                return None
            try:
                inflate = zlib.decompressobj(wbits=31 if stream.encoding == b"gzip" else 15)
                data = inflate.decompress(data, self.max_message + 1)
            except zlib.error as err:
                self._end(stream, grpc.StatusCode.INTERNAL, f"the message cannot be decompressed: {err}")
                return None
            if len(data) > self.max_message:
                message = f"Received message larger than max (over {self.max_message} decompressed)"
                self._end(stream, grpc.StatusCode.RESOURCE_EXHAUSTED, message)
                return None
        try:
            return stream.method.deserialize(data)  # type: ignore[union-attr]  # set for every running call
        except Exception as err:
            self._end(stream, grpc.StatusCode.INTERNAL, f"the request message cannot be parsed: {err}")
            return None

    def _remote_end(self, stream: _Stream) -> None:
        """The client's END_STREAM: a request stream ends; a unary call runs."""
        stream.remote_done = True
        if stream.closed:
            self._forget(stream)
            return
        if stream.requests is not None:
            stream.requests.end()
            return
        if stream.method is None:
            return
        body, stream.body = stream.body, bytearray()
        self._unary(stream, memoryview(body))

    def _unary(self, stream: _Stream, body: bytes | memoryview) -> None:
        """A unary call's whole body, at its END_STREAM: exactly one message, which the handler gets."""
        size = U32.unpack_from(body, 1)[0] if len(body) >= 5 else -1
        if size > self.max_message:
            message = f"Received message larger than max ({size} vs. {self.max_message})"
            self._end(stream, grpc.StatusCode.RESOURCE_EXHAUSTED, message)
        elif len(body) != 5 + size:
            self._end(stream, grpc.StatusCode.INTERNAL, "a unary call needs exactly one request message")
        elif (request := self._parse(stream, body[0], body[5:])) is not None:
            self._run(stream, request)

    # --- running handlers ------------------------------------------------------------------------------------------

    def _run(self, stream: _Stream, request: Any) -> None:
        """Start the handler: stepped once here, in its own context; a task only when it has to wait."""
        coro = self._call(stream, request)
        context = contextvars.copy_context()
        try:
            waiting = context.run(coro.send, None)
        except StopIteration:
            return
        stream.task = self.loop.create_task(_resumed(coro, waiting), context=context)

    async def _call(self, stream: _Stream, request: Any) -> None:
        method, context = stream.method, stream.context
        assert method is not None and context is not None
        try:
            if method.kind & 1:
                result = method.behavior(request, context)
                if inspect.isasyncgen(result):
                    async for reply in result:
                        await context.write(reply)
                elif inspect.isawaitable(result):
                    await result
                elif result is not None:  # a plain handler's iterator of replies
                    for reply in result:
                        await context.write(reply)
                self._end(stream, context._code or grpc.StatusCode.OK, context._details, context._trailing)
            else:
                reply = method.behavior(request, context)
                if inspect.isawaitable(reply):
                    reply = await reply
                code = context._code or grpc.StatusCode.OK
                if code != grpc.StatusCode.OK:
                    self._end(stream, code, context._details, context._trailing)
                elif reply is None:
                    self._end(stream, grpc.StatusCode.INTERNAL, "the method returned no response")
                else:
                    data = method.serialize(reply)
                    if len(data) > self.max_message:
                        message = f"Sent message larger than max ({len(data)} vs. {self.max_message})"
                        self._end(stream, grpc.StatusCode.RESOURCE_EXHAUSTED, message)
                        return
                    self._reply(stream, data, context)
        except _Aborted as err:
            self._end(stream, err.code, err.details, context._trailing)
        except asyncio.CancelledError:
            pass  # cancelled by the client, the deadline or shutdown: whoever cancelled ended the call
        except Exception as err:
            log.exception("%s failed", stream.fields and dict(stream.fields).get(b":path", b"?").decode())
            self._end(stream, grpc.StatusCode.UNKNOWN, f"Unexpected {type(err).__name__}: {err}")

    def _expired(self, stream: _Stream) -> None:
        stream.timer = None
        if not stream.closed:
            self._end(stream, grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")  # emit() flushes it

    def _drop(self, stream: _Stream) -> None:
        """The call is over without a reply (reset, lost connection): stop its handler."""
        stream.closed = True
        if stream.timer is not None:
            stream.timer.cancel()
        self._stop_handler(stream)

    def _stop_handler(self, stream: _Stream) -> None:
        """Cancel the call's handler (unless it is the one ending the call) and wake whatever it waits on here."""
        if stream.task is not None and not stream.task.done() and asyncio.current_task() is not stream.task:
            stream.task.cancel()
        if stream.writable is not None and not stream.writable.done():
            stream.writable.set_result(None)
        if stream.requests is not None:
            stream.requests.end()

    # --- replies ---------------------------------------------------------------------------------------------------

    def send(self, stream: _Stream, data: bytes, initial: Sequence[tuple[str, str | bytes]] = ()) -> None:
        """Response bytes on ``stream`` (our HEADERS first), within the client's windows."""
        if stream.closed:
            return
        if not stream.opened:
            stream.opened = True
            block = _OK_HEADERS + _header_block(initial) if initial else _OK_HEADERS
            self.emit(frame(HEADERS, END_HEADERS, stream.id, block))
        if not data:
            return
        if not stream.pending and len(data) <= min(self.send_window, stream.window, self.max_frame):
            self.send_window -= len(data)
            stream.window -= len(data)
            self.emit(frame(DATA, 0, stream.id, data))
            return
        stream.pending += data
        self.blocked[stream.id] = stream
        self._flush()

    def _reply(self, stream: _Stream, data: bytes, context: Context) -> None:
        """A unary call's reply and OK: HEADERS, DATA and trailers in one piece when the windows allow."""
        n = len(data) + 5
        if stream.closed:
            return
        if (
            stream.opened
            or context._initial
            or context._trailing
            or n > min(self.send_window, stream.window, self.max_frame)
        ):
            self.send(stream, b"\x00" + U32.pack(len(data)) + data, context._initial)
            self._end(stream, grpc.StatusCode.OK, "", context._trailing)
            return
        self.send_window -= n
        stream.window -= n
        stream.opened = stream.closed = True
        if stream.timer is not None:
            stream.timer.cancel()
            stream.timer = None
        sid = stream.id
        self.emit(
            frame(HEADERS, END_HEADERS, sid, _OK_HEADERS)
            + frame(DATA, 0, sid, b"\x00" + U32.pack(len(data)) + data)
            + frame(HEADERS, END_HEADERS | END_STREAM, sid, _OK_TRAILERS)
        )
        self._closed(stream)

    def _end(
        self,
        stream: _Stream,
        code: grpc.StatusCode,
        details: str = "",
        trailing: Sequence[tuple[str, str | bytes]] = (),
    ) -> None:
        """End the call with a status: trailers after its data (or Trailers-Only when nothing was sent)."""
        if stream.closed:
            return
        if stream.timer is not None:
            stream.timer.cancel()
            stream.timer = None
        status = _status_block(code, details, trailing)
        if not stream.opened:
            stream.opened = True
            stream.closed = True
            self.emit(frame(HEADERS, END_HEADERS | END_STREAM, stream.id, _OK_HEADERS + status))
            self._closed(stream)
            return
        stream.trailers = status
        if stream.pending:
            stream.closed = True  # no more writes; the trailers follow the pending data
            self.blocked[stream.id] = stream
            self._flush()
            return
        stream.closed = True
        self.emit(frame(HEADERS, END_HEADERS | END_STREAM, stream.id, status))
        self._closed(stream)

    def _answer_http(self, stream: _Stream, status: bytes) -> None:
        """A request that is not gRPC gets a bare HTTP status."""
        stream.opened = stream.closed = True
        self.emit(frame(HEADERS, END_HEADERS | END_STREAM, stream.id, literal(8, status)))
        self._closed(stream)

    def _closed(self, stream: _Stream) -> None:
        """Our side of the stream is done: stop the handler if it still runs; forget the stream once the client's
        side is done too (or tell it to stop sending)."""
        self._stop_handler(stream)
        if not stream.remote_done:
            self.emit(frame(RST_STREAM, 0, stream.id, U32.pack(NO_ERROR)))
        self._forget(stream)

    def _forget(self, stream: _Stream) -> None:
        if self.streams.pop(stream.id, None) is not None:
            self.server.changed()

    def _flush(self) -> None:
        """Send what the windows allow of the blocked streams' data, in order; trailers once a stream's is out."""
        for stream_id, stream in list(self.blocked.items()):
            pending = stream.pending
            while pending and self.send_window > 0 and stream.window > 0:
                n = min(len(pending), self.send_window, stream.window, self.max_frame)
                self.emit(frame(DATA, 0, stream_id, bytes(pending[:n])))
                del pending[:n]
                self.send_window -= n
                stream.window -= n
            if pending:
                if self.send_window <= 0:
                    break
                continue
            del self.blocked[stream_id]
            if stream.writable is not None and not stream.writable.done():
                stream.writable.set_result(None)
            if stream.trailers is not None:
                self.emit(frame(HEADERS, END_HEADERS | END_STREAM, stream_id, stream.trailers))
                self._closed(stream)


class Transport:
    """Serves :class:`Services` on one TCP address; :meth:`start`, then :meth:`stop`."""

    def __init__(
        self, services: Services, max_message_bytes: int = 64 << 20, max_concurrent_streams: int = 4096
    ) -> None:
        self.services = services
        self.max_message_bytes = max_message_bytes
        self.max_concurrent_streams = max_concurrent_streams
        self.connections: set[_Connection] = set()
        self._server: asyncio.Server | None = None
        self._idle: asyncio.Event | None = None

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (``port`` 0: any free port); returns the port. Raises OSError if it is taken."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self), host.strip("[]"), port, reuse_address=True, backlog=1024
        )
        return int(self._server.sockets[0].getsockname()[1])

    def changed(self) -> None:
        if self._idle is not None and not any(c.streams for c in self.connections):
            self._idle.set()

    async def stop(self, grace_s: float) -> None:
        """No new connections; GOAWAY on each; calls in flight get ``grace_s`` seconds, then are cancelled."""
        if self._server is None:
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
                conn._end(stream, grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
                conn._drop(stream)
            conn._write_out()
            conn._close()
        await asyncio.sleep(0)  # connections close on the next loop turn
        self._server = None


__all__ = ["Context", "Services", "Transport"]

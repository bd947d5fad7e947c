"""The write side of a connection: streams' replies framed and sent within the client's flow-control windows,
header blocks encoded (:class:`~ferry.server.transport.headers.ReplyEncoder`), a call's end (trailers, or
Trailers-Only), and the output of one event-loop turn gathered into one write.

Windows: the client's initial stream window (``peer_window``, from its SETTINGS) is kept once for the connection
and each stream holds only its ``credit`` relative to it, so a SETTINGS change is one assignment however many
streams are open. Streams with data the windows hold back wait in ``blocked`` (the connection window is the
limit: sent in order as it opens) or ``stalled`` (their own window is: sent when it opens)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING

import grpc

from ferry.server.transport.headers import ReplyEncoder, metadata_block
from ferry.server.transport.http2 import (
    DATA,
    DEFAULT_FRAME,
    DEFAULT_WINDOW,
    END_HEADERS,
    END_STREAM,
    HEADERS,
    NO_ERROR,
    RST_STREAM,
    U32,
    Fields,
    frame,
    literal,
)
from ferry.server.transport.limits import Limits

if TYPE_CHECKING:
    from ferry.server.transport.calls import Context, Method, Requests


class Stream:
    """One call: what arrived of it, what waits to be sent, and the handler running it."""

    __slots__ = ("body", "closed", "context", "credit", "deadline", "encoding", "fields", "id", "method", "opened",
                 "pending", "remote_done", "requests", "task", "timer", "trailers", "unacked", "writable")  # fmt: skip

    def __init__(self, stream_id: int, fields: Fields) -> None:
        self.id = stream_id
        self.fields = fields
        self.credit = 0  # what the client lets us send on this stream, beyond its initial window
        self.body = bytearray()  # received bytes of a message not yet complete
        self.unacked = 0  # received bytes not yet given back in a stream WINDOW_UPDATE
        self.method: Method | None = None
        self.deadline: float | None = None  # loop time
        self.encoding = b""  # grpc-encoding of the request's compressed messages
        self.requests: Requests | None = None
        self.context: Context | None = None
        self.task: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.opened = False  # our HEADERS are out
        self.pending = bytearray()  # DATA waiting for the client's windows
        self.trailers: tuple[grpc.StatusCode, str, bytes] | None = None  # the end, once ``pending`` is out
        self.remote_done = False  # the client's END_STREAM arrived
        self.closed = False  # the call is over for us (its end is queued or sent)
        self.writable: asyncio.Future[None] | None = None  # a writer waiting for ``pending`` to drain


class Output:
    """A connection's output; :class:`~ferry.server.transport.connection.Connection` is one."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, Stream] = {}
        self.encoder = ReplyEncoder()
        self.send_window = DEFAULT_WINDOW  # what the client lets us send on the connection
        self.peer_window = DEFAULT_WINDOW  # the client's initial stream window
        self.max_frame = DEFAULT_FRAME  # the client's largest frame
        self.blocked: dict[int, Stream] = {}  # data waiting for the connection window, in order
        self.stalled: dict[int, Stream] = {}  # data waiting for the stream's own window
        self.out: list[bytes] = []
        self.reading = False  # inside a read: writes go out together at its end
        self.flush_soon = False
        self.sent = False  # replies went out since the client's last PING (gRPC: pings beside traffic are free)

    # hooks for the connection
    def stop_handler(self, stream: Stream) -> None:
        raise NotImplementedError

    def forget(self, stream: Stream) -> None:
        raise NotImplementedError

    # --- bytes out -------------------------------------------------------------------------------------------------

    def emit(self, data: bytes) -> None:
        self.out.append(data)
        if not self.reading and not self.flush_soon:
            self.flush_soon = True
            self.loop.call_soon(self.write_out)

    def write_out(self) -> None:
        self.flush_soon = False
        if self.out:
            if self.transport is not None:
                self.transport.write(b"".join(self.out))
            self.out.clear()

    def room(self, stream: Stream) -> int:
        """What the windows let us send on ``stream`` now."""
        return min(self.send_window, self.peer_window + stream.credit)

    # --- replies ---------------------------------------------------------------------------------------------------

    def send(self, stream: Stream, data: bytes, initial: Sequence[tuple[str, str | bytes]] = ()) -> None:
        """Response bytes on ``stream`` (our HEADERS first), within the client's windows."""
        if stream.closed:
            return
        self.sent = True
        if not stream.opened:
            stream.opened = True
            block = self.encoder.headers(metadata_block(initial) if initial else b"")
            self.emit(frame(HEADERS, END_HEADERS, stream.id, block))
        if not data:
            return
        n = len(data)
        if not stream.pending and n <= self.max_frame and n <= self.room(stream):
            self.send_window -= n
            stream.credit -= n
            self.emit(frame(DATA, 0, stream.id, data))
            return
        stream.pending += data
        if stream.id not in self.stalled:
            self.blocked[stream.id] = stream
            self.flush()

    def reply(self, stream: Stream, data: bytes, context: Context) -> None:
        """A unary call's reply and OK: HEADERS, DATA and trailers in one piece when the windows allow."""
        if stream.closed:
            return
        n = len(data) + 5
        if stream.opened or context._initial or context._trailing or n > self.max_frame or n > self.room(stream):
            self.send(stream, b"\x00" + U32.pack(len(data)) + data, context._initial)
            self.end(stream, grpc.StatusCode.OK, "", context._trailing)
            return
        self.send_window -= n
        stream.credit -= n
        stream.opened = stream.closed = True
        self.sent = True
        if stream.timer is not None:
            stream.timer.cancel()
            stream.timer = None
        sid = stream.id
        encoder = self.encoder
        self.emit(
            frame(HEADERS, END_HEADERS, sid, encoder.headers())
            + frame(DATA, 0, sid, b"\x00" + U32.pack(len(data)) + data)
            + frame(HEADERS, END_HEADERS | END_STREAM, sid, encoder.trailers(grpc.StatusCode.OK))
        )
        self.closed_stream(stream)

    def end(
        self,
        stream: Stream,
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
        extra = metadata_block(trailing) if trailing else b""
        stream.closed = True
        if not stream.opened:
            stream.opened = True
            block = self.encoder.trailers_only(code, details, extra)
            self.emit(frame(HEADERS, END_HEADERS | END_STREAM, stream.id, block))
            self.closed_stream(stream)
            return
        if stream.pending:  # the trailers follow the pending data; encoded when they go (HPACK order is send order)
            stream.trailers = (code, details, extra)
            return
        self.emit(frame(HEADERS, END_HEADERS | END_STREAM, stream.id, self.encoder.trailers(code, details, extra)))
        self.closed_stream(stream)

    def answer_http(self, stream: Stream, status: bytes) -> None:
        """A request that is not gRPC gets a bare HTTP status."""
        stream.opened = stream.closed = True
        self.emit(frame(HEADERS, END_HEADERS | END_STREAM, stream.id, literal(8, status)))
        self.closed_stream(stream)

    def closed_stream(self, stream: Stream) -> None:
        """Our side of the stream is done: stop the handler if it still runs; forget the stream once the client's
        side is done too (or tell it to stop sending)."""
        self.stop_handler(stream)
        if not stream.remote_done:
            self.emit(frame(RST_STREAM, 0, stream.id, U32.pack(NO_ERROR)))
        self.forget(stream)

    def unblock(self, stream: Stream) -> None:
        """The stream's window grew: its held-back data may go."""
        if self.stalled.pop(stream.id, None) is not None:
            self.blocked[stream.id] = stream
            self.flush()

    def flush(self) -> None:
        """Send what the windows allow of the blocked streams' data, in order; trailers once a stream's is out. A
        stream out of window of its own moves to ``stalled``, so a pass costs the streams that can send."""
        for stream_id, stream in list(self.blocked.items()):
            if self.send_window <= 0:
                break
            pending = stream.pending
            while pending and (n := min(len(pending), self.room(stream), self.max_frame)) > 0:
                self.emit(frame(DATA, 0, stream_id, bytes(pending[:n])))
                del pending[:n]
                self.send_window -= n
                stream.credit -= n
            if pending:
                if self.peer_window + stream.credit <= 0:
                    del self.blocked[stream_id]
                    self.stalled[stream_id] = stream
                continue  # or the connection window ran out: it keeps its place
            del self.blocked[stream_id]
            if stream.writable is not None and not stream.writable.done():
                stream.writable.set_result(None)
            if stream.trailers is not None:
                code, details, extra = stream.trailers
                stream.trailers = None
                block = self.encoder.trailers(code, details, extra)
                self.emit(frame(HEADERS, END_HEADERS | END_STREAM, stream_id, block))
                self.closed_stream(stream)

    def discard(self, stream: Stream) -> None:
        self.blocked.pop(stream.id, None)
        self.stalled.pop(stream.id, None)


__all__ = ["Output", "Stream"]

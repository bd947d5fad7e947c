"""One client connection, the read side: frames parsed from the bytes as they arrive, each answered as HTTP/2 asks
(RFC 9113) within the connection's :class:`~ferry.server.transport.limits.Limits`, and gRPC calls started.

Bounded work: a connection is read only while its unsent output is under the high-water mark and gets
``turn_budget_s`` of frame processing per event-loop turn (the rest waits for the next turn, reading paused);
frames that carry no request spend a token bucket; every reset spends another; header blocks are bounded in
size and HPACK work; SETTINGS cost O(1) whatever the number of streams. Passing a bound ends the connection with
GOAWAY ENHANCE_YOUR_CALM (or the RFC's code for a protocol error); a malformed request or a bad frame on one
stream ends that stream (RST_STREAM), and the connection goes on."""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import math
import random
import ssl
import time
import zlib
from typing import TYPE_CHECKING, Any, cast

import grpc

from ferry.server.security.tls import AuthContext, auth_context
from ferry.server.transport.calls import Aborted, Context, Handler, Requests
from ferry.server.transport.headers import request_problem, trailers_problem
from ferry.server.transport.http2 import (
    ACK,
    CONTINUATION,
    DATA,
    DEFAULT_FRAME,
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
    PRIORITY,
    PRIORITY_FRAME,
    PROTOCOL_ERROR,
    PUSH_PROMISE,
    REFUSED_STREAM,
    RST_STREAM,
    SETTING,
    SETTINGS,
    U32,
    WINDOW_UPDATE,
    Fields,
    HeaderBlocks,
    ProtocolError,
    frame,
    parse_grpc_timeout,
)
from ferry.server.transport.limits import Budget
from ferry.server.transport.output import Output, Stream

if TYPE_CHECKING:
    from ferry.server.transport.server import Transport

log = logging.getLogger("ferry.server.transport")

ENCODINGS = "identity,deflate,gzip"
LAST_STREAM_ID = (1 << 31) - 1
GOAWAY_PING = b"ferry-ga"  # the PING after the first GOAWAY of a graceful one (gRFC A9, as grpc-core does)


class Connection(Output, asyncio.Protocol):
    """One client connection."""

    def __init__(self, server: Transport) -> None:
        super().__init__(server.limits)
        limits = self.limits
        self.server = server
        self.services = server.services
        self.peer = ""
        self.buffer = bytearray()
        self.started = False
        self.headers = HeaderBlocks(max_block=limits.max_header_block_bytes, max_list=limits.max_header_list_bytes)
        self.last_stream = 0  # highest stream id the client opened
        self.goaway_sent = False
        self.received = 0  # connection-level bytes received and not yet given back
        self.acked = False  # the client acknowledged our SETTINGS
        self.control = Budget(limits.control_frames_per_s, limits.control_frame_burst)
        self.resets = Budget(limits.resets_per_s, limits.reset_burst)
        self.preface_timer: asyncio.TimerHandle | None = None
        self.write_paused = False  # the client is not reading what we send
        self.deferred = False  # frames left over from a turn wait for the next
        self.reads_paused = False
        self.top_credit = 0  # the most credit any stream was given: a bound on every stream's
        self.ssl_object: ssl.SSLObject | None = None  # under TLS: the connection's, once its handshake completed
        self._auth: AuthContext | None = None
        self.strikes = 0  # PINGs too soon after the last one while we sent nothing (keepalive enforcement)
        self.last_ping = -math.inf  # loop time of the client's last PING
        self.retiring = False  # asked to go away (age, idle): closed once its streams are done
        self.idle_since = 0.0  # loop time the last stream ended (or the connection opened)
        self.age_timer: asyncio.TimerHandle | None = None  # the age, then the age grace
        self.idle_timer: asyncio.TimerHandle | None = None
        self.final_timer: asyncio.TimerHandle | None = None  # the final GOAWAY, if the PING's ACK is late

    # --- connection ------------------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        limits = self.limits
        self.transport.set_write_buffer_limits(high=limits.write_high_water_bytes)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self.peer = f"ipv6:[{peer[0]}]:{peer[1]}" if ":" in str(peer[0]) else f"ipv4:{peer[0]}:{peer[1]}"
        if self.server.tls:  # the handshake completed (asyncio calls this after it); HTTP/2 needs ALPN h2
            self.ssl_object = transport.get_extra_info("ssl_object")
            alpn = self.ssl_object.selected_alpn_protocol() if self.ssl_object is not None else None
            if alpn != "h2":
                log.info("closing TLS connection from %s: ALPN chose %r, not h2", self.peer, alpn)
                self.transport.close()
                return
        self.server.connections.add(self)
        ours = (
            SETTING.pack(HEADER_TABLE_SIZE, 0)
            + SETTING.pack(MAX_CONCURRENT_STREAMS, limits.max_concurrent_streams)
            + SETTING.pack(INITIAL_WINDOW_SIZE, limits.stream_window_bytes)
            + SETTING.pack(MAX_FRAME_SIZE, limits.max_frame_bytes)
            + SETTING.pack(MAX_HEADER_LIST_SIZE, limits.max_header_list_bytes)
        )
        grow = frame(WINDOW_UPDATE, 0, 0, U32.pack(limits.connection_window_bytes - 65_535))
        self.transport.write(frame(SETTINGS, 0, 0, ours) + grow)
        self.preface_timer = self.loop.call_later(limits.preface_timeout_s, self._no_preface)
        if limits.max_connection_age_s:  # jitter: connections made together do not all go away together
            self.age_timer = self.loop.call_later(limits.max_connection_age_s * random.uniform(0.9, 1.1), self._aged)
        if limits.idle_timeout_s:
            self.idle_since = self.loop.time()
            self.idle_timer = self.loop.call_later(limits.idle_timeout_s, self._idle_check)

    def _no_preface(self) -> None:
        if not self.started and self.transport is not None:
            self.transport.close()

    def auth_context(self) -> AuthContext:
        """gRPC's auth_context of this connection (:func:`ferry.server.security.tls.auth_context`), made once."""
        if self._auth is None:
            self._auth = auth_context(self.ssl_object)
        return self._auth

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.server.connections.discard(self)
        for timer in (self.preface_timer, self.age_timer, self.idle_timer, self.final_timer):
            if timer is not None:
                timer.cancel()
        for stream in list(self.streams.values()):
            self.drop(stream)
        self.streams.clear()
        self.blocked.clear()
        self.stalled.clear()
        self.buffer = bytearray()
        self.server.changed()

    def pause_writing(self) -> None:
        """The client has not read a high-water mark of our output: read nothing more from it until it does."""
        self.write_paused = True
        self._reads()

    def resume_writing(self) -> None:
        self.write_paused = False
        self._reads()

    def _reads(self) -> None:
        pause = self.write_paused or self.deferred
        if pause != self.reads_paused and self.transport is not None:
            self.reads_paused = pause
            if pause:
                self.transport.pause_reading()
            else:
                self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.deferred:
            self._process()

    def _continue(self) -> None:
        self.deferred = False
        if self.transport is not None:
            self._process()
            self._reads()

    def _process(self) -> None:
        """Handle the complete frames in the buffer, for at most ``turn_budget_s``; what is left waits for the next
        turn of the loop, with reading paused meanwhile."""
        buf = self.buffer
        if not self.started:
            if len(buf) < len(PREFACE):
                if PREFACE[: len(buf)] != bytes(buf):
                    self.close()
                return
            if buf[: len(PREFACE)] != PREFACE:
                self.close()
                return
            self.started = True
            del buf[: len(PREFACE)]
        self.reading = True
        view = memoryview(buf)  # DATA payloads are handed on as views: a large message is copied once, into its body
        pos = handled = 0
        payload: bytes | memoryview = b""
        limit = self.limits.max_frame_bytes
        turn_ends = time.perf_counter() + self.limits.turn_budget_s
        try:
            size = len(buf)
            while size - pos >= 9:
                length = buf[pos] << 16 | buf[pos + 1] << 8 | buf[pos + 2]
                if length > limit:
                    raise ProtocolError(FRAME_SIZE_ERROR, f"a frame of {length} bytes (ours: {limit})")
                end = pos + 9 + length
                if end > size:
                    break
                kind, flags, stream_id = buf[pos + 3], buf[pos + 4], U32.unpack_from(buf, pos + 5)[0] & 0x7FFFFFFF
                payload = view[pos + 9 : end] if kind == DATA else bytes(view[pos + 9 : end])
                pos = end
                self.frame(kind, flags, stream_id, payload)
                if self.transport is None:
                    return
                handled += 1
                if not handled & 15 and time.perf_counter() > turn_ends and size - pos >= 9:
                    self.deferred = True  # the rest next turn: other connections' frames and replies go first
                    self.loop.call_soon(self._continue)
                    self._reads()
                    break
            del payload
            view.release()
            try:
                del buf[:pos]
            except BufferError:  # a view of it outlived its frame: start a new buffer instead
                self.buffer = bytearray(buf[pos:])
            if self.received >= self.limits.connection_window_bytes // 2:
                self.out.append(frame(WINDOW_UPDATE, 0, 0, U32.pack(self.received)))
                self.received = 0
        except ProtocolError as err:
            self.goaway(err.code, str(err))
        finally:
            view.release()
            self.reading = False
            self.write_out()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def goaway(self, code: int, message: str) -> None:
        """End the connection (a protocol error or a limit passed): GOAWAY with the reason, then close."""
        log.info("closing gRPC connection from %s: %s", self.peer, message)
        self.out.append(frame(GOAWAY, 0, 0, U32.pack(self.last_stream) + U32.pack(code) + message.encode()[:256]))
        self.write_out()
        if self.transport is not None:
            self.transport.close()

    def going_away(self) -> None:
        """Graceful shutdown: streams up to the last one opened are served, later ones refused."""
        if not self.goaway_sent and self.transport is not None:
            self.goaway_sent = True
            if self.final_timer is not None:
                self.final_timer.cancel()
            self.emit(frame(GOAWAY, 0, 0, U32.pack(self.last_stream) + U32.pack(NO_ERROR)))
            if self.retiring and not self.streams:
                self.loop.call_soon(self.close)  # after the GOAWAY is written (emit flushes first)

    def retire(self, reason: str) -> None:
        """Ask the client to go away without losing a call (gRFC A9, grpc-core's two-step GOAWAY): GOAWAY with the
        last stream id 2^31-1 (streams in flight towards us are still served) and a PING; at its ACK (a round trip:
        every stream the client opened before it has arrived) the final GOAWAY names the last stream opened. The
        connection closes once its streams are done."""
        if self.retiring or self.goaway_sent or self.transport is None:
            return
        log.debug("gRPC connection from %s goes away: %s", self.peer, reason)
        self.retiring = True
        first = U32.pack(LAST_STREAM_ID) + U32.pack(NO_ERROR) + reason.encode()
        self.emit(frame(GOAWAY, 0, 0, first) + frame(PING, 0, 0, GOAWAY_PING))
        self.final_timer = self.loop.call_later(self.limits.goaway_ping_timeout_s, self.going_away)

    def _aged(self) -> None:
        self.retire("max_age")
        self.age_timer = self.loop.call_later(self.limits.max_connection_age_grace_s, self._age_grace_over)

    def _age_grace_over(self) -> None:
        """Calls still running after the age grace are ended (UNAVAILABLE: retryable) and the connection closed."""
        self.age_timer = None
        self.going_away()
        for stream in list(self.streams.values()):
            self.end(stream, grpc.StatusCode.UNAVAILABLE, "the connection reached its maximum age")
            self.drop(stream)
        self.write_out()
        self.close()

    def _idle_check(self) -> None:
        self.idle_timer = None
        if self.transport is None or self.retiring or self.goaway_sent:
            return
        idle, now = self.limits.idle_timeout_s, self.loop.time()
        if not self.streams and now - self.idle_since >= idle:
            self.retire("idle")
            return
        due = now + idle if self.streams else self.idle_since + idle
        self.idle_timer = self.loop.call_at(due, self._idle_check)

    def _ping(self, flags: int, payload: bytes) -> None:
        """A PING: an ACK (ours after a GOAWAY moves the shutdown on), or the client's, answered. A PING while we
        sent nothing since the last one spends the control budget, and one sooner than ``keepalive_min_time_s``
        after it is a strike (gRPC's keepalive enforcement); PINGs beside our replies are free (BDP probes)."""
        if flags & ACK:
            self._cheap("PINGs")
            if payload == GOAWAY_PING and self.retiring:
                self.going_away()
            return
        if self.sent:
            self.strikes = 0
        else:
            self._cheap("PINGs")
            now = self.loop.time()
            if now - self.last_ping < self.limits.keepalive_min_time_s:
                self.strikes += 1
                if self.strikes > self.limits.max_ping_strikes:
                    raise ProtocolError(ENHANCE_YOUR_CALM, "too_many_pings")
            self.last_ping = now
        self.sent = False
        self.out.append(frame(PING, ACK, 0, payload))

    def _cheap(self, what: str) -> None:
        """A frame that costs us work and carries no request: spends the control budget."""
        if not self.control.spend():
            raise ProtocolError(ENHANCE_YOUR_CALM, f"too many {what}")

    def stream_error(self, stream_id: int, code: int, message: str) -> None:
        """End one stream for a protocol error (RFC 9113 §5.4.2); the connection goes on."""
        log.debug("resetting stream %d from %s: %s", stream_id, self.peer, message)
        self.out.append(frame(RST_STREAM, 0, stream_id, U32.pack(code)))
        stream = self.streams.get(stream_id)
        if stream is not None:
            stream.remote_done = True  # nothing more comes from the client on a reset stream
            self.drop(stream)
            self.forget(stream)

    # --- frames ----------------------------------------------------------------------------------------------------

    def frame(self, kind: int, flags: int, stream_id: int, payload: Any) -> None:
        """One frame; ``payload`` is bytes, or a memoryview for DATA (valid only during this call)."""
        opened = self.headers.open_block
        if opened is not None and (kind != CONTINUATION or stream_id != opened):
            raise ProtocolError(PROTOCOL_ERROR, "a frame inside a header block")
        if kind == DATA:
            if not payload and not flags & END_STREAM:
                self._cheap("empty DATA frames")
            self._data(flags, stream_id, payload)
        elif kind == HEADERS:
            block = self.headers.feed(kind, flags, stream_id, payload)
            if flags & PRIORITY and _depends_on_itself(flags, stream_id, payload):
                if block is None:  # its CONTINUATION frames still come and are decoded: HPACK state is shared
                    raise ProtocolError(PROTOCOL_ERROR, f"stream {stream_id} depends on itself")
                self.last_stream = max(self.last_stream, stream_id)
                self.stream_error(stream_id, PROTOCOL_ERROR, "a stream that depends on itself")
            elif block is not None:
                self._headers(*block)
        elif kind == CONTINUATION:
            if not payload and not flags & END_HEADERS:
                self._cheap("empty CONTINUATION frames")
            block = self.headers.feed(kind, flags, stream_id, payload)
            if block is not None:
                self._headers(*block)
        elif kind == SETTINGS:
            self._cheap("SETTINGS frames")
            if stream_id != 0:
                raise ProtocolError(PROTOCOL_ERROR, "SETTINGS on a stream")
            if flags & ACK:
                if payload:
                    raise ProtocolError(FRAME_SIZE_ERROR, "a SETTINGS ACK with a payload")
                if not self.acked:
                    self.acked = True
                    self.headers.table_acknowledged()
            else:
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
            self._ping(flags, payload)
        elif kind == RST_STREAM:
            if stream_id == 0:
                raise ProtocolError(PROTOCOL_ERROR, "RST_STREAM on stream 0")
            if len(payload) != 4:
                raise ProtocolError(FRAME_SIZE_ERROR, "RST_STREAM of the wrong size")
            self._reset(stream_id)
        elif kind == PRIORITY_FRAME:
            self._cheap("PRIORITY frames")
            if stream_id == 0:
                raise ProtocolError(PROTOCOL_ERROR, "PRIORITY on stream 0")
            if len(payload) != 5:
                self.stream_error(stream_id, FRAME_SIZE_ERROR, "a PRIORITY frame of the wrong size")
            elif U32.unpack_from(payload)[0] & 0x7FFFFFFF == stream_id:
                self.stream_error(stream_id, PROTOCOL_ERROR, "a stream that depends on itself")
        elif kind == GOAWAY:
            self._cheap("GOAWAY frames")
            self.going_away()  # the client will open no more streams: finish these, then it closes
        elif kind == PUSH_PROMISE:
            raise ProtocolError(PROTOCOL_ERROR, "PUSH_PROMISE from a client")
        else:
            self._cheap("frames of unknown types")  # ignored (RFC 9113 §5.5), but not for free

    def _settings(self, payload: bytes) -> None:
        if len(payload) % 6:
            raise ProtocolError(FRAME_SIZE_ERROR, "SETTINGS of the wrong size")
        if len(payload) > 6 * self.limits.max_settings_entries:
            raise ProtocolError(ENHANCE_YOUR_CALM, f"over {self.limits.max_settings_entries} entries in SETTINGS")
        window = self.peer_window
        for offset in range(0, len(payload), 6):
            key, value = SETTING.unpack_from(payload, offset)
            if key == INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise ProtocolError(FLOW_CONTROL_ERROR, "initial window over 2^31-1")
                window = value
            elif key == MAX_FRAME_SIZE:
                if not DEFAULT_FRAME <= value <= (1 << 24) - 1:
                    raise ProtocolError(PROTOCOL_ERROR, f"max frame size {value}")
                self.max_frame = value
            elif key == HEADER_TABLE_SIZE:
                self.encoder.table_size(value)
        if window != self.peer_window:
            # Streams' windows are credits on top of the initial window: one assignment moves them all. A stream
            # window past 2^31-1 is a FLOW_CONTROL_ERROR (RFC 9113 §6.9.2); only a stream given credit can get there.
            top = self.top_credit  # rarely near the limit: only then look at every stream
            if (
                window + top > MAX_WINDOW
                and window + max((s.credit for s in self.streams.values()), default=0) > MAX_WINDOW
            ):
                raise ProtocolError(FLOW_CONTROL_ERROR, "a stream window over 2^31-1 after SETTINGS")
            grew = window > self.peer_window
            self.peer_window = window
            if grew and self.stalled:
                self.blocked.update(self.stalled)
                self.stalled.clear()
        self.out.append(frame(SETTINGS, ACK, 0))
        if self.blocked:
            self.flush()

    def _window_update(self, stream_id: int, grow: int) -> None:
        if stream_id == 0:
            if grow == 0:
                raise ProtocolError(PROTOCOL_ERROR, "a WINDOW_UPDATE of 0")
            self.send_window += grow
            if self.send_window > MAX_WINDOW:
                raise ProtocolError(FLOW_CONTROL_ERROR, "connection window over 2^31-1")
            if self.blocked:
                self.flush()
            return
        stream = self.streams.get(stream_id)
        if grow == 0:
            self.stream_error(stream_id, PROTOCOL_ERROR, "a WINDOW_UPDATE of 0")
        elif stream is not None:
            stream.credit += grow
            self.top_credit = max(self.top_credit, stream.credit)
            if self.peer_window + stream.credit > MAX_WINDOW:
                self.stream_error(stream_id, FLOW_CONTROL_ERROR, "stream window over 2^31-1")
            elif stream.pending:
                self.unblock(stream)
        elif stream_id > self.last_stream:
            raise ProtocolError(PROTOCOL_ERROR, f"WINDOW_UPDATE on stream {stream_id}, never opened")

    def _reset(self, stream_id: int) -> None:
        """The client cancels a stream. Every reset spends the reset budget, also for a stream already answered:
        request-and-reset is the rapid-reset attack whether or not we answered first."""
        if stream_id > self.last_stream:
            raise ProtocolError(PROTOCOL_ERROR, f"RST_STREAM on stream {stream_id}, never opened")
        stream = self.streams.get(stream_id)
        if stream is not None:
            self.drop(stream)
            self.forget(stream)
        if not self.resets.spend():
            raise ProtocolError(ENHANCE_YOUR_CALM, "too many streams cancelled")

    def _headers(self, stream_id: int, flags: int, fields: Fields) -> None:
        if stream_id == 0:
            raise ProtocolError(PROTOCOL_ERROR, "HEADERS on stream 0")
        stream = self.streams.get(stream_id)
        if stream is not None or stream_id <= self.last_stream:  # trailers (or late ones, of a stream that ended)
            if stream is None and any(key[:1] == b":" for key, _ in fields):
                raise ProtocolError(PROTOCOL_ERROR, f"a new stream {stream_id} below stream {self.last_stream}")
            if stream is not None and not stream.remote_done:
                if not flags & END_STREAM:
                    raise ProtocolError(PROTOCOL_ERROR, "trailers without END_STREAM")
                problem = trailers_problem(fields)
                if problem:
                    self.stream_error(stream_id, PROTOCOL_ERROR, problem)
                    return
                self._remote_end(stream)
            return
        if stream_id % 2 == 0:
            raise ProtocolError(PROTOCOL_ERROR, f"stream {stream_id} is a server stream id")
        self.last_stream = stream_id
        if self.goaway_sent or len(self.streams) >= self.limits.max_concurrent_streams:
            self.out.append(frame(RST_STREAM, 0, stream_id, U32.pack(REFUSED_STREAM)))
            return
        problem = request_problem(fields)
        if problem:
            self.stream_error(stream_id, PROTOCOL_ERROR, problem)
            return
        stream = self.streams[stream_id] = Stream(stream_id, fields)
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
            self.answer_http(stream, b"405" if method != b"POST" else b"415")
        elif (found := self.services.lookup(path)) is None:
            self.end(stream, grpc.StatusCode.UNIMPLEMENTED, f"Method not found: {path.decode(errors='replace')}")
        elif stream.encoding not in (b"", b"identity", b"gzip", b"deflate"):
            encoding = stream.encoding.decode(errors="replace")
            accepted = (("grpc-accept-encoding", ENCODINGS),)
            self.end(stream, grpc.StatusCode.UNIMPLEMENTED, f"grpc-encoding {encoding} is not supported", accepted)
        else:
            stream.method = found
            stream.context = Context(self, stream)
            if found.kind & 2:  # a request stream: the handler starts now and reads messages as they come
                stream.requests = Requests(self, stream)
                self.run(stream, stream.requests)
        if ending:
            self._remote_end(stream)

    def _data(self, flags: int, stream_id: int, payload: bytes | memoryview) -> None:
        counted = len(payload)
        self.received += counted
        if self.received > self.limits.connection_window_bytes:
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
        if stream.unacked > self.limits.stream_window_bytes:
            raise ProtocolError(FLOW_CONTROL_ERROR, f"data past stream {stream_id}'s window")
        if stream.remote_done:
            raise ProtocolError(PROTOCOL_ERROR, f"DATA on stream {stream_id} after its END_STREAM")
        ending = bool(flags & END_STREAM)
        stream.remote_done = ending
        if stream.closed:
            if ending:
                self.forget(stream)
        elif ending and stream.requests is None and not stream.body and stream.method is not None:
            self._unary(stream, payload)  # the usual small call: its one message in one frame, read from the frame
        else:
            body = stream.body
            body += payload
            self._messages(stream)
            self.credit(stream)
            if ending:
                self._remote_end(stream)

    def credit(self, stream: Stream) -> None:
        """Give the stream's window back once half of it is used, unless the handler has half a window of messages
        still to read (it reads again: this is called then too)."""
        half = self.limits.stream_window_bytes // 2
        if stream.unacked < half or stream.remote_done or stream.closed:
            return
        if stream.requests is None or stream.requests.queued < half:
            self.emit(frame(WINDOW_UPDATE, 0, stream.id, U32.pack(stream.unacked)))
            stream.unacked = 0

    def _messages(self, stream: Stream) -> None:
        """Complete messages at the front of the stream's body: each goes to the handler (request stream) or is
        kept for the handler to start with (unary: at END_STREAM)."""
        body = stream.body
        limit = self.limits.max_message_bytes
        while len(body) >= 5:
            size = U32.unpack_from(body, 1)[0]
            if size > limit:
                message = f"Received message larger than max ({size} vs. {limit})"
                self.end(stream, grpc.StatusCode.RESOURCE_EXHAUSTED, message)
                return
            if stream.requests is None:  # unary: parsed whole at END_STREAM
                if len(body) > 5 + size:
                    self.end(stream, grpc.StatusCode.INTERNAL, "a unary call needs exactly one request message")
                return
            if len(body) < 5 + size:
                return
            flag, data = body[0], bytes(body[5 : 5 + size])
            del body[: 5 + size]
            request = self._parse(stream, flag, data)
            if request is None:
                return
            stream.requests.put(request, 5 + size)

    def _parse(self, stream: Stream, flag: int, data: bytes | memoryview) -> Any:
        """A message's bytes to the request object; None (the call ended) when they cannot be read."""
        limit = self.limits.max_message_bytes
        if flag:
            if flag != 1:
                self.end(stream, grpc.StatusCode.INTERNAL, f"a message with compressed flag {flag} (0 or 1)")
                return None
            if stream.encoding in (b"", b"identity"):
                self.end(stream, grpc.StatusCode.INTERNAL, "a compressed message without grpc-encoding")
                return None
            try:
                inflate = zlib.decompressobj(wbits=31 if stream.encoding == b"gzip" else 15)
                data = inflate.decompress(data, limit + 1)
            except zlib.error as err:
                self.end(stream, grpc.StatusCode.INTERNAL, f"the message cannot be decompressed: {err}")
                return None
            if len(data) > limit:
                message = f"Received message larger than max (over {limit} decompressed)"
                self.end(stream, grpc.StatusCode.RESOURCE_EXHAUSTED, message)
                return None
        try:
            return stream.method.deserialize(data)  # type: ignore[union-attr]  # set for every running call
        except Exception as err:
            self.end(stream, grpc.StatusCode.INTERNAL, f"the request message cannot be parsed: {err}")
            return None

    def _remote_end(self, stream: Stream) -> None:
        """The client's END_STREAM: a request stream ends; a unary call runs."""
        stream.remote_done = True
        if stream.closed:
            self.forget(stream)
            return
        if stream.requests is not None:
            stream.requests.end()
            return
        if stream.method is None:
            return
        body, stream.body = stream.body, bytearray()
        self._unary(stream, memoryview(body))

    def _unary(self, stream: Stream, body: bytes | memoryview) -> None:
        """A unary call's whole body, at its END_STREAM: exactly one message, which the handler gets."""
        size = U32.unpack_from(body, 1)[0] if len(body) >= 5 else -1
        limit = self.limits.max_message_bytes
        if size > limit:
            message = f"Received message larger than max ({size} vs. {limit})"
            self.end(stream, grpc.StatusCode.RESOURCE_EXHAUSTED, message)
        elif len(body) != 5 + size:
            self.end(stream, grpc.StatusCode.INTERNAL, "a unary call needs exactly one request message")
        elif (request := self._parse(stream, body[0], body[5:])) is not None:
            self.run(stream, request)

    # --- running handlers ------------------------------------------------------------------------------------------

    def run(self, stream: Stream, request: Any) -> None:
        """Start the handler: stepped once here, in its own context; a task only when it has to wait, and then one
        that carries the handler to its end however the call ends (:class:`Handler`)."""
        coro = self._call(stream, request)
        context = contextvars.copy_context()
        try:
            waiting = context.run(coro.send, None)
        except StopIteration:
            return
        stream.task = self.loop.create_task(Handler(coro, waiting), context=context)

    async def _call(self, stream: Stream, request: Any) -> None:
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
                self.end(stream, context._code or grpc.StatusCode.OK, context._details, context._trailing)
            else:
                reply = method.behavior(request, context)
                if inspect.isawaitable(reply):
                    reply = await reply
                code = context._code or grpc.StatusCode.OK
                if code != grpc.StatusCode.OK:
                    self.end(stream, code, context._details, context._trailing)
                elif reply is None:
                    self.end(stream, grpc.StatusCode.INTERNAL, "the method returned no response")
                else:
                    data = method.serialize(reply)
                    limit = self.limits.max_message_bytes
                    if len(data) > limit:
                        message = f"Sent message larger than max ({len(data)} vs. {limit})"
                        self.end(stream, grpc.StatusCode.RESOURCE_EXHAUSTED, message)
                        return
                    self.reply(stream, data, context)
        except Aborted as err:
            self.end(stream, err.code, err.details, context._trailing)
        except asyncio.CancelledError:
            pass  # cancelled by the client, the deadline or shutdown: whoever cancelled ended the call
        except Exception as err:
            log.exception("%s failed", dict(stream.fields).get(b":path", b"?").decode(errors="replace"))
            self.end(stream, grpc.StatusCode.UNKNOWN, f"Unexpected {type(err).__name__}: {err}")

    def _expired(self, stream: Stream) -> None:
        stream.timer = None
        if not stream.closed:
            self.end(stream, grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")  # emit() flushes it

    def drop(self, stream: Stream) -> None:
        """The call is over without a reply (reset, lost connection): stop its handler."""
        stream.closed = True
        if stream.timer is not None:
            stream.timer.cancel()
            stream.timer = None
        self.stop_handler(stream)

    def stop_handler(self, stream: Stream) -> None:
        """Cancel the call's handler (unless it is the one ending the call) and wake whatever it waits on here."""
        if stream.task is not None and not stream.task.done() and asyncio.current_task() is not stream.task:
            stream.task.cancel()
        if stream.writable is not None and not stream.writable.done():
            stream.writable.set_result(None)
        if stream.requests is not None:
            stream.requests.end()

    def forget(self, stream: Stream) -> None:
        if self.streams.pop(stream.id, None) is not None:
            self.discard(stream)
            self.server.changed()
            if not self.streams:
                self.idle_since = self.loop.time()
                if self.retiring and self.goaway_sent:
                    self.loop.call_soon(self.close)


def _depends_on_itself(flags: int, stream_id: int, payload: bytes) -> bool:
    """A HEADERS frame's priority names its own stream (RFC 9113 §5.3.1: a stream error)."""
    start = 1 if flags & PADDED else 0
    return len(payload) >= start + 4 and U32.unpack_from(payload, start)[0] & 0x7FFFFFFF == stream_id


__all__ = ["Connection"]

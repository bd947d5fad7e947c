"""A raw HTTP/2 client for tests: one connection to a gRPC server over a plain socket, every frame built by hand and
every frame received recorded (what a gRPC call looks like frame by frame, and what a broken or hostile client
sends), plus the checks of a few reply shapes."""

from __future__ import annotations

import contextlib
import select
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ferry.client._proto import grpc_service_pb2 as pb
from ferry.server.transport.http2 import (
    ACK,
    DATA,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    NO_ERROR,
    PING,
    PREFACE,
    RST_STREAM,
    SETTING,
    SETTINGS,
    U32,
    WINDOW_UPDATE,
    HeaderBlocks,
    frame,
    frames,
    literal,
    messages,
)
from tests.integration.test_rpcs import request_for

INFER = b"/inference.GRPCInferenceService/ModelInfer"


def grpc_message(data: bytes, compressed: bool = False) -> bytes:
    return bytes([int(compressed)]) + U32.pack(len(data)) + data


def tiny_request(request_id: str, seed: int = 0) -> pb.ModelInferRequest:
    x = np.random.default_rng(seed).standard_normal((1, 16)).astype(np.float32)
    return request_for("tiny", {"input": x}, id=request_id)


def mlp_request(request_id: str) -> pb.ModelInferRequest:
    return request_for("mlp", {"input": np.ones((1, 256), np.float32)}, id=request_id)


@dataclass
class Reply:
    """What the server sent on one stream."""

    frames: list[tuple[int, int, int]] = field(default_factory=list)  # (type, flags, payload length), in order
    blocks: list[dict[bytes, bytes]] = field(default_factory=list)  # decoded header blocks, in order
    data: bytearray = field(default_factory=bytearray)
    reset: int | None = None  # RST_STREAM's error code
    ended: bool = False  # END_STREAM or RST_STREAM

    @property
    def status(self) -> int:
        """The gRPC status of the last header block (trailers, or a Trailers-Only reply)."""
        return int(self.blocks[-1][b"grpc-status"])

    @property
    def message(self) -> str:
        return self.blocks[-1].get(b"grpc-message", b"").decode()

    def replies(self) -> list[bytes]:
        return messages(bytearray(self.data))


class RawConn:
    """One HTTP/2 connection to the server over a plain socket: every frame built by hand, every frame received
    recorded. ``pump`` reads (5 s at most) until a condition holds."""

    def __init__(self, address: str, settings: bytes = b"", handshake: bool = True, rcvbuf: int = 0) -> None:
        host, port = address.rsplit(":", 1)
        self.authority = address.encode()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:  # before connecting: the TCP window offered follows it
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(5)
        self.sock.connect((host, int(port)))
        self.buf = bytearray()
        self.blocks = HeaderBlocks()
        self.log: list[tuple[int, int, int, bytes]] = []  # every frame received
        self.streams: dict[int, Reply] = {}
        self.settings: dict[int, int] = {}
        self.settings_acks = 0
        self.window_updates: list[tuple[int, int]] = []
        self.pings: list[bytes] = []  # payloads of PING ACKs
        self.goaway: tuple[int, int, bytes] | None = None  # last stream id, error code, debug data
        self.goaways: list[tuple[int, int, bytes]] = []  # every GOAWAY, in order
        self.server_pings: list[bytes] = []  # PINGs the server sent (not ACKs)
        self.ack_pings = True  # answer the server's PINGs
        self.goaway_at: float | None = None  # when it arrived (time.monotonic)
        self.eof = False
        self.next_id = 1
        if handshake:
            self.send(PREFACE + frame(SETTINGS, 0, 0, settings))
            self.pump(lambda: bool(self.settings) and self.settings_acks == 1)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawConn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    # --- building requests

    def header_block(
        self,
        path: bytes,
        *extra: tuple[bytes, bytes],
        method: bytes = b"\x83",
        content_type: bytes = b"application/grpc",
    ) -> bytes:
        """``:method`` (static 3: POST, 2: GET), ``:scheme http``, ``:path``, ``:authority``, content-type, te."""
        block = method + b"\x86" + literal(4, path) + literal(1, self.authority)
        block += literal(b"content-type", content_type) + literal(b"te", b"trailers")
        for name, value in extra:
            block += literal(name, value)
        return block

    def stream_id(self) -> int:
        sid, self.next_id = self.next_id, self.next_id + 2
        return sid

    def open(self, path: bytes, *extra: tuple[bytes, bytes], end: bool = False, **block: Any) -> int:
        """HEADERS opening a new stream; END_STREAM when ``end``."""
        sid = self.stream_id()
        self.send(
            frame(HEADERS, END_HEADERS | (END_STREAM if end else 0), sid, self.header_block(path, *extra, **block))
        )
        return sid

    def call(self, path: bytes, body: bytes, *extra: tuple[bytes, bytes], **block: Any) -> int:
        """HEADERS and one DATA frame with END_STREAM, in one write."""
        sid = self.stream_id()
        self.send(
            frame(HEADERS, END_HEADERS, sid, self.header_block(path, *extra, **block))
            + frame(DATA, END_STREAM, sid, body)
        )
        return sid

    def infer(self, request: pb.ModelInferRequest, *extra: tuple[bytes, bytes]) -> Reply:
        """A whole unary ModelInfer: sent, and read until its stream ends."""
        sid = self.call(INFER, grpc_message(request.SerializeToString()), *extra)
        return self.finish(sid)

    # --- reading

    def finish(self, sid: int) -> Reply:
        self.pump(lambda: self.reply(sid).ended)
        return self.reply(sid)

    def reply(self, sid: int) -> Reply:
        return self.streams.setdefault(sid, Reply())

    def ping(self, payload: bytes = b"roundtrp") -> None:
        """A PING round trip: every frame sent before it has been processed by the server once its ACK is in."""
        self.send(frame(PING, 0, 0, payload))
        self.pump(lambda: payload in self.pings)
        self.pings.remove(payload)

    def pump(self, until: Callable[[], bool], timeout: float = 5.0) -> None:
        """Read and record frames until ``until()`` holds; fails on timeout, or on EOF before it holds."""
        deadline = time.monotonic() + timeout
        while not until():
            if self.eof:
                raise AssertionError(f"the server closed the connection; goaway={self.goaway}")
            self._read(deadline - time.monotonic(), timeout)

    def drain(self, seconds: float) -> None:
        """Read and record whatever arrives for ``seconds`` (for asserting that something does not arrive)."""
        deadline = time.monotonic() + seconds
        while not self.eof and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                self._read(deadline - time.monotonic(), seconds, quiet=True)

    def poll(self) -> None:
        """Read and record whatever has already arrived, without waiting."""
        while not self.eof and select.select([self.sock], [], [], 0)[0]:
            self._read(5.0, 5.0)

    def flood(self, chunks: Iterable[bytes], seconds: float) -> int:
        """Send ``chunks`` one after another, reading what arrives in between, until they run out, ``seconds`` pass
        or the server ends the connection (GOAWAY, EOF, or it stops reading us); returns how many went out whole."""
        deadline = time.monotonic() + seconds
        sent = 0
        for chunk in chunks:
            left = deadline - time.monotonic()
            if left <= 0 or self.goaway is not None or self.eof:
                break
            self.sock.settimeout(left)
            try:
                self.sock.sendall(chunk)
            except (TimeoutError, BrokenPipeError, ConnectionResetError):
                break
            sent += 1
            self.poll()
        return sent

    def read_to_eof(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.eof:
            self._read(deadline - time.monotonic(), timeout)

    def _read(self, left: float, timeout: float, quiet: bool = False) -> None:
        if left <= 0:
            if quiet:
                raise TimeoutError
            raise AssertionError(f"nothing more after {timeout} s; received {[f[:3] for f in self.log]}")
        self.sock.settimeout(left)
        try:
            chunk = self.sock.recv(1 << 16)
        except TimeoutError:
            if quiet:
                raise
            raise AssertionError(f"nothing more after {timeout} s; received {[f[:3] for f in self.log]}") from None
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            self.eof = True
            return
        self.buf += chunk
        for kind, flags, sid, payload in frames(self.buf):
            self._dispatch(kind, flags, sid, payload)

    def _dispatch(self, kind: int, flags: int, sid: int, payload: bytes) -> None:
        self.log.append((kind, flags, sid, payload))
        if kind == SETTINGS:
            if flags & ACK:
                self.settings_acks += 1
            else:
                self.settings.update(SETTING.iter_unpack(payload))
                self.send(frame(SETTINGS, ACK, 0))
        elif kind == PING:
            if flags & ACK:
                self.pings.append(payload)
            else:  # the server pings only after a GOAWAY that asks us to go away (gRFC A9): answered, recorded
                self.server_pings.append(payload)
                if self.ack_pings:
                    self.send(frame(PING, ACK, 0, payload))
        elif kind == GOAWAY:
            self.goaway = (U32.unpack_from(payload)[0] & 0x7FFFFFFF, U32.unpack_from(payload, 4)[0], payload[8:])
            self.goaway_at = time.monotonic()
            self.goaways.append(self.goaway)
        elif kind == WINDOW_UPDATE:
            self.window_updates.append((sid, U32.unpack(payload)[0]))
        else:
            reply = self.reply(sid)
            reply.frames.append((kind, flags, len(payload)))
            # after our END_STREAM, only RST_STREAM NO_ERROR (RFC 9113 §8.1: "stop sending", when we had not ended)
            late = reply.ended and (kind != RST_STREAM or reply.reset is not None or payload != U32.pack(NO_ERROR))
            assert not late, f"a frame after the end of stream {sid}: {kind, flags, payload!r}"
            if kind == DATA:
                reply.data += payload
                reply.ended = bool(flags & END_STREAM)
            elif kind == HEADERS:
                block = self.blocks.feed(kind, flags, sid, payload)
                assert block is not None, "the server's header blocks fit one frame"
                reply.blocks.append(dict(block[2]))
                reply.ended = bool(flags & END_STREAM)
            elif kind == RST_STREAM:
                reply.reset = U32.unpack(payload)[0]
                reply.ended = True


def ok_reply(reply: Reply, request_id: str) -> pb.ModelInferResponse:
    """The frames of a successful unary call: HEADERS, one DATA with one message, trailers grpc-status 0."""
    assert [(kind, flags) for kind, flags, _ in reply.frames] == [
        (HEADERS, END_HEADERS),
        (DATA, 0),
        (HEADERS, END_HEADERS | END_STREAM),
    ], reply
    assert reply.blocks == [{b":status": b"200", b"content-type": b"application/grpc"}, {b"grpc-status": b"0"}]
    (message,) = reply.replies()
    assert reply.data[0] == 0  # not compressed
    response = pb.ModelInferResponse.FromString(message)
    assert response.id == request_id
    return response


def trailers_only(reply: Reply, status: int, message: str) -> None:
    """A call that ended before any reply: one HEADERS frame with END_STREAM (gRPC's Trailers-Only)."""
    assert [(kind, flags) for kind, flags, _ in reply.frames][:1] == [(HEADERS, END_HEADERS | END_STREAM)], reply
    assert reply.blocks == [
        {
            b":status": b"200",
            b"content-type": b"application/grpc",
            b"grpc-status": str(status).encode(),
            **({b"grpc-message": message.encode()} if message else {}),
        }
    ]
    assert not reply.data

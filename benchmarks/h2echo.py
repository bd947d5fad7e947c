"""The echo server's answers over HTTP/2 written by hand on asyncio, without grpcio: what a gRPC server in Python
costs per call when the transport is not grpcio's. A measurement, not a server to deploy.

``benchmarks/echo.py`` (grpc.aio) is the ceiling the batching benchmarks divide Ferry by. This server answers the same
RPCs with the same messages (it uses :class:`benchmarks.echo.EchoServicer`'s prepared answers: every ``ModelInfer``
request is parsed and answered with zeros of the model's output shapes and the request's id), but its transport is
a few hundred lines of Python on uvloop: it reads frames with one struct unpack each, decodes request header blocks
with hpack (once each: it forbids the client a dynamic table, so blocks repeat byte for byte), and writes each reply
as HEADERS + DATA + trailers in one write. Comparing the two says how much of a Python gRPC server's per-call cost
is grpcio's (BENCHMARKS.md, "The transport").

What it speaks: the HTTP/2 connection preface, SETTINGS (acknowledged; ours: no dynamic HPACK table, large receive
windows), PING, WINDOW_UPDATE and flow control on what it sends, RST_STREAM; unary calls and the bidirectional
``ModelStreamInfer`` stream (each message answered as it arrives). Not: TLS, compression, GOAWAY on shutdown, request
metadata (deadlines, auth): it is an echo.

``python -m benchmarks.h2echo --model-repository DIR --model tiny`` prints ``echo ready: grpc=HOST:PORT``.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from benchmarks.echo import EchoServicer, echo_arguments, load_version
from ferry.client._proto import grpc_service_pb2 as pb
from ferry.loadtest import wire
from ferry.loadtest.wire import frame, literal
from ferry.server.app import run

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
RECEIVE_WINDOW = 1 << 24
REPLY_HEADERS = b"\x88" + literal(31, b"application/grpc")  # :status 200 (static 8), content-type (static 31)
OK = literal(b"grpc-status", b"0")
UNIMPLEMENTED = literal(b"grpc-status", b"12")
SERVICE = b"/inference.GRPCInferenceService/"
STREAM = SERVICE + b"ModelStreamInfer"


Answer = Callable[[bytes], "bytes | Awaitable[bytes]"]
"""Request bytes -> reply bytes, or an awaitable of them; raises :class:`ferry.loadtest.wire.CallError` for a status."""


def answers(servicer: EchoServicer) -> dict[bytes, Answer]:
    """Unary method path -> (request bytes -> reply bytes), from the echo servicer's prepared answers. An answer
    raises :class:`ferry.loadtest.wire.CallError` for a status other than OK (a model it does not describe)."""
    metadata, config, name = (
        servicer._metadata.SerializeToString(),
        servicer._config.SerializeToString(),
        servicer._name,
    )

    def described(reply: bytes, model: str) -> bytes:
        if model != name:
            raise wire.CallError("NOT_FOUND", f"unknown model {model!r}")
        return reply

    return {
        SERVICE + b"ModelInfer": lambda m: servicer._answer(pb.ModelInferRequest.FromString(m)).SerializeToString(),
        SERVICE + b"ModelMetadata": lambda m: described(metadata, pb.ModelMetadataRequest.FromString(m).name),
        SERVICE + b"ModelConfig": lambda m: described(config, pb.ModelConfigRequest.FromString(m).name),
        SERVICE + b"ServerLive": lambda m: pb.ServerLiveResponse(live=True).SerializeToString(),
        SERVICE + b"ServerReady": lambda m: pb.ServerReadyResponse(ready=True).SerializeToString(),
        SERVICE + b"ModelReady": lambda m: pb.ModelReadyResponse(ready=True).SerializeToString(),
        SERVICE + b"ServerMetadata": lambda m: pb.ServerMetadataResponse(
            name="h2echo", version="0"
        ).SerializeToString(),
    }


def _stream_answer(servicer: EchoServicer, message: bytes) -> bytes:
    request = pb.ModelInferRequest.FromString(message)
    return pb.ModelStreamInferResponse(infer_response=servicer._answer(request)).SerializeToString()


class _Stream:
    __slots__ = ("body", "opened", "path", "pending", "unacked", "window")

    def __init__(self, path: bytes, window: int) -> None:
        self.path = path
        self.body = bytearray()
        self.unacked = 0  # received bytes not yet given back in a stream WINDOW_UPDATE
        self.window = window
        self.pending = bytearray()  # DATA payload waiting for window (then the trailers)
        self.opened = False  # the reply's HEADERS are out


class Connection(asyncio.Protocol):
    """One client connection: ``unary`` answers by method path; ``stream`` answers each ``ModelStreamInfer`` message
    (None: that method is UNIMPLEMENTED)."""

    def __init__(self, unary: dict[bytes, Answer], stream: Callable[[bytes], bytes] | None = None) -> None:
        self.stream_answer = stream
        self.unary = unary
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.started = False
        self.headers = wire.HeaderBlocks()
        self.streams: dict[int, _Stream] = {}
        self.unacked = 0
        self.send_window = wire.DEFAULT_WINDOW
        self.peer_window = wire.DEFAULT_WINDOW
        self.max_frame = wire.DEFAULT_FRAME
        self.blocked: dict[int, tuple[_Stream, bool]] = {}  # stream id -> (stream, trailers after its data)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        ours = wire.SETTING.pack(wire.HEADER_TABLE_SIZE, 0) + wire.SETTING.pack(
            wire.INITIAL_WINDOW_SIZE, RECEIVE_WINDOW
        )
        grow = frame(wire.WINDOW_UPDATE, 0, 0, wire.U32.pack(RECEIVE_WINDOW - wire.DEFAULT_WINDOW))
        self.transport.write(frame(wire.SETTINGS, 0, 0, ours) + grow)  # type: ignore[union-attr]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        buf = self.buffer
        buf += data
        start = 0
        if not self.started:
            if len(buf) < len(PREFACE):
                return
            if buf[: len(PREFACE)] != PREFACE and self.transport is not None:
                self.transport.close()
                return
            start, self.started = len(PREFACE), True
        out: list[bytes] = []
        for kind, flags, stream_id, payload in wire.frames(buf, start):
            self._frame(kind, flags, stream_id, payload, out)
        if self.unacked >= RECEIVE_WINDOW // 2:
            out.append(frame(wire.WINDOW_UPDATE, 0, 0, wire.U32.pack(self.unacked)))
            self.unacked = 0
        if out and self.transport is not None:
            self.transport.write(b"".join(out))

    def _frame(self, kind: int, flags: int, stream_id: int, payload: bytes, out: list[bytes]) -> None:
        if kind == wire.DATA:
            counted = len(payload)
            self.unacked += counted
            if flags & wire.PADDED:
                payload = payload[1 : len(payload) - payload[0]]
            stream = self.streams.get(stream_id)
            if stream is None:
                return
            stream.unacked += counted
            if stream.unacked >= RECEIVE_WINDOW // 2 and not flags & wire.END_STREAM:  # give the stream's window back
                out.append(frame(wire.WINDOW_UPDATE, 0, stream_id, wire.U32.pack(stream.unacked)))
                stream.unacked = 0
            stream.body += payload
            if stream.path == STREAM and self.stream_answer is not None:
                self._stream_messages(stream_id, stream, out)
            if flags & wire.END_STREAM:
                self._finish(stream_id, stream, out)
        elif kind in (wire.HEADERS, wire.CONTINUATION):
            self._headers(kind, flags, stream_id, payload, out)
        elif kind == wire.SETTINGS and not flags & wire.ACK:
            for offset in range(0, len(payload) - len(payload) % 6, 6):
                key, value = wire.SETTING.unpack_from(payload, offset)
                if key == wire.INITIAL_WINDOW_SIZE:
                    for stream in self.streams.values():
                        stream.window += value - self.peer_window
                    self.peer_window = value
                elif key == wire.MAX_FRAME_SIZE:
                    self.max_frame = value
            out.append(frame(wire.SETTINGS, wire.ACK, 0))
        elif kind == wire.PING and not flags & wire.ACK:
            out.append(frame(wire.PING, wire.ACK, 0, payload))
        elif kind == wire.WINDOW_UPDATE:
            grow = wire.U32.unpack(payload[:4])[0] & 0x7FFFFFFF
            if stream_id == 0:
                self.send_window += grow
            elif (stream := self.streams.get(stream_id)) is not None:
                stream.window += grow
            self._flush(out)
        elif kind == wire.RST_STREAM:
            self.streams.pop(stream_id, None)
            self.blocked.pop(stream_id, None)

    def _headers(self, kind: int, flags: int, stream_id: int, payload: bytes, out: list[bytes]) -> None:
        block = self.headers.feed(kind, flags, stream_id, payload)
        if block is None:
            return
        stream_id, flags, fields = block
        if stream_id in self.streams:  # trailers from the client: ignored
            return
        path = next((bytes(v) for k, v in fields if k == b":path"), b"")
        stream = self.streams[stream_id] = _Stream(path, self.peer_window)
        if flags & wire.END_STREAM:
            self._finish(stream_id, stream, out)

    def _stream_messages(self, stream_id: int, stream: _Stream, out: list[bytes]) -> None:
        replies = []
        for message in wire.messages(stream.body):
            reply = self.stream_answer(message)  # type: ignore[misc]  # only called when set
            replies.append(b"\x00" + wire.U32.pack(len(reply)) + reply)
        if replies:
            self._open(stream_id, stream, out)
            self._send(stream_id, stream, b"".join(replies), out, end=False)

    def _open(self, stream_id: int, stream: _Stream, out: list[bytes]) -> None:
        if not stream.opened:
            stream.opened = True
            out.append(frame(wire.HEADERS, wire.END_HEADERS, stream_id, REPLY_HEADERS))

    def _finish(self, stream_id: int, stream: _Stream, out: list[bytes]) -> None:
        if stream.path == STREAM and self.stream_answer is not None:
            self._open(stream_id, stream, out)
            self._send(stream_id, stream, b"", out, end=True)
            return
        answer = self.unary.get(stream.path)
        if answer is None:
            del self.streams[stream_id]
            out.append(
                frame(wire.HEADERS, wire.END_HEADERS | wire.END_STREAM, stream_id, REPLY_HEADERS + UNIMPLEMENTED)
            )
            return
        try:
            reply = answer(bytes(stream.body[5:]))
        except wire.CallError as err:
            self._fail(stream_id, err, out)
            return
        if isinstance(reply, bytes):
            self._reply(stream_id, stream, reply, out)
            return
        task = asyncio.ensure_future(reply)
        task.add_done_callback(lambda done: self._answered(stream_id, stream, done))

    def _answered(self, stream_id: int, stream: _Stream, task: asyncio.Future[bytes]) -> None:
        out: list[bytes] = []
        if stream_id not in self.streams:  # reset by the client meanwhile
            return
        if task.cancelled():
            self._fail(stream_id, wire.CallError("CANCELLED", "the call was cancelled"), out)
        elif (err := task.exception()) is not None:
            failure = err if isinstance(err, wire.CallError) else wire.CallError("INTERNAL", f"{type(err).__name__}")
            self._fail(stream_id, failure, out)
        else:
            self._reply(stream_id, stream, task.result(), out)
        if self.transport is not None:
            self.transport.write(b"".join(out))

    def _reply(self, stream_id: int, stream: _Stream, reply: bytes, out: list[bytes]) -> None:
        self._open(stream_id, stream, out)
        self._send(stream_id, stream, b"\x00" + wire.U32.pack(len(reply)) + reply, out, end=True)

    def _fail(self, stream_id: int, err: wire.CallError, out: list[bytes]) -> None:
        """Trailers-Only: the status and its message, no body."""
        del self.streams[stream_id]
        status = literal(b"grpc-status", str(wire.STATUS_NAMES.index(err.code)).encode())
        message = literal(b"grpc-message", urllib.parse.quote(err.message, safe=" ").encode())
        out.append(frame(wire.HEADERS, wire.END_HEADERS | wire.END_STREAM, stream_id, REPLY_HEADERS + status + message))

    def _send(self, stream_id: int, stream: _Stream, data: bytes, out: list[bytes], end: bool) -> None:
        """DATA within the client's windows, then (``end``) the trailers; what does not fit waits for WINDOW_UPDATE."""
        stream.pending += data
        if end:
            self.blocked[stream_id] = (stream, True)
        elif stream.pending:
            self.blocked.setdefault(stream_id, (stream, False))
        self._flush(out)

    def _flush(self, out: list[bytes]) -> None:
        for stream_id, (stream, end) in list(self.blocked.items()):
            pending = stream.pending
            while pending and self.send_window > 0 and stream.window > 0:
                n = min(len(pending), self.send_window, stream.window, self.max_frame)
                out.append(frame(wire.DATA, 0, stream_id, bytes(pending[:n])))
                del pending[:n]
                self.send_window -= n
                stream.window -= n
            if pending:
                continue
            del self.blocked[stream_id]
            if end:
                out.append(frame(wire.HEADERS, wire.END_HEADERS | wire.END_STREAM, stream_id, OK))
                self.streams.pop(stream_id, None)


async def listen(connection: Callable[[], Connection], host: str, port: int, ready: str) -> None:
    """Serve connections on ``host:port`` until SIGINT or SIGTERM, after printing ``<ready>: grpc=HOST:PORT``."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(connection, host, port)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"{ready}: grpc={host}:{server.sockets[0].getsockname()[1]}", flush=True)
    try:
        await stop.wait()
    finally:
        server.close()


async def _serve(model_repository: Path, model: str, host: str, port: int) -> None:
    servicer = EchoServicer(load_version(model_repository, model))
    unary = answers(servicer)
    await listen(lambda: Connection(unary, lambda m: _stream_answer(servicer, m)), host, port, "echo ready")


def main(argv: Sequence[str] | None = None) -> int:
    args = echo_arguments("python -m benchmarks.h2echo", __doc__.split("\n\n")[0]).parse_args(argv)
    run(_serve(args.model_repository, args.model, args.host, args.port), use_uvloop=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

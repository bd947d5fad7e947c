"""Ferry's own gRPC transport (:mod:`ferry.server.transport`) on the wire: a real server on 127.0.0.1 driven over
raw TCP with hand-built HTTP/2 frames (what a gRPC call looks like frame by frame, the transport's limits and its
answers to
broken or hostile clients), plus grpcio where a normal client is the right tool."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gzip
import shutil
import socket
import threading
import time
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from grpc_health.v1 import health_pb2

from ferry.client._proto import grpc_service_pb2 as pb
from ferry.client._proto import grpc_service_pb2_grpc as pb_grpc
from ferry.server.transport import Limits, Services, Transport
from ferry.server.transport.http2 import (
    ACK,
    CONTINUATION,
    DATA,
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
    NO_ERROR,
    PING,
    PROTOCOL_ERROR,
    PUSH_PROMISE,
    REFUSED_STREAM,
    RST_STREAM,
    SETTING,
    SETTINGS,
    U32,
    WINDOW_UPDATE,
    frame,
    literal,
)
from tests.integration.test_rpcs import outputs_of, request_for
from tests.rawh2 import INFER, RawConn, grpc_message, mlp_request, ok_reply, tiny_request, trailers_only
from tests.serving import BackgroundServer, background_server

MiB = 1 << 20
MAX_MESSAGE = 4096  # the module server's --max-message-bytes (the configuration's lower bound is 1024)
MAX_STREAMS = 4  # the module server's --max-pending-calls: its SETTINGS_MAX_CONCURRENT_STREAMS
WINDOW_S = 0.5  # mlp's dynamic-batching window: an mlp call stays in flight this long
CANCEL = 8  # HTTP/2 error code CANCEL (RFC 9113 §7)

STREAM_INFER = b"/inference.GRPCInferenceService/ModelStreamInfer"
WATCH = b"/grpc.health.v1.Health/Watch"

MLP_WINDOW = f"""name: "mlp"
max_batch_size: 128
dynamic_batching {{ max_queue_delay_microseconds: {int(WINDOW_S * 1e6)} }}
"""
TINY_AT_ONCE = 'name: "tiny"\nmax_batch_size: 128\ndynamic_batching { }\n'


def repository(example_repo: Path, root: Path) -> Path:
    """tiny (answered at once, in the turn that reads it) and mlp (queued for a 0.5 s batching window)."""
    for name, config in (("tiny", TINY_AT_ONCE), ("mlp", MLP_WINDOW)):
        shutil.copytree(example_repo / name / "1", root / name / "1")
        (root / name / "config.pbtxt").write_text(config)
    return root


@pytest.fixture(scope="module")
def server(example_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundServer]:
    root = repository(example_repo, tmp_path_factory.mktemp("transport"))
    overrides: dict[str, Any] = {"http_port": None, "max_message_bytes": MAX_MESSAGE, "max_pending_calls": MAX_STREAMS}
    with background_server(root, **overrides) as running:
        assert running.config.transport == "ferry"
        yield running


@pytest.fixture(scope="module")
def tiny_session(example_repo: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(example_repo / "tiny" / "1" / "model.onnx"))


@pytest.fixture
def conn(server: BackgroundServer) -> Iterator[RawConn]:
    with RawConn(server.address) as raw:
        yield raw


# --- calls -----------------------------------------------------------------------------------------------------------


def test_a_unary_call_frame_by_frame_and_the_servers_settings(
    conn: RawConn, tiny_session: ort.InferenceSession
) -> None:
    assert conn.settings == {
        HEADER_TABLE_SIZE: 0,
        MAX_CONCURRENT_STREAMS: MAX_STREAMS,
        INITIAL_WINDOW_SIZE: MiB,
        MAX_FRAME_SIZE: MiB,
        MAX_HEADER_LIST_SIZE: 1 << 14,
    }
    assert conn.log[0][0] == SETTINGS  # the server's SETTINGS come first, then its connection window grows to 16 MiB
    assert conn.window_updates == [(0, (16 * MiB) - 65_535)]
    for sid, seed in ((1, 0), (3, 1)):  # twice: the second request's header block is the same bytes (decoded once)
        request = tiny_request(f"raw-{sid}", seed)
        response = ok_reply(conn.infer(request), f"raw-{sid}")
        assert response.model_name == "tiny" and response.model_version == "1"
        expected = tiny_session.run(None, {"input": np.random.default_rng(seed).standard_normal((1, 16)).astype("f4")})
        np.testing.assert_allclose(outputs_of(response)["output"], expected[0], rtol=1e-5, atol=1e-6)
    assert set(conn.streams) == {1, 3}
    assert conn.goaway is None and not conn.eof


def test_padding_priority_continuation_and_a_message_split_over_frames(conn: RawConn) -> None:
    """A header block split over HEADERS (PADDED, PRIORITY) and two CONTINUATIONs, and the message over three
    DATA frames (one PADDED, one holding 2 bytes of the length prefix), are one ordinary call."""
    block = conn.header_block(INFER)
    padded = bytes([7]) + U32.pack(0) + b"\x10" + block[:5] + b"\x00" * 7  # pad length, priority, fragment, padding
    body = grpc_message(tiny_request("pieces").SerializeToString())
    sid = conn.stream_id()
    conn.send(
        frame(HEADERS, 0x8 | 0x20, sid, padded)  # PADDED | PRIORITY, no END_HEADERS
        + frame(CONTINUATION, 0, sid, block[5:9])
        + frame(CONTINUATION, END_HEADERS, sid, block[9:])
        + frame(DATA, 0, sid, body[:2])
        + frame(DATA, 0x8, sid, bytes([3]) + body[2:20] + b"pad")  # PADDED
        + frame(DATA, END_STREAM, sid, body[20:])
    )
    ok_reply(conn.finish(sid), "pieces")


def test_a_client_goaway_is_answered_and_later_streams_are_refused(conn: RawConn) -> None:
    ok_reply(conn.infer(tiny_request("before")), "before")
    conn.send(frame(GOAWAY, 0, 0, U32.pack(0) + U32.pack(NO_ERROR)))
    conn.pump(lambda: conn.goaway is not None)
    assert conn.goaway == (1, NO_ERROR, b"")  # stream 1 was the last one the server took
    late = conn.call(INFER, grpc_message(tiny_request("after").SerializeToString()))
    assert conn.finish(late).reset == REFUSED_STREAM
    conn.ping()  # the connection stays open for the client to close


@pytest.mark.parametrize("end", [True, False], ids=["ended", "open"])
def test_an_unknown_method_is_unimplemented_trailers_only(conn: RawConn, end: bool) -> None:
    sid = conn.open(b"/inference.GRPCInferenceService/Nope", end=end)
    if end:
        reply = conn.finish(sid)
        assert len(reply.frames) == 1
    else:  # the client had not ended its stream: the server tells it to stop sending
        conn.pump(lambda: len(conn.reply(sid).frames) == 2)
        reply = conn.reply(sid)
        assert reply.reset == NO_ERROR and reply.frames[1] == (RST_STREAM, 0, 4)
    trailers_only(reply, 12, "Method not found: /inference.GRPCInferenceService/Nope")


@pytest.mark.parametrize(
    ("method", "content_type", "status"),
    [(b"\x82", b"application/grpc", b"405"), (b"\x83", b"text/plain", b"415")],
    ids=["GET", "text/plain"],
)
def test_a_request_that_is_not_grpc_gets_a_bare_http_status(
    conn: RawConn, method: bytes, content_type: bytes, status: bytes
) -> None:
    sid = conn.open(INFER, end=True, method=method, content_type=content_type)
    reply = conn.finish(sid)
    assert reply.frames == [(HEADERS, END_HEADERS | END_STREAM, len(literal(8, status)))]
    assert reply.blocks == [{b":status": status}]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (grpc_message(b"\xff\xff\xff"), "the request message cannot be parsed: "),
        (grpc_message(b"") * 2, "a unary call needs exactly one request message"),
        (b"", "a unary call needs exactly one request message"),
        (b"\x00" + U32.pack(10) + b"abc", "a unary call needs exactly one request message"),
    ],
    ids=["garbage", "two-messages", "no-message", "truncated"],
)
def test_a_body_that_is_not_one_request_message_is_internal(conn: RawConn, body: bytes, message: str) -> None:
    reply = conn.finish(conn.call(INFER, body))
    assert reply.status == 13 and reply.message.startswith(message), reply.blocks
    trailers_only(reply, 13, reply.message)
    ok_reply(conn.infer(tiny_request("after")), "after")  # the connection is fine


def test_a_message_over_the_limit_ends_its_call_as_soon_as_its_prefix_arrives(conn: RawConn) -> None:
    sid = conn.open(INFER)
    conn.send(frame(DATA, 0, sid, b"\x00" + U32.pack(MAX_MESSAGE + 1)))  # the prefix alone, no body yet
    conn.pump(lambda: conn.reply(sid).ended)
    reply = conn.reply(sid)
    trailers_only(reply, 8, f"Received message larger than max ({MAX_MESSAGE + 1} vs. {MAX_MESSAGE})")
    assert [kind for kind, _, _ in reply.frames] == [HEADERS, RST_STREAM] and reply.reset == NO_ERROR
    conn.send(frame(DATA, END_STREAM, sid, b"\x00" * (MAX_MESSAGE + 1)))  # the rest, already in flight: ignored
    ok_reply(conn.infer(tiny_request("next")), "next")
    assert conn.goaway is None


def test_a_message_that_decompresses_past_the_limit_is_resource_exhausted(conn: RawConn) -> None:
    bomb = gzip.compress(b"\x00" * (4 * MAX_MESSAGE))
    assert len(bomb) < 200
    reply = conn.finish(conn.call(INFER, grpc_message(bomb, compressed=True), (b"grpc-encoding", b"gzip")))
    trailers_only(reply, 8, f"Received message larger than max (over {MAX_MESSAGE} decompressed)")


@pytest.mark.parametrize("encoding", [b"gzip", b"deflate"])
def test_compressed_requests_are_answered(conn: RawConn, encoding: bytes) -> None:
    data = tiny_request("zipped").SerializeToString()
    packed = gzip.compress(data) if encoding == b"gzip" else zlib.compress(data)
    reply = conn.finish(conn.call(INFER, grpc_message(packed, compressed=True), (b"grpc-encoding", encoding)))
    ok_reply(reply, "zipped")  # the reply is not compressed (flag 0, no grpc-encoding)


@pytest.mark.parametrize(
    ("encoding", "compressed", "body", "status", "message"),
    [
        (b"snappy", True, b"whatever", 12, "grpc-encoding snappy is not supported"),
        (b"snappy", False, b"", 12, "grpc-encoding snappy is not supported"),
        (None, True, b"x", 13, "a compressed message without grpc-encoding"),
        (b"identity", True, b"x", 13, "a compressed message without grpc-encoding"),
        (b"gzip", True, b"not gzip at all", 13, "the message cannot be decompressed: "),
    ],
    ids=["snappy", "snappy-uncompressed", "no-encoding", "identity", "corrupt-gzip"],
)
def test_compression_errors(
    conn: RawConn, encoding: bytes | None, compressed: bool, body: bytes, status: int, message: str
) -> None:
    extra = () if encoding is None else ((b"grpc-encoding", encoding),)
    reply = conn.finish(conn.call(INFER, grpc_message(body, compressed), *extra))
    assert reply.status == status and reply.message.startswith(message), reply.blocks
    if status == 12:  # gRPC's compression spec: the refusal says what the server accepts
        assert reply.blocks[-1].get(b"grpc-accept-encoding") == b"identity,deflate,gzip", reply.blocks
    else:
        trailers_only(reply, status, reply.message)


def mlp_counts(server: BackgroundServer) -> tuple[int, int]:
    """mlp's inference and execution counts (through grpcio)."""
    with grpc.insecure_channel(server.address) as channel:
        stats = pb_grpc.GRPCInferenceServiceStub(channel).ModelStatistics(pb.ModelStatisticsRequest(name="mlp"))
    (model,) = stats.model_stats
    return model.inference_count, model.execution_count


# --- deadlines -------------------------------------------------------------------------------------------------------


def test_a_deadline_already_passed_is_deadline_exceeded(conn: RawConn) -> None:
    reply = conn.infer(tiny_request("late"), (b"grpc-timeout", b"1n"))
    trailers_only(reply, 4, "model 'tiny' version 1: the caller's deadline passed before the request was queued")


def test_a_deadline_runs_from_the_headers_even_while_the_body_has_not_come(conn: RawConn) -> None:
    """A call holds a stream slot from its HEADERS on: its deadline ends it even if its message never arrives."""
    started = time.monotonic()
    sid = conn.open(INFER, (b"grpc-timeout", b"100m"))
    reply = conn.finish(sid)
    elapsed = time.monotonic() - started
    assert reply.status == 4 and reply.message == "Deadline Exceeded", reply.blocks
    assert reply.reset == NO_ERROR  # the client had not ended its side: told to stop sending
    assert 0.09 <= elapsed < 2.0, elapsed


def test_a_handler_still_running_at_the_deadline_is_ended_deadline_exceeded(conn: RawConn) -> None:
    """Health/Watch streams until cancelled: the transport's deadline ends it, after its first answer."""
    started = time.monotonic()
    body = grpc_message(health_pb2.HealthCheckRequest(service="").SerializeToString())
    sid = conn.call(WATCH, body, (b"grpc-timeout", b"200m"))
    reply = conn.finish(sid)
    elapsed = time.monotonic() - started
    assert [(kind, flags) for kind, flags, _ in reply.frames] == [
        (HEADERS, END_HEADERS),
        (DATA, 0),
        (HEADERS, END_HEADERS | END_STREAM),
    ]
    (first,) = reply.replies()
    assert health_pb2.HealthCheckResponse.FromString(first).status == health_pb2.HealthCheckResponse.SERVING
    assert reply.blocks[-1] == {b"grpc-status": b"4", b"grpc-message": b"Deadline Exceeded"}
    assert 0.19 <= elapsed < 2.0, elapsed


def test_a_deadline_inside_the_batching_window_ends_the_call_by_its_deadline(conn: RawConn) -> None:
    """mlp waits up to 0.5 s for company; a call with 200 ms left is not held for the window: the batcher, which
    gets the deadline from ``time_remaining``, closes the window ~2 ms before it and the model runs the call, or, when
    that run's reply misses the deadline (it does, often: the batcher leaves only DEADLINE_MARGIN_S = 2 ms early),
    the call ends DEADLINE_EXCEEDED at the deadline."""
    started = time.monotonic()
    reply = conn.infer(mlp_request("hurry"), (b"grpc-timeout", b"200m"))
    elapsed = time.monotonic() - started
    if reply.status == 0:
        assert ok_reply(reply, "hurry").model_name == "mlp"
    else:  # the transport's deadline, or the batcher's, whichever saw it first
        assert reply.status == 4, reply.blocks
        assert reply.message == "Deadline Exceeded" or reply.message.startswith(
            "model 'mlp' version 1: the caller's deadline passed after "
        ), reply.message
        trailers_only(reply, 4, reply.message)
    assert 0.15 < elapsed < WINDOW_S - 0.1, elapsed


# --- cancellation and limits -----------------------------------------------------------------------------------------


def test_a_reset_call_is_dropped_and_the_connection_keeps_working(conn: RawConn, server: BackgroundServer) -> None:
    before = mlp_counts(server)
    sid = conn.call(INFER, grpc_message(mlp_request("cancelled").SerializeToString()))
    conn.ping()  # the call is in the batcher's queue now
    conn.send(frame(RST_STREAM, 0, sid, U32.pack(CANCEL)))
    ok_reply(conn.infer(tiny_request("alive")), "alive")
    conn.drain(WINDOW_S + 0.3)  # past the window the cancelled call was waiting in
    assert sid not in conn.streams  # nothing at all was sent on the reset stream
    assert conn.goaway is None and not conn.eof
    assert mlp_counts(server) == before  # the batcher skipped the request: the model never ran it


def test_streams_past_the_limit_are_refused_and_the_others_finish(conn: RawConn) -> None:
    opened = [conn.open(INFER) for _ in range(MAX_STREAMS)]  # each waits for its request message
    refused = conn.open(INFER)
    conn.pump(lambda: conn.reply(refused).ended)
    assert conn.reply(refused).frames == [(RST_STREAM, 0, 4)] and conn.reply(refused).reset == REFUSED_STREAM
    assert not any(sid in conn.streams for sid in opened)
    conn.send(
        b"".join(
            frame(DATA, END_STREAM, sid, grpc_message(tiny_request(str(sid)).SerializeToString())) for sid in opened
        )
    )
    for sid in opened:
        ok_reply(conn.finish(sid), str(sid))
    ok_reply(conn.infer(tiny_request("free-again")), "free-again")


def test_rapid_reset_gets_enhance_your_calm(conn: RawConn) -> None:
    """Streams opened and cancelled at once, 1,500 of them: past the burst of 1,000 (plus 200/s) the connection ends
    with GOAWAY ENHANCE_YOUR_CALM."""
    block = conn.header_block(INFER)
    pairs = [
        frame(HEADERS, END_HEADERS, sid, block) + frame(RST_STREAM, 0, sid, U32.pack(CANCEL))
        for sid in range(1, 3001, 2)
    ]
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the server may close before it read them all
        for start in range(0, len(pairs), 100):
            conn.send(b"".join(pairs[start : start + 100]))
    conn.read_to_eof()
    assert conn.goaway is not None
    last, code, debug = conn.goaway
    assert (code, debug) == (ENHANCE_YOUR_CALM, b"too many streams cancelled")
    assert 2001 <= last < 3000  # at least the burst's 1,000 resets were taken
    assert not conn.streams  # nothing was answered on the cancelled streams


# --- protocol errors -------------------------------------------------------------------------------------------------


def _headers(conn: RawConn, sid: int, flags: int = END_HEADERS | END_STREAM) -> bytes:
    return frame(HEADERS, flags, sid, conn.header_block(INFER))


PROTOCOL_ERRORS: dict[str, tuple[Callable[[RawConn], bytes], int, int, bytes]] = {
    # name: (what the client sends, GOAWAY's last stream id, its error code, the start of its debug data)
    "data-on-idle-stream": (lambda c: frame(DATA, 0, 5, b"x"), 0, PROTOCOL_ERROR, b"DATA on stream 5, never opened"),
    "data-on-stream-0": (lambda c: frame(DATA, 0, 0, b"x"), 0, PROTOCOL_ERROR, b"DATA on stream 0, never opened"),
    "even-stream-id": (lambda c: _headers(c, 2), 0, PROTOCOL_ERROR, b"stream 2 is a server stream id"),
    "frame-over-1MiB": (
        lambda c: U32.pack(MiB + 1)[1:] + bytes([PING, 0]) + U32.pack(0),  # a frame header alone
        0,
        FRAME_SIZE_ERROR,
        b"a frame of 1048577 bytes",
    ),
    "continuation-alone": (
        lambda c: frame(CONTINUATION, END_HEADERS, 1, b"\x83"),
        0,
        PROTOCOL_ERROR,
        b"CONTINUATION without its HEADERS",
    ),
    "frame-inside-header-block": (
        lambda c: _headers(c, 1, flags=END_STREAM) + frame(PING, 0, 0, b"12345678"),
        0,
        PROTOCOL_ERROR,
        b"a frame inside a header block",
    ),
    "push-promise": (lambda c: frame(PUSH_PROMISE, END_HEADERS, 1, U32.pack(2)), 0, PROTOCOL_ERROR, b"PUSH_PROMISE"),
    "settings-on-a-stream": (lambda c: frame(SETTINGS, 0, 1), 0, PROTOCOL_ERROR, b"SETTINGS on a stream"),
    "settings-wrong-size": (lambda c: frame(SETTINGS, 0, 0, b"\x00\x04\x00"), 0, FRAME_SIZE_ERROR, b"SETTINGS of"),
    "window-over-2^31-1": (
        lambda c: frame(SETTINGS, 0, 0, SETTING.pack(INITIAL_WINDOW_SIZE, 1 << 31)),
        0,
        FLOW_CONTROL_ERROR,
        b"initial window over 2^31-1",
    ),
    "connection-window-overflow": (
        lambda c: frame(WINDOW_UPDATE, 0, 0, U32.pack((1 << 31) - 1)),
        0,
        FLOW_CONTROL_ERROR,
        b"connection window over 2^31-1",
    ),
    "window-update-of-0": (lambda c: frame(WINDOW_UPDATE, 0, 0, U32.pack(0)), 0, PROTOCOL_ERROR, b"a WINDOW_UPDATE"),
    "window-update-wrong-size": (lambda c: frame(WINDOW_UPDATE, 0, 0, b"\x00\x00\x01"), 0, FRAME_SIZE_ERROR, b"WIN"),
    "ping-wrong-size": (lambda c: frame(PING, 0, 0, b"1234567"), 0, FRAME_SIZE_ERROR, b"a PING of the wrong size"),
    "ping-on-a-stream": (lambda c: frame(PING, 0, 1, b"12345678"), 0, PROTOCOL_ERROR, b"PING on a stream"),
    "rst-on-stream-0": (lambda c: frame(RST_STREAM, 0, 0, U32.pack(CANCEL)), 0, PROTOCOL_ERROR, b"RST_STREAM on"),
    "rst-wrong-size": (
        lambda c: _headers(c, 1, END_HEADERS) + frame(RST_STREAM, 0, 1, b"\x00" * 5),
        1,
        FRAME_SIZE_ERROR,
        b"RST_STREAM of the wrong size",
    ),
    "headers-on-stream-0": (lambda c: _headers(c, 0), 0, PROTOCOL_ERROR, b"HEADERS on stream 0"),
    "new-stream-below-the-last": (
        lambda c: _headers(c, 5, END_HEADERS) + _headers(c, 3, END_HEADERS),
        5,
        PROTOCOL_ERROR,
        b"a new stream 3 below stream 5",
    ),
    "header-block-over-16KiB": (
        lambda c: frame(HEADERS, END_HEADERS, 1, c.header_block(INFER, (b"x-big", b"v" * 17_000))),
        0,
        ENHANCE_YOUR_CALM,
        b"a header block over 16384 bytes",
    ),
    "header-list-over-16KiB": (  # 600 one-byte references to ":scheme http", 43 bytes each as RFC 9113 counts
        lambda c: frame(HEADERS, END_HEADERS, 1, b"\x86" * 600),
        0,
        ENHANCE_YOUR_CALM,
        b"header list too large",
    ),
    "undecodable-header-block": (
        lambda c: frame(HEADERS, END_HEADERS, 1, b"\xff\xff\xff\xff\xff\xff"),
        0,
        9,  # COMPRESSION_ERROR
        b"header block cannot be decoded",
    ),
    "trailers-without-end-stream": (
        lambda c: _headers(c, 1, END_HEADERS) + frame(HEADERS, END_HEADERS, 1, literal(b"x-t", b"1")),
        1,
        PROTOCOL_ERROR,
        b"trailers without END_STREAM",
    ),
    "data-after-end-stream": (  # mlp's call is still in flight (its batching window) when the DATA comes
        lambda c: (
            frame(HEADERS, END_HEADERS, 1, c.header_block(INFER))
            + frame(DATA, END_STREAM, 1, grpc_message(mlp_request("m").SerializeToString()))
            + frame(DATA, 0, 1, b"more")
        ),
        1,
        PROTOCOL_ERROR,
        b"DATA on stream 1 after its END_STREAM",
    ),
}


@pytest.mark.parametrize("case", PROTOCOL_ERRORS)
def test_protocol_errors_end_the_connection_with_goaway(server: BackgroundServer, case: str) -> None:
    make, last, code, debug = PROTOCOL_ERRORS[case]
    with RawConn(server.address) as conn:
        conn.send(make(conn))
        conn.read_to_eof()
        assert conn.goaway is not None, conn.log
        assert conn.goaway[:2] == (last, code) and conn.goaway[2].startswith(debug), conn.goaway
        assert conn.log[-1][0] == GOAWAY  # and nothing after it


def test_garbage_instead_of_the_preface_closes_the_connection(server: BackgroundServer) -> None:
    with RawConn(server.address, handshake=False) as conn:
        conn.send(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        conn.read_to_eof()
        # what the server sent as it accepted the connection, and nothing after (no HTTP/1.1 answer, no GOAWAY)
        assert [(kind, sid) for kind, _, sid, _ in conn.log] == [(SETTINGS, 0), (WINDOW_UPDATE, 0)]
        assert not conn.buf


def test_ping_is_answered_with_its_payload(conn: RawConn) -> None:
    conn.send(frame(PING, ACK, 0, b"not-mine") + frame(PING, 0, 0, b"\x00\x01\x02\x03\xfc\xfd\xfe\xff"))
    conn.pump(lambda: bool(conn.pings))
    conn.ping()  # anything else would have come before this round trip's ACK
    assert conn.pings == [b"\x00\x01\x02\x03\xfc\xfd\xfe\xff"]  # the client's own ACK is not answered
    assert [f[:3] for f in conn.log if f[0] == PING] == [(PING, ACK, 0)] * 2


def test_replies_never_exceed_the_clients_stream_window(server: BackgroundServer) -> None:
    """A stream window of 10 bytes: the reply comes 10 bytes per WINDOW_UPDATE, then (the client raising its
    initial window, which applies to open streams) the rest at once; the trailers only after the last byte."""
    with RawConn(server.address, SETTING.pack(INITIAL_WINDOW_SIZE, 10)) as conn:
        sid = conn.call(INFER, grpc_message(tiny_request("trickle").SerializeToString()))
        reply = conn.reply(sid)
        granted = 10
        for _ in range(3):

            def arrived(n: int = granted) -> bool:
                return len(reply.data) == n

            conn.pump(arrived)
            conn.ping()  # anything past the window would have come before the ACK
            assert len(reply.data) == granted and not reply.ended
            conn.send(frame(WINDOW_UPDATE, 0, sid, U32.pack(10)))
            granted += 10
        conn.send(frame(SETTINGS, 0, 0, SETTING.pack(INITIAL_WINDOW_SIZE, 65_535)))
        conn.finish(sid)
        data_frames = [size for kind, _, size in reply.frames if kind == DATA]
        assert data_frames == [10, 10, 10, 10, len(reply.data) - 40], data_frames  # the 4th: the last update's
        assert reply.frames[-1][:2] == (HEADERS, END_HEADERS | END_STREAM)
        assert reply.blocks[-1] == {b"grpc-status": b"0"}
        (message,) = reply.replies()
        assert pb.ModelInferResponse.FromString(message).id == "trickle"
        assert conn.settings_acks == 2


def test_a_stream_call_answers_each_request_and_ends_ok(conn: RawConn) -> None:
    sid = conn.open(STREAM_INFER)
    bad = request_for("nope", {"input": np.ones((1, 16), np.float32)}, id="s3")
    two = b"".join(grpc_message(tiny_request(f"s{i}", i).SerializeToString()) for i in (1, 2))
    conn.send(frame(DATA, 0, sid, two))  # two requests in one DATA frame
    reply = conn.reply(sid)
    conn.pump(lambda: len(reply.replies()) == 2)
    conn.send(frame(DATA, 0, sid, grpc_message(bad.SerializeToString())))
    conn.pump(lambda: len(reply.replies()) == 3)
    assert not reply.ended and reply.blocks == [{b":status": b"200", b"content-type": b"application/grpc"}]
    answers = [pb.ModelStreamInferResponse.FromString(m) for m in reply.replies()]
    assert [a.infer_response.id for a in answers] == ["s1", "s2", "s3"]
    assert [a.error_message for a in answers[:2]] == ["", ""]
    assert [list(o.shape) for o in answers[0].infer_response.outputs] == [[1, 4]]
    assert "nope" in answers[2].error_message
    conn.send(frame(DATA, END_STREAM, sid))
    conn.finish(sid)
    assert reply.blocks[-1] == {b"grpc-status": b"0"} and reply.reset is None


# --- graceful shutdown -----------------------------------------------------------------------------------------------


def stop_with_a_call_in_flight(
    running: BackgroundServer, conn: RawConn, request_id: str
) -> tuple[int, float, concurrent.futures.Future[None]]:
    """Queue an mlp call in its batching window, start ``stop(5.0)`` and wait for its GOAWAY: (the call's stream,
    when stop began, stop's future)."""
    sid = conn.call(INFER, grpc_message(mlp_request(request_id).SerializeToString()))
    conn.ping()  # queued in mlp's window
    started = time.monotonic()
    stopped = asyncio.run_coroutine_threadsafe(running.server.stop(5.0), running.loop)
    conn.pump(lambda: conn.goaway is not None)
    return sid, started, stopped


def test_shutdown_ends_as_soon_as_the_last_call_is_cancelled(example_repo: Path, tmp_path: Path) -> None:
    """A call reset by its client during the grace period counts as finished: the server does not wait it out."""
    with (
        background_server(repository(example_repo, tmp_path), http_port=None) as running,
        RawConn(running.address) as conn,
    ):
        sid, started, stopped = stop_with_a_call_in_flight(running, conn, "to-cancel")
        conn.send(frame(RST_STREAM, 0, sid, U32.pack(CANCEL)))
        conn.read_to_eof()
        stopped.result(5)
        assert time.monotonic() - started < 3.0


def test_shutdown_sends_goaway_serves_the_calls_in_flight_and_refuses_new_streams(
    example_repo: Path, tmp_path: Path
) -> None:
    with (
        background_server(repository(example_repo, tmp_path), http_port=None) as running,
        RawConn(running.address) as conn,
    ):
        sid, started, stopped = stop_with_a_call_in_flight(running, conn, "in-flight")
        assert conn.goaway == (sid, NO_ERROR, b"")
        late = conn.call(INFER, grpc_message(tiny_request("late").SerializeToString()))
        conn.pump(lambda: conn.reply(late).ended)
        assert conn.reply(late).frames == [(RST_STREAM, 0, 4)] and conn.reply(late).reset == REFUSED_STREAM
        assert ok_reply(conn.finish(sid), "in-flight").model_name == "mlp"
        conn.read_to_eof()  # no calls left: the server closes the connection, well before the grace period ends
        stopped.result(5)
        assert time.monotonic() - started < 3.0
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", running.server.grpc_port), timeout=2).close()


# --- a transport serving test handlers, through grpcio ---------------------------------------------------------------


@dataclass
class Echo:
    address: str
    cancelled: threading.Event


@pytest.fixture(scope="module")
def echo() -> Iterator[Echo]:
    """The transport alone, serving a few generic handlers on its own event loop thread."""
    cancelled = threading.Event()

    async def metadata(request: bytes, context: Any) -> bytes:
        await context.send_initial_metadata([("x-initial", "i")])
        context.set_trailing_metadata([("x-trailer-bin", b"\x00\xfe"), ("x-trailer", "t")])
        seen = [(k, v if isinstance(v, bytes) else v.encode()) for k, v in context.invocation_metadata()]
        return b"\n".join(k.encode() + b"=" + v.hex().encode() for k, v in sorted(seen))

    async def remaining(request: bytes, context: Any) -> bytes:
        return repr(context.time_remaining()).encode()

    async def boom(request: bytes, context: Any) -> bytes:
        raise RuntimeError("boom")

    async def wait(request: bytes, context: Any) -> bytes:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        raise AssertionError("unreachable")

    async def reverse(request: bytes, context: Any) -> bytes:
        return request[::-1]

    async def chat(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        async for message in requests:
            yield message[::-1]

    unary = grpc.unary_unary_rpc_method_handler
    handlers = {"Metadata": unary(metadata), "Remaining": unary(remaining), "Boom": unary(boom), "Wait": unary(wait),
                "Reverse": unary(reverse)}  # fmt: skip
    services = Services()
    services.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "ferry.test.Echo", {**handlers, "Chat": grpc.stream_stream_rpc_method_handler(chat)}
            )
        ]
    )
    transport = Transport(services, Limits(max_message_bytes=16 * MiB, max_concurrent_streams=16))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="transport-test", daemon=True)
    thread.start()
    try:
        port = asyncio.run_coroutine_threadsafe(transport.start("127.0.0.1", 0), loop).result(10)
        yield Echo(f"127.0.0.1:{port}", cancelled)
    finally:
        asyncio.run_coroutine_threadsafe(transport.stop(0.5), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def test_metadata_reaches_the_handler_and_comes_back(echo: Echo) -> None:
    """Request metadata (``-bin`` values base64 on the wire, bytes to the handler; the transport's own headers left
    out); initial and trailing metadata the handler sets reach the client."""
    with grpc.insecure_channel(echo.address) as channel:
        call = channel.unary_unary("/ferry.test.Echo/Metadata")
        sent = [("x-text", "hello world"), ("x-data-bin", b"\x00\x01\xff\x80")]
        reply, state = call.with_call(b"", metadata=sent, timeout=10)
    seen = dict(line.split(b"=") for line in reply.split(b"\n"))
    assert seen[b"x-text"] == b"hello world".hex().encode()
    assert seen[b"x-data-bin"] == b"\x00\x01\xff\x80".hex().encode()
    assert b"user-agent" in seen  # grpcio's own
    assert not {b"te", b"content-type", b"grpc-timeout", b"grpc-accept-encoding"} & set(seen)
    assert not any(key.startswith(b":") for key in seen)
    assert ("x-initial", "i") in state.initial_metadata()
    assert {("x-trailer-bin", b"\x00\xfe"), ("x-trailer", "t")} <= set(state.trailing_metadata())


def test_time_remaining_is_the_grpc_timeout(echo: Echo) -> None:
    with grpc.insecure_channel(echo.address) as channel:
        call = channel.unary_unary("/ferry.test.Echo/Remaining")
        assert call(b"", timeout=None) == b"None"
        remaining = float(call(b"", timeout=10))
    assert 8.0 < remaining <= 10.5  # grpcio rounds the timeout it sends up


def test_a_handler_past_its_deadline_is_cancelled(echo: Echo) -> None:
    """The transport's own deadline (raw frames: no client-side deadline or RST_STREAM): the call ends
    DEADLINE_EXCEEDED at its grpc-timeout and the handler is cancelled."""
    echo.cancelled.clear()
    with RawConn(echo.address) as conn:
        started = time.monotonic()
        reply = conn.finish(conn.call(b"/ferry.test.Echo/Wait", grpc_message(b""), (b"grpc-timeout", b"200m")))
        assert time.monotonic() - started >= 0.19
        trailers_only(reply, 4, "Deadline Exceeded")
    assert echo.cancelled.wait(5)  # the handler saw the cancellation


def test_a_handlers_unexpected_exception_is_unknown(echo: Echo) -> None:
    with grpc.insecure_channel(echo.address) as channel, pytest.raises(grpc.RpcError) as err:
        channel.unary_unary("/ferry.test.Echo/Boom")(b"", timeout=10)
    assert err.value.code() == grpc.StatusCode.UNKNOWN
    assert err.value.details() == "Unexpected RuntimeError: boom"


def test_a_bidirectional_stream_through_grpcio(echo: Echo) -> None:
    with grpc.insecure_channel(echo.address) as channel:
        chat = channel.stream_stream("/ferry.test.Echo/Chat")
        sent = [b"abc", b"", bytes(range(256)) * 1200, b"12345"]  # 300 KiB: past the windows
        assert list(chat(iter(sent), timeout=10)) == [m[::-1] for m in sent]


def test_messages_of_megabytes_cross_both_ways(echo: Echo) -> None:
    """A unary request and reply of 6 MiB, several times the 1 MiB stream window each way (the request's window is
    given back as it arrives, the reply waits for grpcio's WINDOW_UPDATEs); three at once on one connection."""
    options = [("grpc.max_send_message_length", 16 * MiB), ("grpc.max_receive_message_length", 16 * MiB)]
    with grpc.insecure_channel(echo.address, options=options) as channel:
        reverse = channel.unary_unary("/ferry.test.Echo/Reverse")
        sent = [bytes([i]) * 1000 + bytes(range(256)) * (6 * MiB // 256) for i in range(3)]
        calls = [reverse.future(m, timeout=30) for m in sent]
        assert [c.result() for c in calls] == [m[::-1] for m in sent]

"""Ferry's transport against hostile and unlucky clients (issue 12).

A. Each attack class runs against a real ``ferry serve`` subprocess (so its RSS and CPU time are its own) while a
bystander on its own connection calls ``tiny`` and ``mlp`` with a 1 s deadline: the attacker's connection ends with
the stated GOAWAY (or its requests are refused), the bystander is served during the attack (at least 75% of its
calls) and after it (all), the server's RSS grows by less than 200 MiB, and its CPU is idle again within 2 s of the
attacker leaving. Every attack is bounded in frames and in seconds.

B. Precise answers to what RFC 9113, RFC 7541 and gRPC forbid (a stream error leaves the connection serving), and
reply header blocks that index what repeats.
"""

from __future__ import annotations

import contextlib
import gzip
import itertools
import math
import shutil
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from benchmarks.bench import cpu_seconds
from ferry.client._proto import grpc_service_pb2_grpc as pb_grpc
from ferry.server.transport.http2 import (
    CANCEL,
    COMPRESSION_ERROR,
    CONTINUATION,
    DATA,
    DEFAULT_FRAME,
    DEFAULT_WINDOW,
    ENABLE_PUSH,
    END_HEADERS,
    END_STREAM,
    ENHANCE_YOUR_CALM,
    FLOW_CONTROL_ERROR,
    FRAME_SIZE_ERROR,
    HEADER_TABLE_SIZE,
    HEADERS,
    INITIAL_WINDOW_SIZE,
    MAX_CONCURRENT_STREAMS,
    MAX_FRAME_SIZE,
    MAX_WINDOW,
    PING,
    PREFACE,
    PRIORITY,
    PRIORITY_FRAME,
    PROTOCOL_ERROR,
    RST_STREAM,
    SETTING,
    SETTINGS,
    U32,
    WINDOW_UPDATE,
    frame,
    literal,
)
from tests.rawh2 import INFER, RawConn, grpc_message, mlp_request, ok_reply, tiny_request
from tests.serving import FerryProcess as Ferry
from tests.serving import rss_kib

MiB = 1 << 20
DEADLINE_S = 1.0  # each bystander call's deadline
PERIOD_S = 0.05  # the bystander starts a tiny and an mlp call this often
SERVED_SHARE = 0.75  # of the bystander's calls started during an attack
DURING_S = 0.5  # the least time counted as "during the attack", for the attacks the server ends at once
AFTER_CALLS = 5  # of each model after the attack, all of which must succeed
RSS_GROWTH_MIB = 200
IDLE_SHARE = 0.10  # of one core, over IDLE_WINDOW_S
IDLE_WINDOW_S = 1.0
IDLE_WITHIN_S = 2.0  # of the attacker leaving
ATTACK_S = 4.0  # the longest an attacker sends
ANSWER_WAIT_S = 3.0  # how long an attacker then waits for the server to end its connection
CHUNK = 1 << 16  # bytes of frames per write
RESETS_ALLOWED = 1300  # streams reset before the GOAWAY: the burst of ~1,000, and what refills while we send

HEALTH_CHECK = b"/grpc.health.v1.Health/Check"
REFLECTION = b"/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
REQUESTS = (tiny_request("bystander"), mlp_request("bystander"))
TINY_BODY = grpc_message(tiny_request("tiny").SerializeToString())


# --- the server: ferry serve in a subprocess -------------------------------------------------------------------------


def answers(ferry: Ferry) -> bool:
    """Whether it runs and answers tiny and mlp on a new connection within 2 s."""
    if ferry.proc is None or ferry.proc.poll() is not None:
        return False
    with grpc.insecure_channel(ferry.address) as channel:
        infer = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer
        try:
            for request in REQUESTS:
                infer(request, timeout=2.0)
        except grpc.RpcError:
            return False
    return True


@pytest.fixture(scope="module")
def server(example_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ferry]:
    root = tmp_path_factory.mktemp("abuse")
    for name in ("tiny", "mlp"):
        shutil.copytree(example_repo / name, root / name)
    ferry = Ferry(root, log=root / "ferry.log")
    try:
        ferry.start()
        yield ferry
    finally:
        ferry.stop()


@pytest.fixture
def ferry(server: Ferry) -> Ferry:
    """The module's server, restarted first if an earlier test left it unable to answer (so that one failure does
    not fail every test after it)."""
    if not answers(server):
        server.stop()
        server.start()
    return server


# --- what an attack does to everyone else ----------------------------------------------------------------------------


def rss_mib(pid: int) -> float:
    return rss_kib(pid) / 1024


def cpu_s(pid: int) -> float:
    """User and system CPU time the process has used."""
    used = cpu_seconds(pid)
    assert used is not None, f"no CPU time for process {pid}"
    return used


def least_busy(pid: int) -> float:
    """The least share of a core the process used over an ``IDLE_WINDOW_S`` span starting within ``IDLE_WITHIN_S``
    of now (polled every 0.1 s; returns as soon as a span is under ``IDLE_SHARE``)."""
    samples = [(time.monotonic(), cpu_s(pid))]
    least = math.inf
    while least >= IDLE_SHARE and samples[-1][0] - samples[0][0] < IDLE_WITHIN_S + IDLE_WINDOW_S:
        time.sleep(0.1)
        now, used = time.monotonic(), cpu_s(pid)
        samples.append((now, used))
        spans = [(then, before) for then, before in samples if now - then >= IDLE_WINDOW_S]
        if spans:
            then, before = spans[-1]
            least = min(least, (used - before) / (now - then))
    return least


class Bystander:
    """A client minding its own business on its own connection: a tiny and an mlp call, each with a ``DEADLINE_S``
    deadline, every ``PERIOD_S`` until ``calling_until``; meanwhile it samples the server's RSS."""

    def __init__(self, ferry: Ferry) -> None:
        self.pid = ferry.pid
        self.channel = grpc.insecure_channel(ferry.address)
        self.infer = pb_grpc.GRPCInferenceServiceStub(self.channel).ModelInfer
        self.calls: list[tuple[float, grpc.Future]] = []  # (when it started, the call)
        self.calling_until = math.inf  # time.monotonic()
        self.peak_rss_mib = rss_mib(self.pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bystander", daemon=True)

    def __enter__(self) -> Bystander:
        for request in REQUESTS:  # connected and answered before the attack starts
            self.infer(request, timeout=10, wait_for_ready=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        for _, call in self.calls:
            call.cancel()
        self.channel.close()

    def _run(self) -> None:
        while not self._stop.wait(PERIOD_S):
            started = time.monotonic()
            if started <= self.calling_until:
                self.calls += [(started, self.infer.future(request, timeout=DEADLINE_S)) for request in REQUESTS]
            self.peak_rss_mib = max(self.peak_rss_mib, rss_mib(self.pid))

    def served(self, start: float, end: float) -> tuple[int, int]:
        """(calls that succeeded, calls made) of those started from ``start`` to ``end``."""
        made = [call for started, call in self.calls if start <= started <= end]
        return sum(call.exception() is None for call in made), len(made)

    def batch(self) -> tuple[int, int]:
        """``AFTER_CALLS`` calls of each model at once: (succeeded, made)."""
        calls = [self.infer.future(request, timeout=DEADLINE_S) for request in REQUESTS for _ in range(AFTER_CALLS)]
        return sum(call.exception() is None for call in calls), len(calls)


@dataclass
class Outcome:
    """What an attack did to the others, measured once the attacker left."""

    during: tuple[int, int] = (0, 0)  # the bystander's calls started during the attack: (succeeded, made)
    after: tuple[int, int] = (0, 0)  # a batch of calls after it
    rss_growth_mib: float = math.inf
    busy: float = math.inf  # the least share of a core used over 1 s, starting within 2 s of the attacker leaving

    def check(self) -> None:
        problems = []
        for (served, made), when in ((self.during, "during"), (self.after, "after")):
            if not made or served < (SERVED_SHARE if when == "during" else 1.0) * made:
                problems.append(f"the bystander was served {served} of {made} calls {when} the attack")
        if self.rss_growth_mib >= RSS_GROWTH_MIB:
            problems.append(f"the server's RSS grew by {self.rss_growth_mib:.0f} MiB")
        if self.busy >= IDLE_SHARE:
            problems.append(f"the server used {self.busy:.0%} of a core or more after the attacker left")
        assert not problems, "; ".join(problems)


@contextlib.contextmanager
def under_attack(ferry: Ferry) -> Iterator[Outcome]:
    """Run the block (the attack, which closes its connections before it ends) beside a :class:`Bystander`; the
    :class:`Outcome` yielded is filled in once the block is over. The bystander calls through the attack, and on
    for what is left of ``DURING_S`` if the attack ended sooner (its calls then count against the idle CPU too)."""
    outcome = Outcome()
    baseline = rss_mib(ferry.pid)
    with Bystander(ferry) as bystander:
        started = time.monotonic()
        yield outcome
        bystander.calling_until = max(time.monotonic(), started + DURING_S)
        outcome.busy = least_busy(ferry.pid)  # at least IDLE_WINDOW_S: the bystander's calls are all made
        outcome.during = bystander.served(started, bystander.calling_until)
        outcome.after = bystander.batch()
        outcome.rss_growth_mib = bystander.peak_rss_mib - baseline


def repeated(unit: bytes, count: int) -> Iterator[bytes]:
    """``count`` copies of ``unit``, in writes of about ``CHUNK`` bytes."""
    per_write = max(1, CHUNK // len(unit))
    for done in range(0, count, per_write):
        yield unit * min(per_write, count - done)


def attack(conn: RawConn, writes: Iterable[bytes]) -> None:
    """Send ``writes`` (for ``ATTACK_S`` at most, and only until the server ends the connection), then give the
    server ``ANSWER_WAIT_S`` to end it."""
    conn.flood(writes, ATTACK_S)
    conn.drain(ANSWER_WAIT_S)  # returns at EOF


def assert_goaway(conn: RawConn, code: int) -> None:
    """The server ended the connection with a GOAWAY of ``code``."""
    assert conn.goaway is not None, f"no GOAWAY; the connection was {'closed' if conn.eof else 'still open'}"
    assert conn.goaway[1] == code, f"GOAWAY {conn.goaway}, not error code {code}"
    assert conn.eof, "the connection stayed open after the GOAWAY"


# --- A. attack classes -----------------------------------------------------------------------------------------------


def test_ping_flood_is_goaway_enhance_your_calm(ferry: Ferry) -> None:
    with under_attack(ferry) as outcome, RawConn(ferry.address) as conn:
        attack(conn, repeated(frame(PING, 0, 0, b"pingpong"), 50_000))
    assert_goaway(conn, ENHANCE_YOUR_CALM)
    outcome.check()


def test_settings_flood_is_goaway_enhance_your_calm(ferry: Ferry) -> None:
    empty_and_small = frame(SETTINGS, 0, 0) + frame(SETTINGS, 0, 0, SETTING.pack(ENABLE_PUSH, 0))
    with under_attack(ferry) as outcome, RawConn(ferry.address) as conn:
        attack(conn, repeated(empty_and_small, 25_000))
    assert_goaway(conn, ENHANCE_YOUR_CALM)
    outcome.check()


def test_a_settings_frame_of_thousands_of_entries_is_goaway_enhance_your_calm_at_once(ferry: Ferry) -> None:
    """As many INITIAL_WINDOW_SIZE entries as the server's largest frame holds (1 MiB: 174,762), with hundreds of
    streams open: each entry would touch every stream's window."""
    with under_attack(ferry) as outcome, RawConn(ferry.address) as conn:
        block = conn.header_block(INFER)
        opened = min(500, conn.settings.get(MAX_CONCURRENT_STREAMS, 500))
        conn.send(b"".join(frame(HEADERS, END_HEADERS, conn.stream_id(), block) for _ in range(opened)))
        conn.ping()  # they are all open (each waits for its request message)
        entries = SETTING.pack(INITIAL_WINDOW_SIZE, 70_000) + SETTING.pack(INITIAL_WINDOW_SIZE, DEFAULT_WINDOW)
        size = min(MiB, conn.settings.get(MAX_FRAME_SIZE, DEFAULT_FRAME))
        sent = time.monotonic()
        attack(conn, [frame(SETTINGS, 0, 0, entries * (size // len(entries)))])
    assert_goaway(conn, ENHANCE_YOUR_CALM)
    took = (conn.goaway_at or math.inf) - sent
    assert took < 1.0, f"the GOAWAY came {took:.2f} s after the SETTINGS frame"
    outcome.check()


def test_empty_data_frames_flood_is_goaway_enhance_your_calm(ferry: Ferry) -> None:
    """CVE-2019-9518: zero-length DATA frames on an open stream."""
    with under_attack(ferry) as outcome, RawConn(ferry.address) as conn:
        sid = conn.open(INFER)
        attack(conn, repeated(frame(DATA, 0, sid, b""), 100_000))
    assert_goaway(conn, ENHANCE_YOUR_CALM)
    outcome.check()


def test_empty_continuation_frames_flood_is_goaway_enhance_your_calm(ferry: Ferry) -> None:
    with under_attack(ferry) as outcome, RawConn(ferry.address) as conn:
        sid = conn.stream_id()
        opening = frame(HEADERS, 0, sid, conn.header_block(INFER))  # no END_HEADERS: CONTINUATION frames follow
        attack(conn, itertools.chain([opening], repeated(frame(CONTINUATION, 0, sid, b""), 100_000)))
    assert_goaway(conn, ENHANCE_YOUR_CALM)
    outcome.check()


def test_priority_frames_flood_is_goaway_enhance_your_calm(ferry: Ferry) -> None:
    with under_attack(ferry) as outcome, RawConn(ferry.address) as conn:
        sid = conn.open(INFER)
        attack(conn, repeated(frame(PRIORITY_FRAME, 0, sid, U32.pack(0) + b"\x0f"), 100_000))
    assert_goaway(conn, ENHANCE_YOUR_CALM)
    outcome.check()


def test_header_blocks_of_thousands_of_empty_fields_are_goaway_enhance_your_calm(ferry: Ferry) -> None:
    """CVE-2019-9516: 2,000 empty fields are 6 KB encoded and a 64,000-byte header list (32 bytes of overhead each),
    past the 16 KiB limit."""
    with under_attack(ferry) as outcome, RawConn(ferry.address) as conn:
        block = conn.header_block(INFER) + literal(b"", b"") * 2_000
        attack(conn, (frame(HEADERS, END_HEADERS | END_STREAM, conn.stream_id(), block) for _ in range(200)))
    assert_goaway(conn, ENHANCE_YOUR_CALM)
    outcome.check()


def test_header_blocks_of_thousands_of_table_size_updates_are_goaway_compression_error_at_once(
    ferry: Ferry,
) -> None:
    """8,000 dynamic table size updates (0x20: size 0) before a request's fields: more than two in a block is a
    COMPRESSION_ERROR, at the first block."""
    with under_attack(ferry) as outcome, RawConn(ferry.address) as conn:
        block = b"\x20" * 8_000 + conn.header_block(INFER)
        attack(conn, (frame(HEADERS, END_HEADERS | END_STREAM, conn.stream_id(), block) for _ in range(200)))
    assert_goaway(conn, COMPRESSION_ERROR)
    assert conn.goaway and conn.goaway[0] <= 1, conn.goaway  # stream 1's block was the first
    outcome.check()


def test_a_header_block_growing_past_16_KiB_is_goaway_enhance_your_calm(ferry: Ferry) -> None:
    """HEADERS and CONTINUATION frames of 1 KB each, never ending the block (512 KB at most)."""
    with under_attack(ferry) as outcome, RawConn(ferry.address) as conn:
        sid = conn.stream_id()
        opening = frame(HEADERS, 0, sid, conn.header_block(INFER))
        more = (frame(CONTINUATION, 0, sid, literal(b"x-pad", b"p" * 1_000)) for _ in range(512))
        attack(conn, itertools.chain([opening], more))
    assert_goaway(conn, ENHANCE_YOUR_CALM)
    outcome.check()


def test_rapid_reset_counts_streams_already_answered(ferry: Ferry) -> None:
    """3,000 streams, each reset (CANCEL) right after its request: three in four are health checks the server
    answers in the turn that reads them, so the reset finds them closed; the fourth is reset while open. Every
    reset counts: GOAWAY ENHANCE_YOUR_CALM after at most ~1,000 of them."""
    check = grpc_message(health_pb2.HealthCheckRequest().SerializeToString())

    def streams(conn: RawConn) -> Iterator[bytes]:
        """Writes of 100 streams, each opened and reset."""
        health, infer = conn.header_block(HEALTH_CHECK), conn.header_block(INFER)
        write = b""
        for n in range(1, 3_001):
            sid = conn.stream_id()
            if n % 4:
                write += frame(HEADERS, END_HEADERS, sid, health) + frame(DATA, END_STREAM, sid, check)
            else:
                write += frame(HEADERS, END_HEADERS, sid, infer)
            write += frame(RST_STREAM, 0, sid, U32.pack(CANCEL))
            if n % 100 == 0:
                yield write
                write = b""

    with under_attack(ferry) as outcome, RawConn(ferry.address) as conn:
        attack(conn, streams(conn))
    assert_goaway(conn, ENHANCE_YOUR_CALM)
    assert conn.goaway and conn.goaway[0] < 2 * RESETS_ALLOWED, conn.goaway  # at most ~1,300 streams taken
    outcome.check()


def write_without_reading(sock: socket.socket, writes: Iterable[bytes], seconds: float) -> None:
    """Write ``writes`` in order, as far as the server takes them, for ``seconds``; never read."""
    deadline = time.monotonic() + seconds
    sock.settimeout(0.1)
    pending = memoryview(b"")
    writes = iter(writes)
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        while time.monotonic() < deadline:
            if not pending:
                pending = memoryview(next(writes, b""))
                if not pending:
                    break
            with contextlib.suppress(TimeoutError):
                pending = pending[sock.send(pending) :]
    time.sleep(max(0.0, deadline - time.monotonic()))  # the attack lasts its time, all of it unread


def test_a_client_that_never_reads_is_not_read_either(ferry: Ferry) -> None:
    """A client with a small receive buffer that opens its windows wide, asks on 16 reflection streams for a
    descriptor of ~18 KB again and again (37 bytes a request), pings, and never reads: the server stops reading
    it, so its memory stays bounded and the others are served. (Windows: 8 MiB of DATA in all, 512 KiB a stream,
    within the server's, whatever it gives back.)"""
    ask = grpc_message(
        reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="inference.GRPCInferenceService"
        ).SerializeToString()
    )
    per_write = 100
    with under_attack(ferry) as outcome, RawConn(ferry.address, handshake=False, rcvbuf=4096) as conn:
        streams = [conn.stream_id() for _ in range(16)]
        opening = PREFACE + frame(SETTINGS, 0, 0, SETTING.pack(INITIAL_WINDOW_SIZE, MAX_WINDOW))
        opening += frame(WINDOW_UPDATE, 0, 0, U32.pack(MAX_WINDOW - DEFAULT_WINDOW))
        opening += b"".join(frame(HEADERS, END_HEADERS, sid, conn.header_block(REFLECTION)) for sid in streams)
        requests = (
            frame(DATA, 0, sid, ask * per_write) + frame(PING, 0, 0, b"unread!!") * per_write
            for sid in streams
            for _ in range((512 << 10) // (len(ask) * per_write))
        )
        write_without_reading(conn.sock, itertools.chain([opening], requests), ATTACK_S)
    outcome.check()


def test_unknown_frame_types_flood_is_goaway_enhance_your_calm(ferry: Ferry) -> None:
    with under_attack(ferry) as outcome, RawConn(ferry.address) as conn:
        attack(conn, repeated(frame(0xFA, 0, 0), 100_000))
    assert_goaway(conn, ENHANCE_YOUR_CALM)
    outcome.check()


# --- B. precise answers ----------------------------------------------------------------------------------------------

METHOD, SCHEME, PATH = (b":method", b"POST"), (b":scheme", b"http"), (b":path", INFER)
AUTHORITY, CONTENT_TYPE, TE = (b":authority", b"ferry"), (b"content-type", b"application/grpc"), (b"te", b"trailers")

MALFORMED = {  # RFC 9113 §8.2-8.3
    "uppercase-name": [METHOD, SCHEME, PATH, AUTHORITY, CONTENT_TYPE, TE, (b"X-Upper", b"1")],
    "connection": [METHOD, SCHEME, PATH, AUTHORITY, CONTENT_TYPE, TE, (b"connection", b"keep-alive")],
    "transfer-encoding": [METHOD, SCHEME, PATH, AUTHORITY, CONTENT_TYPE, TE, (b"transfer-encoding", b"chunked")],
    "upgrade": [METHOD, SCHEME, PATH, AUTHORITY, CONTENT_TYPE, TE, (b"upgrade", b"h2c")],
    "keep-alive": [METHOD, SCHEME, PATH, AUTHORITY, CONTENT_TYPE, TE, (b"keep-alive", b"timeout=5")],
    "proxy-connection": [METHOD, SCHEME, PATH, AUTHORITY, CONTENT_TYPE, TE, (b"proxy-connection", b"keep-alive")],
    "te-gzip": [METHOD, SCHEME, PATH, AUTHORITY, CONTENT_TYPE, (b"te", b"gzip")],
    "unknown-pseudo-header": [METHOD, SCHEME, PATH, AUTHORITY, (b":foo", b"bar"), CONTENT_TYPE, TE],
    "pseudo-header-after-a-regular-one": [METHOD, SCHEME, PATH, CONTENT_TYPE, AUTHORITY, TE],
    "duplicated-path": [METHOD, SCHEME, PATH, PATH, AUTHORITY, CONTENT_TYPE, TE],
    "empty-name": [METHOD, SCHEME, PATH, AUTHORITY, CONTENT_TYPE, TE, (b"", b"x")],
    "space-in-name": [METHOD, SCHEME, PATH, AUTHORITY, CONTENT_TYPE, TE, (b"x y", b"1")],
    "no-scheme": [METHOD, PATH, AUTHORITY, CONTENT_TYPE, TE],
    "no-path": [METHOD, SCHEME, AUTHORITY, CONTENT_TYPE, TE],
}


def fields_block(fields: Iterable[tuple[bytes, bytes]]) -> bytes:
    """Literal fields without indexing, new names (so any name, even a malformed one, goes on the wire as it is)."""
    return b"".join(literal(name, value) for name, value in fields)


def assert_reset(conn: RawConn, sid: int, code: int) -> None:
    """The server answered stream ``sid`` with RST_STREAM ``code`` and nothing else."""
    conn.pump(lambda: conn.reply(sid).ended, timeout=2.0)
    reply = conn.reply(sid)
    assert reply.frames == [(RST_STREAM, 0, 4)] and reply.reset == code, reply


def assert_still_serves(conn: RawConn) -> None:
    ok_reply(conn.infer(tiny_request("after")), "after")
    assert conn.goaway is None and not conn.eof


@pytest.mark.parametrize("case", MALFORMED)
def test_a_malformed_request_is_reset_protocol_error(ferry: Ferry, case: str) -> None:
    with RawConn(ferry.address) as conn:
        sid = conn.stream_id()
        block = fields_block(MALFORMED[case])
        conn.send(frame(HEADERS, END_HEADERS, sid, block) + frame(DATA, END_STREAM, sid, TINY_BODY))
        assert_reset(conn, sid, PROTOCOL_ERROR)
        assert_still_serves(conn)


def test_pseudo_headers_in_trailers_are_reset_protocol_error(ferry: Ferry) -> None:
    with RawConn(ferry.address) as conn:
        sid = conn.stream_id()
        conn.send(
            frame(HEADERS, END_HEADERS, sid, conn.header_block(INFER))
            + frame(DATA, 0, sid, TINY_BODY)
            + frame(HEADERS, END_HEADERS | END_STREAM, sid, fields_block([PATH]))
        )
        assert_reset(conn, sid, PROTOCOL_ERROR)
        assert_still_serves(conn)


def test_a_stream_window_update_of_0_is_reset_protocol_error(ferry: Ferry) -> None:
    with RawConn(ferry.address) as conn:
        sid = conn.open(INFER)
        conn.send(frame(WINDOW_UPDATE, 0, sid, U32.pack(0)))
        assert_reset(conn, sid, PROTOCOL_ERROR)
        assert_still_serves(conn)


def test_a_stream_window_past_2_31_is_reset_flow_control_error(ferry: Ferry) -> None:
    with RawConn(ferry.address) as conn:
        sid = conn.open(INFER)
        conn.send(frame(WINDOW_UPDATE, 0, sid, U32.pack(MAX_WINDOW - DEFAULT_WINDOW + 1)))
        assert_reset(conn, sid, FLOW_CONTROL_ERROR)
        assert_still_serves(conn)


def test_a_connection_window_past_2_31_is_goaway_flow_control_error(ferry: Ferry) -> None:
    with RawConn(ferry.address) as conn:
        conn.send(frame(WINDOW_UPDATE, 0, 0, U32.pack(MAX_WINDOW - DEFAULT_WINDOW + 1)))
        conn.drain(2.0)
        assert_goaway(conn, FLOW_CONTROL_ERROR)


def test_an_initial_window_size_that_overflows_an_open_stream_is_goaway_flow_control_error(ferry: Ferry) -> None:
    with RawConn(ferry.address) as conn:
        sid = conn.open(INFER)
        conn.send(frame(WINDOW_UPDATE, 0, sid, U32.pack(MAX_WINDOW - DEFAULT_WINDOW)))  # now 2^31-1: legal
        conn.ping()
        assert sid not in conn.streams and conn.goaway is None
        conn.send(frame(SETTINGS, 0, 0, SETTING.pack(INITIAL_WINDOW_SIZE, DEFAULT_WINDOW + 1)))
        conn.drain(2.0)
        assert_goaway(conn, FLOW_CONTROL_ERROR)


def test_a_priority_frame_depending_on_its_own_stream_is_reset_protocol_error(ferry: Ferry) -> None:
    with RawConn(ferry.address) as conn:
        sid = conn.open(INFER)
        conn.send(frame(PRIORITY_FRAME, 0, sid, U32.pack(sid) + b"\x0f"))
        assert_reset(conn, sid, PROTOCOL_ERROR)
        assert_still_serves(conn)


@pytest.mark.parametrize("size", [4, 6])
def test_a_priority_frame_of_the_wrong_size_is_reset_frame_size_error(ferry: Ferry, size: int) -> None:
    with RawConn(ferry.address) as conn:
        sid = conn.open(INFER)
        conn.send(frame(PRIORITY_FRAME, 0, sid, bytes(size)))
        assert_reset(conn, sid, FRAME_SIZE_ERROR)
        assert_still_serves(conn)


def test_headers_with_a_priority_depending_on_their_own_stream_are_reset_protocol_error(ferry: Ferry) -> None:
    with RawConn(ferry.address) as conn:
        sid = conn.stream_id()
        priority = U32.pack(sid) + b"\x0f"  # exclusive bit clear, the stream itself, weight 16
        conn.send(
            frame(HEADERS, END_HEADERS | PRIORITY, sid, priority + conn.header_block(INFER))
            + frame(DATA, END_STREAM, sid, TINY_BODY)
        )
        assert_reset(conn, sid, PROTOCOL_ERROR)
        assert_still_serves(conn)


@pytest.mark.parametrize("encoding", [None, b"gzip"], ids=["identity", "gzip"])
def test_a_message_flag_other_than_0_or_1_is_internal(ferry: Ferry, encoding: bytes | None) -> None:
    data = tiny_request("flag").SerializeToString()
    extra = ()
    if encoding is not None:
        data, extra = gzip.compress(data), ((b"grpc-encoding", encoding),)
    with RawConn(ferry.address) as conn:
        reply = conn.finish(conn.call(INFER, b"\x02" + U32.pack(len(data)) + data, *extra))
        assert reply.status == 13 and "flag" in reply.message, reply.blocks
        assert_still_serves(conn)


def incremental(name: bytes, value: bytes) -> bytes:
    """A literal field with incremental indexing, new name (RFC 7541 §6.2.1); strings under 127 bytes."""
    return b"\x40" + bytes([len(name)]) + name + bytes([len(value)]) + value


INDEXING_BLOCK = fields_block([METHOD, SCHEME, PATH, AUTHORITY, TE]) + incremental(*CONTENT_TYPE)


def test_a_dynamic_table_insertion_before_the_settings_ack_is_served(ferry: Ferry) -> None:
    """The server's HEADER_TABLE_SIZE 0 binds the client only once it acknowledged it: before, 4,096 bytes."""
    with RawConn(ferry.address, handshake=False) as conn:
        sid = conn.stream_id()
        conn.send(
            PREFACE
            + frame(SETTINGS, 0, 0)
            + frame(HEADERS, END_HEADERS, sid, INDEXING_BLOCK)
            + frame(DATA, END_STREAM, sid, TINY_BODY)
        )  # all before reading the server's SETTINGS, let alone acknowledging them
        ok_reply(conn.finish(sid), "tiny")


def test_a_dynamic_table_insertion_after_the_settings_ack_is_goaway_compression_error(ferry: Ferry) -> None:
    with RawConn(ferry.address) as conn:  # the handshake acknowledged the server's SETTINGS
        assert conn.settings[HEADER_TABLE_SIZE] == 0
        sid = conn.stream_id()
        conn.send(frame(HEADERS, END_HEADERS, sid, INDEXING_BLOCK) + frame(DATA, END_STREAM, sid, TINY_BODY))
        conn.drain(2.0)
        assert_goaway(conn, COMPRESSION_ERROR)


def hpack_kinds(block: bytes) -> list[str]:
    """The kind of each representation in an HPACK block (RFC 7541 §6): ``indexed``, ``incremental`` (a literal
    with incremental indexing), ``literal`` (without or never indexing), ``size-update``."""

    def integer(pos: int, prefix: int) -> tuple[int, int]:  # (value, position after it), RFC 7541 §5.1
        limit = (1 << prefix) - 1
        value, pos, shift = block[pos] & limit, pos + 1, 0
        if value == limit:
            while True:
                byte, pos = block[pos], pos + 1
                value += (byte & 0x7F) << shift
                shift += 7
                if not byte & 0x80:
                    break
        return value, pos

    def literal_end(pos: int, prefix: int) -> int:
        index, pos = integer(pos, prefix)
        for _ in range(1 if index else 2):  # a new name is a string before the value
            length, pos = integer(pos, 7)  # the Huffman bit sits above the 7-bit prefix
            pos += length
        return pos

    kinds, pos = [], 0
    while pos < len(block):
        first = block[pos]
        if first & 0x80:
            kinds.append("indexed")
            pos = integer(pos, 7)[1]
        elif first & 0xC0 == 0x40:
            kinds.append("incremental")
            pos = literal_end(pos, 6)
        elif first & 0xE0 == 0x20:
            kinds.append("size-update")
            pos = integer(pos, 5)[1]
        else:
            kinds.append("literal")
            pos = literal_end(pos, 4)
    return kinds


def reply_blocks(conn: RawConn, sid: int) -> list[bytes]:
    """The header blocks the server sent on stream ``sid``, as sent."""
    return [payload for kind, _, stream, payload in conn.log if kind == HEADERS and stream == sid]


def test_reply_headers_are_indexed_after_the_first_reply(ferry: Ferry) -> None:
    """Over one connection, the 2nd and later unary replies' HEADERS and trailers are a few indexed bytes each;
    every block decodes (one hpack.Decoder, fed every block in order) to the full headers and trailers."""
    with RawConn(ferry.address) as conn:
        sids = [conn.call(INFER, grpc_message(tiny_request(f"r{n}").SerializeToString())) for n in range(4)]
        for n, sid in enumerate(sids):
            ok_reply(conn.finish(sid), f"r{n}")  # :status 200, content-type application/grpc; grpc-status 0
        later = [block for sid in sids[1:] for block in reply_blocks(conn, sid)]
        assert len(later) == 6 and all(len(block) <= 3 for block in later), later


def test_with_a_client_table_of_0_reply_headers_are_never_indexed(ferry: Ferry) -> None:
    with RawConn(ferry.address, SETTING.pack(HEADER_TABLE_SIZE, 0)) as conn:
        sids = [conn.call(INFER, grpc_message(tiny_request(f"r{n}").SerializeToString())) for n in range(4)]
        for n, sid in enumerate(sids):
            ok_reply(conn.finish(sid), f"r{n}")
        blocks = [block for sid in sids for block in reply_blocks(conn, sid)]
        assert len(blocks) == 8
        assert not any("incremental" in hpack_kinds(block) for block in blocks), blocks

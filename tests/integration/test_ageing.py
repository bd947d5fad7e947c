"""Connection ageing (gRFC A9), keepalive enforcement and the idle timeout, on both transports: frame by frame with
a raw HTTP/2 client, and with grpcio channels, which reconnect after an age GOAWAY without failing a call; through
an L4 balancer that spreads connections (as kube-proxy does), ageing spreads one long-lived channel's calls over a
replica that joins later."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from ferry.client._proto import grpc_service_pb2 as pb
from ferry.client._proto import grpc_service_pb2_grpc as pb_grpc
from ferry.server.transport.http2 import DATA, END_STREAM, ENHANCE_YOUR_CALM, NO_ERROR, PING, frame
from tests.integration.test_rpcs import request_for
from tests.rawh2 import INFER, RawConn, Reply, grpc_message, tiny_request
from tests.serving import background_server

TRANSPORTS = ["ferry", "grpcio"]
LAST_STREAM_ID = (1 << 31) - 1


def ok_reply(reply: Reply, request_id: str) -> None:
    """A successful unary call, on either transport (grpc-core's header blocks differ from Ferry's)."""
    assert reply.status == 0, reply
    (message,) = reply.replies()
    assert pb.ModelInferResponse.FromString(message).id == request_id


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_an_aged_connection_gets_two_goaways_and_its_call_finishes(example_repo: Path, transport: str) -> None:
    with (
        background_server(example_repo, transport=transport, max_connection_age_s=1.0) as server,
        RawConn(server.address) as conn,
    ):
        sid = conn.open(INFER)  # a call in flight across the age: its request is not complete yet
        conn.pump(lambda: len(conn.goaways) >= 2, timeout=20)
        first, final = conn.goaways[:2]
        assert first[:2] == (LAST_STREAM_ID, NO_ERROR)  # streams on their way are still served
        assert conn.server_pings  # the round trip that tells the final GOAWAY which stream came last
        assert final[:2] == (sid, NO_ERROR)
        conn.send(frame(DATA, END_STREAM, sid, grpc_message(tiny_request("late").SerializeToString())))
        ok_reply(conn.finish(sid), "late")
        conn.read_to_eof(10)  # closed once its calls are done


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_call_past_the_age_grace_is_ended_and_the_connection_closed(example_repo: Path, transport: str) -> None:
    settings = {"max_connection_age_s": 0.5, "max_connection_age_grace_s": 0.5}
    with background_server(example_repo, transport=transport, **settings) as server, RawConn(server.address) as conn:
        sid = conn.open(INFER)  # never completed
        conn.read_to_eof(20)
        if transport == "ferry":
            assert conn.reply(sid).status == grpc.StatusCode.UNAVAILABLE.value[0]
            assert "maximum age" in conn.reply(sid).message


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_pings_more_often_than_the_keepalive_minimum_get_enhance_your_calm(example_repo: Path, transport: str) -> None:
    with background_server(example_repo, transport=transport, keepalive_min_time_s=60) as server:
        with RawConn(server.address) as conn:
            for n in range(3):  # the first is due; the next two are strikes, allowed
                conn.ping(b"keepal%02d" % n)
            assert conn.goaway is None
            conn.send(frame(PING, 0, 0, b"one-more"))  # the third strike
            conn.pump(lambda: conn.goaway is not None)
            assert conn.goaway is not None
            assert conn.goaway[1:] == (ENHANCE_YOUR_CALM, b"too_many_pings")
        with RawConn(server.address) as conn:  # PINGs beside replies are free (gRPC's BDP probes)
            for n in range(6):
                ok_reply(conn.infer(tiny_request(str(n))), str(n))
                conn.ping()
            assert conn.goaway is None


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_an_idle_connection_goes_away_and_a_busy_one_does_not(example_repo: Path, transport: str) -> None:
    with (
        background_server(example_repo, transport=transport, idle_timeout_s=1.0) as server,
        RawConn(server.address) as conn,
    ):
        sid = conn.open(INFER)  # a call open for longer than the idle timeout: not idle
        conn.drain(2.0)
        assert conn.goaway is None
        conn.send(frame(DATA, END_STREAM, sid, grpc_message(tiny_request("busy").SerializeToString())))
        ok_reply(conn.finish(sid), "busy")
        conn.pump(lambda: conn.goaway is not None, timeout=20)  # then idle
        conn.read_to_eof(10)
        if transport == "ferry":  # grpc-core's idle GOAWAY is one, with INTERNAL_ERROR "connection idle"
            assert [g[:2] for g in conn.goaways] == [(LAST_STREAM_ID, NO_ERROR), (sid, NO_ERROR)]


class RoundRobinProxy:
    """An L4 (TCP) balancer, as kube-proxy is for a Service: each new connection goes to the next upstream."""

    def __init__(self) -> None:
        self.upstreams: list[str] = []
        self.connections = 0
        self._writers: set[asyncio.StreamWriter] = set()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._listen(), self.loop).result(10)

    async def _listen(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host, port = self.upstreams[self.connections % len(self.upstreams)].rsplit(":", 1)
        self.connections += 1
        self._writers.add(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection(host, int(port))
        except OSError:
            writer.close()
            return
        self._writers.add(up_writer)
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        for w in (writer, up_writer):
            with contextlib.suppress(ConnectionError, OSError):
                await w.wait_closed()
            self._writers.discard(w)

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def _close(self) -> None:
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()
        for task in asyncio.all_tasks() - {asyncio.current_task()}:
            task.cancel()
        await asyncio.sleep(0.05)  # the cancelled pipes unwind

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@contextlib.contextmanager
def proxy() -> Iterator[RoundRobinProxy]:
    balancer = RoundRobinProxy()
    try:
        yield balancer
    finally:
        balancer.close()


def tiny_calls(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        stats = pb_grpc.GRPCInferenceServiceStub(channel).ModelStatistics(
            pb.ModelStatisticsRequest(name="tiny"), timeout=30
        )
        return sum(s.inference_count for s in stats.model_stats)


def call_for(stub: pb_grpc.GRPCInferenceServiceStub, seconds: float) -> int:
    """Unary tiny calls one after another for ``seconds``; returns how many; any failure raises."""
    request = request_for("tiny", {"input": np.ones((1, 16), np.float32)})
    calls, until = 0, time.monotonic() + seconds
    while time.monotonic() < until:
        stub.ModelInfer(request, timeout=30)
        calls += 1
    return calls


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_channel_reconnects_after_age_goaways_without_a_failed_call(example_repo: Path, transport: str) -> None:
    with (
        background_server(example_repo, transport=transport, max_connection_age_s=0.5) as server,
        proxy() as balancer,
    ):
        balancer.upstreams.append(server.address)
        with grpc.insecure_channel(f"127.0.0.1:{balancer.port}") as channel:
            calls = call_for(pb_grpc.GRPCInferenceServiceStub(channel), 4.0)  # raises on a failed call
        print(f"{transport}: {calls} calls over {balancer.connections} connections")
        assert balancer.connections >= 3  # aged out and made again, 0.5 s (±10%) at a time


@pytest.mark.parametrize(("transport", "age_s"), [("ferry", 1.0), ("grpcio", 1.0), ("ferry", 0.0)])
def test_with_ageing_a_long_lived_channel_spreads_to_a_replica_that_joins(
    example_repo: Path, transport: str, age_s: float
) -> None:
    """One channel, through an L4 balancer, to replica A; replica B joins the balancer. Within 2 ages the channel's
    calls reach B too; without ageing (age 0) the channel stays on A for ever."""
    settings = {"transport": transport, "max_connection_age_s": age_s}
    with (
        background_server(example_repo, **settings) as a,
        background_server(example_repo, **settings) as b,
        proxy() as balancer,
    ):
        balancer.upstreams.append(a.address)
        warmed = tiny_calls(b.address)  # B's warmup runs count as inferences (ModelStatistics, as Triton counts)
        with grpc.insecure_channel(f"127.0.0.1:{balancer.port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            call_for(stub, 0.5)
            balancer.upstreams.append(b.address)  # B joins
            before = (tiny_calls(a.address), tiny_calls(b.address))
            call_for(stub, 2 * 1.1 * (age_s or 1.0) + 0.5)  # two ages (the longest, with jitter) and a margin
        counts = (tiny_calls(a.address), tiny_calls(b.address))
        print(f"{transport}, age {age_s}: calls on A, B before B joined {before}, after {counts}")
        assert before[1] == warmed
        if age_s:
            assert counts[0] > before[0] and counts[1] > warmed
        else:
            assert counts[1] == warmed


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("min_time_s", [5.0, 0.05])
def test_a_grpc_client_pinging_too_often_is_sent_away_and_reconnects(
    example_repo: Path, transport: str, min_time_s: float
) -> None:
    """A grpcio channel sending keepalive PINGs about every second (grpc-core's own floor), also without calls: the
    server (minimum 5 s) ends its connection after the third strike, the channel makes a new one and its calls
    still succeed. With a 0.05 s minimum the same channel keeps its one connection."""
    keepalive = [
        ("grpc.keepalive_time_ms", 200),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.http2.min_time_between_pings_ms", 200),
        ("grpc.http2.min_ping_interval_without_data_ms", 200),
    ]
    with (
        background_server(example_repo, transport=transport, keepalive_min_time_s=min_time_s) as server,
        proxy() as balancer,
    ):
        balancer.upstreams.append(server.address)
        with grpc.insecure_channel(f"127.0.0.1:{balancer.port}", options=keepalive) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            call_for(stub, 0.1)
            time.sleep(6.0)  # idle, pinging
            call_for(stub, 0.1)
        print(f"{transport}, keepalive minimum {min_time_s} s: {balancer.connections} connection(s)")
        if min_time_s > 1:
            assert balancer.connections >= 2
        else:
            assert balancer.connections == 1

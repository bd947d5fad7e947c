"""Start before serve and graceful drain, on both transports, through a real ``ferry serve`` process.

SIGTERM under load (64 callers: 48 unary, 16 on ModelStreamInfer streams): readiness turns false while the server
still accepts new connections and serves them; every call started before the signal succeeds; the process exits 0
within drain + grace. A second signal exits at once. While the initial load runs, the gRPC port refuses connections
(a balancer passes it by) and a request reaching the server anyway gets UNAVAILABLE, never NOT_FOUND."""

from __future__ import annotations

import asyncio
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ferry.client._proto import grpc_service_pb2 as pb
from ferry.client._proto import grpc_service_pb2_grpc as pb_grpc
from ferry.client.errors import Unavailable
from tests.integration.test_rpcs import request_for
from tests.serving import BackgroundServer, FerryProcess, free_port

DRAIN_S, GRACE_S = 5.0, 10.0
UNARY_CALLERS, STREAM_CALLERS = 48, 16


def http_ready(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=10) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as err:
        return int(err.code)


class Load:
    """Callers that call until told to stop, each call recorded with when it started and how it ended."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.calls: list[tuple[float, str]] = []  # (monotonic start, status code name)
        self.stopping = False
        self.request = request_for("mlp", {"input": np.ones((1, 256), np.float32)})

    async def unary(self, stub: Any) -> None:
        while not self.stopping:
            started = time.monotonic()
            try:
                await stub.ModelInfer(self.request, timeout=60)
                self.calls.append((started, "OK"))
            except grpc.aio.AioRpcError as err:
                self.calls.append((started, err.code().name))
                await asyncio.sleep(0.05)

    async def streaming(self, stub: Any) -> None:
        while not self.stopping:
            call = stub.ModelStreamInfer(timeout=120)
            started = time.monotonic()
            try:
                while not self.stopping:
                    started = time.monotonic()
                    await call.write(self.request)
                    reply = await call.read()
                    if reply is grpc.aio.EOF:
                        self.calls.append((started, "EOF"))
                        break
                    self.calls.append((started, "OK" if not reply.error_message else reply.error_message))
                await call.done_writing()
            except grpc.aio.AioRpcError as err:
                self.calls.append((started, err.code().name))
                await asyncio.sleep(0.05)

    def failed_before(self, moment: float) -> list[tuple[float, str]]:
        return [(t, code) for t, code in self.calls if t < moment and code != "OK"]


@pytest.mark.parametrize("transport", ["ferry", "grpcio"])
def test_sigterm_under_load_drains_without_failing_a_call(example_repo: Path, transport: str) -> None:
    http = free_port()
    server = FerryProcess(
        example_repo,
        "--transport",
        transport,
        "--drain-delay-s",
        str(DRAIN_S),
        "--shutdown-grace-s",
        str(GRACE_S),
        http_port=http,
    )
    server.start()
    assert server.proc is not None
    try:
        load = Load(server.address)

        async def main() -> tuple[float, int]:
            channels = [grpc.aio.insecure_channel(server.address) for _ in range(4)]  # four connections
            stubs = [pb_grpc.GRPCInferenceServiceStub(c) for c in channels]
            callers = [asyncio.create_task(load.unary(stubs[i % 4])) for i in range(UNARY_CALLERS)]
            callers += [asyncio.create_task(load.streaming(stubs[i % 4])) for i in range(STREAM_CALLERS)]
            while sum(code == "OK" for _, code in load.calls) < 200:  # under way on every caller
                await asyncio.sleep(0.05)
            signalled = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
            while await asyncio.to_thread(http_ready, http) == 200:
                await asyncio.sleep(0.01)
            print(f"{transport}: HTTP ready 503 {time.monotonic() - signalled:.3f} s after SIGTERM (drain {DRAIN_S} s)")
            # not ready, yet a new connection is accepted and served: health says NOT_SERVING, inference answers
            async with grpc.aio.insecure_channel(server.address) as fresh:
                health = await health_pb2_grpc.HealthStub(fresh).Check(health_pb2.HealthCheckRequest(), timeout=10)
                assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
                inference = pb_grpc.GRPCInferenceServiceStub(fresh)
                assert not (await inference.ServerReady(pb.ServerReadyRequest(), timeout=10)).ready
                await inference.ModelInfer(load.request, timeout=10)
            served_after_not_ready = time.monotonic()
            code = await asyncio.to_thread(server.proc.wait, DRAIN_S + GRACE_S + 60)  # type: ignore[union-attr]
            load.stopping = True
            await asyncio.gather(*callers)
            for channel in channels:
                await channel.close()
            assert served_after_not_ready - signalled < DRAIN_S + GRACE_S
            return signalled, code

        signalled, code = asyncio.run(main())
        assert code == 0
        before = [t for t, _ in load.calls if t < signalled]
        print(f"{transport}: {len(before)} calls started before SIGTERM, {len(load.calls) - len(before)} after")
        assert len(before) >= 200
        assert load.failed_before(signalled) == []
    finally:
        server.stop()


def test_a_second_signal_exits_at_once(example_repo: Path) -> None:
    server = FerryProcess(example_repo, "--drain-delay-s", "600")
    server.start()
    assert server.proc is not None
    try:
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert server.proc.poll() is None  # draining: 600 s of it
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(30) == 128 + signal.SIGTERM
    finally:
        server.stop()


@pytest.mark.parametrize("transport", ["ferry", "grpcio"])
def test_while_models_load_grpc_refuses_connections_and_requests_get_unavailable(
    example_repo: Path, transport: str
) -> None:
    server = BackgroundServer(example_repo, transport=transport)
    loading, release = threading.Event(), threading.Event()
    load_startup = server.server.repository.load_startup

    async def slow_load() -> None:
        loading.set()
        await asyncio.to_thread(release.wait, 60)
        await load_startup()

    server.server.repository.load_startup = slow_load  # type: ignore[method-assign]
    starting = asyncio.run_coroutine_threadsafe(server.server.start(), server.loop)
    try:
        assert loading.wait(60)
        with socket.socket() as sock, pytest.raises(ConnectionRefusedError):
            sock.connect(("127.0.0.1", server.server.grpc_port))  # bound, not listening: refused, not hanging
        assert server.server.http_port is not None
        assert http_ready(server.server.http_port) == 503
        with urllib.request.urlopen(f"http://127.0.0.1:{server.server.http_port}/v2/health/live", timeout=10) as r:
            assert r.status == 200
        with pytest.raises(Unavailable, match="'mlp' is loading"):
            server.server.repository.resolve("mlp")
        release.set()
        starting.result(60)
        assert http_ready(server.server.http_port) == 200
        with grpc.insecure_channel(server.address) as channel:
            reply = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                request_for("mlp", {"input": np.ones((1, 256), np.float32)}), timeout=30
            )
            assert reply.model_name == "mlp"
    finally:
        release.set()
        server.stop()


def test_grpcio_stop_runs_the_calls_grpc_core_accepted_but_had_not_handed_over(example_repo: Path) -> None:
    """grpc.aio's own ``stop(grace)`` cancelled these (CANCELLED, not retried): 17-257 of 300 here."""
    from ferry.server.transport.grpcaio import core_calls_started

    server = BackgroundServer(example_repo, transport="grpcio")
    server.start()
    try:

        async def main() -> list[str]:
            async with grpc.aio.insecure_channel(server.address) as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                request = request_for("mlp", {"input": np.ones((64, 256), np.float32)})
                calls = [asyncio.ensure_future(stub.ModelInfer(request, timeout=60)) for _ in range(300)]
                while (core_calls_started(server.server.grpc_port) or 0) < 300:  # all in core's hands
                    await asyncio.sleep(0.005)
                stopping = asyncio.wrap_future(asyncio.run_coroutine_threadsafe(server.server.stop(30), server.loop))
                results = await asyncio.gather(*calls, return_exceptions=True)
                await stopping
                return [r.code().name if isinstance(r, grpc.aio.AioRpcError) else "OK" for r in results]

        assert asyncio.run(main()) == ["OK"] * 300
    finally:
        server.stop()

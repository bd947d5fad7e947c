"""Real Ferry servers for tests: started in-process on a background event loop, bound to 127.0.0.1:0."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.app import FerryServer
from server.config import ServerConfig
from server.telemetry import NO_TRACING, Tracing


class BackgroundServer:
    """A FerryServer running on its own event loop thread; ``call`` runs a coroutine there."""

    def __init__(self, repository: Path, tracing: Tracing | None = None, **overrides: Any) -> None:
        settings: dict[str, Any] = {"grpc_port": 0, "http_port": 0, "shutdown_grace_s": 1.0, **overrides}
        self.config = ServerConfig.build(model_repository=repository, **settings)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="ferry-test-server", daemon=True)
        self._thread.start()
        self.server = FerryServer(self.config, tracing or NO_TRACING)

    def call(self, coro: Any, timeout: float = 120) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.grpc_port}"

    def start(self) -> None:
        self.call(self.server.start())
        if self.server.is_ready():  # a strict-readiness server with a broken model is up but not ready
            wait_serving(self.address)

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.call(self.server.stop(0.5))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


def wait_serving(address: str, timeout_s: float = 30) -> None:
    """Block until the gRPC health service says SERVING (never by reading logs)."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s, wait_for_ready=True)
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            raise RuntimeError(f"server at {address} is not serving: {reply}")


@contextlib.contextmanager
def running_server(model_repository: Path, **overrides: Any) -> Iterator[str]:
    """Yield the address of a real Ferry server serving ``model_repository``."""
    with background_server(model_repository, **overrides) as server:
        yield server.address


@contextlib.contextmanager
def background_server(
    model_repository: Path, tracing: Tracing | None = None, **overrides: Any
) -> Iterator[BackgroundServer]:
    server = BackgroundServer(model_repository, tracing, **overrides)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def ferry_serve(*args: str, env: dict[str, str] | None = None) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """Run ``ferry serve ARGS`` as a subprocess and yield it with its ready line; always reaped."""
    command = [sys.executable, "-m", "server", "serve", *args]
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) as proc:
        try:
            assert proc.stdout is not None
            yield proc, proc.stdout.readline()  # the one line printed when ready
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def grpc_address(ready_line: str) -> str:
    """The gRPC address in ``ferry serve``'s ready line."""
    return "127.0.0.1:" + ready_line.split("grpc=127.0.0.1:")[1].split()[0]

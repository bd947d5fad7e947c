"""Real Ferry servers for tests: started in-process on a background event loop, bound to 127.0.0.1:0, or as
``ferry serve`` processes (:class:`FerryProcess`)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ferry.server.app import FerryServer
from ferry.server.config import ServerConfig
from ferry.server.observability.telemetry import NO_TRACING, Tracing


class BackgroundServer:
    """A FerryServer running on its own event loop thread; ``call`` runs a coroutine there."""

    def __init__(
        self,
        repository: Path,
        tracing: Tracing | None = None,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        **overrides: Any,
    ) -> None:
        """``credentials``: what a client needs to reach it, for a server with TLS (readiness is asked over it)."""
        self.credentials = credentials
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
            wait_serving(self.address, credentials=self.credentials)

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.call(self.server.stop(0.5))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


def wait_serving(address: str, timeout_s: float = 30, credentials: grpc.ChannelCredentials | None = None) -> None:
    """Block until the gRPC health service says SERVING (never by reading logs). A ``ferry serve`` process refuses
    connections until its models have loaded (waited for), and a draining one says NOT_SERVING (asked again until
    ``timeout_s``). ``credentials``: for a server with TLS."""
    deadline = time.monotonic() + timeout_s
    channel_of = grpc.insecure_channel(address) if credentials is None else grpc.secure_channel(address, credentials)
    with channel_of as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            left = max(deadline - time.monotonic(), 0.1)
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=left, wait_for_ready=True)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
            if time.monotonic() >= deadline:
                raise RuntimeError(f"server at {address} is not serving: {reply}")
            time.sleep(0.1)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class FerryProcess:
    """``ferry serve ARGS`` in a subprocess, gRPC on a free port of 127.0.0.1 and HTTP off, for what only a process
    shows (RSS, CPU, signals); :meth:`start` returns once it is SERVING, :meth:`stop` sends SIGTERM (then kills)."""

    def __init__(
        self,
        repository: Path,
        *args: str,
        log: Path | None = None,
        port: int = 0,
        http_port: int = -1,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        """``port`` 0: a free port at each start; ``http_port`` -1: HTTP off. The drain delay is 0 unless ``args``
        set it (test_drain tests it), so that stopping takes no longer than the calls in flight need.
        ``credentials``: for a server with TLS."""
        self.repository = repository
        self.credentials = credentials
        self.args = args if "--drain-delay-s" in args else ("--drain-delay-s", "0", *args)
        self.log = log
        self.port = port
        self.http_port = http_port
        self.proc: subprocess.Popen[bytes] | None = None
        self.address = ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, wait: bool = True) -> None:
        """Start the process; with ``wait``, return once it is SERVING."""
        port = self.port or free_port()
        self.address = f"127.0.0.1:{port}"
        command = [sys.executable, "-m", "ferry.server", "serve", "--model-repository", str(self.repository)]
        command += ["--host", "127.0.0.1", "--grpc-port", str(port), "--http-port", str(self.http_port), *self.args]
        with contextlib.ExitStack() as files:
            err = files.enter_context(self.log.open("ab")) if self.log is not None else subprocess.DEVNULL
            self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err)
        if not wait:
            return
        try:
            wait_serving(self.address, timeout_s=60, credentials=self.credentials)
        except BaseException:
            self.stop()
            raise

    def sigterm_exits_within(self, seconds: float) -> bool:
        """SIGTERM; whether the process then ended within ``seconds``."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(seconds)
            return True
        except subprocess.TimeoutExpired:
            return False

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None and not self.sigterm_exits_within(15):
            self.proc.kill()
            self.proc.wait()
        self.proc = None


def rss_kib(pid: int) -> int:
    """A process's resident set size (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"process {pid} has no VmRSS")


@contextlib.contextmanager
def running_server(model_repository: Path, **overrides: Any) -> Iterator[str]:
    """Yield the address of a real Ferry server serving ``model_repository``."""
    with background_server(model_repository, **overrides) as server:
        yield server.address


@contextlib.contextmanager
def background_server(
    model_repository: Path,
    tracing: Tracing | None = None,
    *,
    credentials: grpc.ChannelCredentials | None = None,
    **overrides: Any,
) -> Iterator[BackgroundServer]:
    server = BackgroundServer(model_repository, tracing, credentials=credentials, **overrides)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def ferry_serve(*args: str, env: dict[str, str] | None = None) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """Run ``ferry serve ARGS`` as a subprocess and yield it with its ready line; always reaped."""
    command = [sys.executable, "-m", "ferry.server", "serve", *args]
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

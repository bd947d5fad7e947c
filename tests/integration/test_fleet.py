"""Ferry replicas behind a real L7 gRPC balancer: Debian's nginx, ``grpc_pass`` round robin over ``ferry serve``
processes (one on each transport), under steady load from clients that retry UNAVAILABLE as Ferry's SDK does.

A rolling restart of every replica (SIGTERM, wait for it to exit, start it again on the same port: nginx keeps
sending to that address, also while the new process loads) fails no request. A replica killed with SIGKILL fails
only the calls in flight there, and the clients' retries recover them: no request fails in the end. The counts
are printed. nginx comes from ``make nginx-deps``; without it the test skips (and fails under CI=true)."""

from __future__ import annotations

import asyncio
import collections
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from ferry.client import AsyncClient
from ferry.client.errors import FerryError
from tests.serving import FerryProcess, free_port, wait_serving

REPLICA_ARGS = ("--drain-delay-s", "1", "--shutdown-grace-s", "10")
CALLERS = 16


def nginx_binary() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if found is None:
        why = "nginx is not installed (make nginx-deps installs Debian's, as root)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"the fleet test must run in CI: {why}")
        pytest.skip(why)
    return found


NGINX_CONF = """
daemon off;
worker_processes 1;
pid {tmp}/nginx.pid;
{user}
error_log {tmp}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    log_format fleet '$status $upstream_addr';
    access_log {tmp}/access.log fleet;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    upstream ferry {{
        # max_fails=0: a replica is never marked down, every request tries its turn; a refused connection costs a
        # millisecond here and goes on to the next replica, so requests do reach replicas while they start
{servers}
    }}
    server {{
        listen 127.0.0.1:{port} http2;
        location / {{
            grpc_pass grpc://ferry;
            # a connection refused (a replica stopped, or still loading: its port is closed), or a failure before
            # the request was sent: the next replica
            grpc_next_upstream error timeout;
            grpc_connect_timeout 2s;
            grpc_read_timeout 60s;
        }}
    }}
}}
"""


@pytest.fixture
def nginx_for() -> Iterator[object]:
    """``nginx_for(tmp, [ports])``: an nginx on a free port balancing over the replicas' ports; returns its port."""
    binary = nginx_binary()
    procs: list[subprocess.Popen[bytes]] = []

    def start(tmp: Path, ports: list[int]) -> int:
        port = free_port()
        servers = "\n".join(f"        server 127.0.0.1:{p} max_fails=0;" for p in ports)
        user = "user root;" if os.geteuid() == 0 else ""  # as root nginx's workers would be nobody: stay ourselves
        conf = tmp / "nginx.conf"
        conf.write_text(NGINX_CONF.format(tmp=tmp, port=port, servers=servers, user=user))
        command = [binary, "-e", str(tmp / "error.log"), "-p", str(tmp), "-c", str(conf)]
        check = subprocess.run([*command, "-t"], capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, check.stderr
        procs.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_serving(f"127.0.0.1:{port}", timeout_s=60)
        return port

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(30)


def nginx_counts(tmp: Path) -> tuple[int, int, int]:
    """From nginx's access log: requests, those passed on to another replica (refused, or failed before the request
    went out), and those answered 502 (failed at a replica after it went out: the clients retry them)."""
    lines = (tmp / "access.log").read_text().splitlines()
    passed_on = sum(", " in line for line in lines)
    return len(lines), passed_on, sum(line.startswith("502 ") for line in lines)


class Load:
    """``CALLERS`` SDK clients (retrying UNAVAILABLE) calling ``tiny`` through nginx, on a thread of its own."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.ok = 0
        self.failed: collections.Counter[str] = collections.Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(120)

    async def _main(self) -> None:
        x = np.ones((1, 16), np.float32)
        async with AsyncClient(self.target, timeout_s=60) as client:

            async def caller() -> None:
                while not self._stop.is_set():
                    try:
                        await client.infer("tiny", {"input": x})
                        self.ok += 1
                    except FerryError as err:
                        self.failed[f"{err.code.name}: {err.message[:120]}"] += 1

            await asyncio.gather(*(caller() for _ in range(CALLERS)))

    def wait_for(self, calls: int, timeout_s: float = 120) -> None:
        """Until ``calls`` more calls succeeded."""
        until, deadline = self.ok + calls, time.monotonic() + timeout_s
        while self.ok < until:
            assert time.monotonic() < deadline, f"no progress: {self.ok} ok, failed {dict(self.failed)}"
            time.sleep(0.05)


def test_rolling_restart_and_a_killed_replica_behind_nginx(
    example_repo: Path, tmp_path: Path, nginx_for: object
) -> None:
    replicas = [
        FerryProcess(example_repo, *REPLICA_ARGS, "--transport", kind, port=free_port(), log=tmp_path / "ferry.log")
        for kind in ("ferry", "grpcio")
    ]
    try:
        for replica in replicas:
            replica.start()
        port = nginx_for(tmp_path, [r.port for r in replicas])  # type: ignore[operator]
        with Load(f"127.0.0.1:{port}") as load:
            load.wait_for(200)
            for replica in replicas:  # rolling restart
                assert replica.proc is not None
                replica.proc.send_signal(signal.SIGTERM)
                assert replica.proc.wait(120) == 0
                replica.start(wait=False)  # nginx sends to it while it loads: refused, passed by
                wait_serving(replica.address, timeout_s=120)
                load.wait_for(200)
            requests, passed_on, bad_gateway = nginx_counts(tmp_path)
            print(
                f"rolling restart of {len(replicas)} replicas: {load.ok} calls ok, {sum(load.failed.values())} failed;"
                f" nginx: {requests} requests, {passed_on} passed on from a replica stopped or starting,"
                f" {bad_gateway} answered 502"
            )
            assert not load.failed, load.failed
            assert passed_on > 0  # requests did reach the replicas while they restarted

            killed = replicas[0]
            assert killed.proc is not None
            killed.proc.send_signal(signal.SIGKILL)
            killed.proc.wait(60)
            load.wait_for(200)
            killed.start(wait=False)
            wait_serving(killed.address, timeout_s=120)
            load.wait_for(200)
        total, passed_on_after, bad_gateway_after = nginx_counts(tmp_path)
        print(
            f"SIGKILL of one replica, and its restart: {load.ok} calls ok, {sum(load.failed.values())} failed;"
            f" nginx: {total - requests} requests, {passed_on_after - passed_on} passed on,"
            f" {bad_gateway_after - bad_gateway} answered 502 (calls in flight on the killed replica, retried)"
        )
        assert not load.failed, load.failed
    finally:
        for replica in replicas:
            replica.stop()

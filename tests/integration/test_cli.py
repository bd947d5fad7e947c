"""The ``ferry`` command: ready line with bound ports, serving over the wire, clean exit on SIGTERM."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np

from ferry.client._proto import grpc_service_pb2 as pb
from ferry.client._proto import grpc_service_pb2_grpc as pb_grpc
from tests.integration.test_rpcs import outputs_of, request_for
from tests.serving import ferry_serve

FERRY = [sys.executable, "-m", "ferry.server"]


def test_serve_prints_ready_line_with_free_ports_and_stops_on_sigterm(example_repo: Path) -> None:
    with ferry_serve("--model-repository", str(example_repo), "--grpc-port", "0", "--http-port", "0") as (proc, line):
        match = re.fullmatch(r"ferry ready: grpc=127\.0\.0\.1:(\d+) http=127\.0\.0\.1:(\d+) models=4/4 ready\n", line)
        assert match, line
        grpc_port = int(match.group(1))
        assert grpc_port > 0 and int(match.group(2)) > 0
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            x = np.ones((1, 16), np.float32)
            response = stub.ModelInfer(request_for("tiny", {"input": x}), timeout=30)
        assert outputs_of(response)["output"].shape == (1, 4)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


def test_serve_rejects_a_missing_repository(tmp_path: Path) -> None:
    proc = subprocess.run(
        [*FERRY, "serve", "--model-repository", str(tmp_path / "nope"), "--grpc-port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "is not a directory" in proc.stderr


def test_serve_reports_a_port_in_use(example_repo: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [*FERRY, "serve", "--model-repository", str(example_repo), "--grpc-port", "0", "--http-port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert proc.returncode == 2
    assert f"cannot bind HTTP to 127.0.0.1:{port}" in proc.stderr


def test_ready_line_is_unchanged_by_model_failures(test_repo: Path) -> None:
    with ferry_serve("--model-repository", str(test_repo), "--grpc-port", "0", "--http-port", "-1") as (_, line):
        assert re.fullmatch(r"ferry ready: grpc=127\.0\.0\.1:\d+ http=off models=4/6 ready\n", line), line
        port = int(line.split("grpc=127.0.0.1:")[1].split()[0])
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            assert stub.ServerReady(pb.ServerReadyRequest(), timeout=30).ready

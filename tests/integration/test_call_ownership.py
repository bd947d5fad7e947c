"""Whatever a call holds is given back however it ends (DESIGN.md, trust rule 1), on both transports.

The defect this guards against: a unary handler that has to wait (``mlp`` runs on a worker thread) becomes a task;
when the client's RST_STREAM arrived in the same read as the request, or the connection was lost before the task's
first step, the task was cancelled before it ever ran, its ``finally`` blocks never ran, and the batcher's slot for
the model version was never given back: every later ``mlp`` call hung to its deadline and SIGTERM hung too.

Each test ends many ``mlp`` calls in one of those ways against a real ``ferry serve`` process, then checks that
``mlp`` still answers and that SIGTERM ends the process promptly."""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from ferry.client._proto import grpc_service_pb2 as pb
from ferry.client._proto import grpc_service_pb2_grpc as pb_grpc
from ferry.server.transport.http2 import (
    CANCEL,
    DATA,
    END_HEADERS,
    END_STREAM,
    HEADERS,
    PREFACE,
    RST_STREAM,
    SETTINGS,
    U32,
    frame,
    literal,
)
from tests.integration.test_rpcs import request_for
from tests.serving import FerryProcess

INFER = b"/inference.GRPCInferenceService/ModelInfer"
CALLS = 60  # per round: past the model's one instance many times over


@pytest.fixture(params=["ferry", "grpcio"])
def served(request: pytest.FixtureRequest, example_repo: Path) -> Iterator[FerryProcess]:
    process = FerryProcess(
        example_repo, "--transport", request.param, "--shutdown-grace-s", "2", "--log-level", "WARNING"
    )
    process.start()
    try:
        yield process
    finally:
        process.stop()


def mlp_body(seed: int) -> bytes:
    x = np.random.default_rng(seed).standard_normal((1, 256)).astype(np.float32)
    data = request_for("mlp", {"input": x}, id=f"r{seed}").SerializeToString()
    return b"\x00" + U32.pack(len(data)) + data


def request_frames(address: str, sid: int, body: bytes, *extra: tuple[bytes, bytes]) -> bytes:
    block = b"\x83\x86" + literal(4, INFER) + literal(1, address.encode())
    block += literal(b"content-type", b"application/grpc") + literal(b"te", b"trailers")
    for name, value in extra:
        block += literal(name, value)
    return frame(HEADERS, END_HEADERS, sid, block) + frame(DATA, END_STREAM, sid, body)


def raw_connection(address: str) -> socket.socket:
    host, port = address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=5)
    sock.sendall(PREFACE + frame(SETTINGS, 0, 0))
    return sock


def read_for(sock: socket.socket, seconds: float) -> None:
    """Read (and ignore) what the server sends for a while, so its writes never back up."""
    sock.settimeout(0.05)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            if not sock.recv(1 << 16):
                return
        except TimeoutError:
            continue
        except OSError:
            return


def mlp_answers(address: str) -> None:
    """A few ordinary mlp calls on a new channel all succeed well within their deadline."""
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for seed in range(4):
            x = np.random.default_rng(seed).standard_normal((1, 256)).astype(np.float32)
            reply = stub.ModelInfer(request_for("mlp", {"input": x}), timeout=10)
            assert isinstance(reply, pb.ModelInferResponse)
            assert reply.outputs[0].shape == [1, 10]


def send_rounds(served: FerryProcess, call: Callable[[int, int], bytes]) -> None:
    """Four writes of CALLS calls each on one connection, ``call(stream id, i)`` the frames of one; what the server
    answers is read between them."""
    with raw_connection(served.address) as sock:
        for round_ in range(4):
            sock.sendall(b"".join(call(1 + 2 * (round_ * CALLS + i), i) for i in range(CALLS)))
            read_for(sock, 0.2)


def cancel_in_the_same_read(served: FerryProcess) -> None:
    """Each request and its RST_STREAM in one write: the reset is read in the turn that started the handler."""

    def call(sid: int, i: int) -> bytes:
        return request_frames(served.address, sid, mlp_body(i)) + frame(RST_STREAM, 0, sid, U32.pack(CANCEL))

    send_rounds(served, call)


def expire_at_once(served: FerryProcess) -> None:
    """Deadlines of a microsecond: most expire before, some while, the handler first runs."""

    def call(sid: int, i: int) -> bytes:
        return request_frames(served.address, sid, mlp_body(i), (b"grpc-timeout", f"{1 + i % 5 * 200}u".encode()))

    send_rounds(served, call)


def lose_the_connection(served: FerryProcess) -> None:
    """Requests, then the connection reset under them (SO_LINGER 0): read in the same turn as the loss."""
    for _ in range(8):
        sock = raw_connection(served.address)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.sendall(b"".join(request_frames(served.address, 1 + 2 * i, mlp_body(i)) for i in range(CALLS)))
        sock.close()
    time.sleep(0.2)


@pytest.mark.parametrize("end_calls", [cancel_in_the_same_read, expire_at_once, lose_the_connection])
def test_calls_ended_before_their_handler_ran_give_back_what_they_held(served: FerryProcess, end_calls) -> None:  # type: ignore[no-untyped-def]
    mlp_answers(served.address)
    end_calls(served)
    mlp_answers(served.address)  # the model version is not wedged
    assert served.sigterm_exits_within(15), "SIGTERM did not end the server: something still holds the model"
    assert served.proc is not None and served.proc.returncode == 0

"""The grpc.aio shutdown helper looks at every descriptor of the process: it must leave none behind."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from ferry.server.transport.grpcaio import stop_listening


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_stop_listening_shuts_the_port_and_leaves_no_descriptor_behind(tmp_path: Path) -> None:
    files = [(tmp_path / f"f{i}").open("w") for i in range(5)]  # descriptors that are not sockets
    with socket.socket() as listener, socket.socket() as other:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        other.bind(("127.0.0.1", 0))
        other.listen()
        before = len(os.listdir("/proc/self/fd"))
        assert stop_listening(listener.getsockname()[1]) == 1
        assert len(os.listdir("/proc/self/fd")) == before
        assert not listener.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) or _refuses(listener)
        assert other.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    for file in files:
        file.close()


def _refuses(listener: socket.socket) -> bool:
    with socket.socket() as client:
        return client.connect_ex(listener.getsockname()) != 0

"""The link between the supervisor and one worker: requests and replies both ways over a Unix socket pair.

A frame is two big-endian u32 lengths, a JSON header of that many bytes and a body of raw bytes (a serialized
protobuf message, or the Prometheus text). A header holds ``id`` and either ``op`` (a request) or ``code`` and
``message`` (the reply to request ``id``: a gRPC status value, 0 for OK). Either end may send requests while its own
are outstanding; each request is served in its own task, so a slow one (a model load) holds up no other.

The two ends are the same program's processes, so the link trusts what it reads; a frame past ``max_frame_bytes``
still ends the link rather than being buffered. A sender never writes one: a request or reply that would be over
the bound fails that one call with RESOURCE_EXHAUSTED instead (the link, and the worker on it, stay). The bound
(:func:`frame_bound`) leaves room for a request body of ``--max-message-bytes`` twice over plus
:data:`GATHERED_BYTES` for what no message size bounds: every worker's ``/metrics`` text or statistics gathered
into one reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from ferry.client.errors import FerryError, ResourceExhausted, Unavailable, error_for_status

log = logging.getLogger(__name__)

_LENGTHS = struct.Struct("!II")

GATHERED_BYTES = 64 << 20
"""Room in a frame for gathered replies (the other workers' /metrics texts: some 10 KB per model version each)."""


def frame_bound(max_message_bytes: int) -> int:
    """The largest frame the link carries with ``--max-message-bytes`` (the module docstring)."""
    return 2 * max_message_bytes + GATHERED_BYTES


Header = dict[str, Any]
Serve = Callable[[Header, bytes], Awaitable[tuple[Header, bytes]]]
"""Answers one request: its header and body → the reply's extra header fields and body. A FerryError raised is
the reply's status."""


class LinkClosed(Unavailable):
    """The other end went away (its process exited) before it answered."""


class Channel:
    """One end of a link. :meth:`run` reads until the other end closes; :meth:`call` sends a request and waits for
    its reply."""

    def __init__(self, sock: socket.socket, serve: Serve, name: str, max_frame_bytes: int) -> None:
        self._sock = sock
        self._serve = serve
        self._name = name
        self._max_frame = max_frame_bytes
        self._writer: asyncio.StreamWriter | None = None
        self._pending: dict[int, asyncio.Future[tuple[Header, bytes]]] = {}
        self._serving: set[asyncio.Task[None]] = set()
        self._next_id = 0
        self.closed = asyncio.Event()

    async def run(self) -> None:
        """Serve requests and deliver replies until the other end closes (or a frame is malformed)."""
        reader, self._writer = await asyncio.open_unix_connection(sock=self._sock, limit=2**20)
        try:
            while True:
                header, body = await self._read(reader)
                if "op" in header:
                    task = asyncio.get_running_loop().create_task(self._answer(header, body))
                    self._serving.add(task)
                    task.add_done_callback(self._serving.discard)
                else:
                    future = self._pending.pop(header.get("id", -1), None)
                    if future is not None and not future.done():
                        future.set_result((header, body))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the other end closed
        except ValueError as err:
            log.error("link to %s: %s; closing it", self._name, err)
        finally:
            self.close()

    async def _read(self, reader: asyncio.StreamReader) -> tuple[Header, bytes]:
        head, size = _LENGTHS.unpack(await reader.readexactly(_LENGTHS.size))
        if head + size > self._max_frame:
            raise ValueError(f"a frame of {head + size} bytes is over the link's {self._max_frame}")
        header = json.loads(await reader.readexactly(head))
        body = await reader.readexactly(size) if size else b""
        if not isinstance(header, dict):
            raise ValueError("a frame's header is not an object")
        return header, body

    def _send(self, header: Header, body: bytes) -> None:
        if self._writer is None or self._writer.is_closing():
            raise LinkClosed(f"the link to {self._name} is closed")
        head = json.dumps(header, separators=(",", ":")).encode()
        if len(head) + len(body) > self._max_frame:  # the other end would end the link on reading it
            raise ResourceExhausted(
                f"{header.get('op', 'a reply')}: {len(head) + len(body)} bytes are over the link's {self._max_frame}"
            )
        self._writer.write(_LENGTHS.pack(len(head), len(body)) + head)
        if body:
            self._writer.write(body)

    async def _answer(self, header: Header, body: bytes) -> None:
        reply: Header
        try:
            extra, out = await self._serve(header, body)
            reply = {**extra, "code": 0, "message": ""}
        except FerryError as err:
            reply, out = {"code": err.code.value[0], "message": err.message}, b""
        except Exception as err:
            log.exception("link to %s: %s failed", self._name, header.get("op"))
            reply, out = {"code": grpc.StatusCode.INTERNAL.value[0], "message": f"{type(err).__name__}: {err}"}, b""
        reply["id"] = header.get("id")
        with contextlib.suppress(LinkClosed):
            try:
                self._send(reply, out)
            except ResourceExhausted as err:  # the caller gets why, not the reply
                self._send({"id": reply["id"], "code": err.code.value[0], "message": err.message}, b"")

    async def call(self, op: str, fields: Header | None = None, body: bytes = b"") -> tuple[Header, bytes]:
        """Send request ``op`` and return its reply's header and body; a reply other than OK raises its status
        (:class:`LinkClosed` when the other end goes away first)."""
        self._next_id += 1
        ident = self._next_id
        future: asyncio.Future[tuple[Header, bytes]] = asyncio.get_running_loop().create_future()
        self._pending[ident] = future
        try:
            self._send({**(fields or {}), "op": op, "id": ident}, body)
            header, out = await future
        finally:
            self._pending.pop(ident, None)
        code = header.get("code", 0)
        if code:
            raise error_for_status(status_code(code), str(header.get("message", "")))
        return header, out

    def close(self) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(LinkClosed(f"the link to {self._name} closed"))
        self._pending.clear()
        if self._writer is not None:
            self._writer.close()
        else:
            self._sock.close()
        self.closed.set()


def status_code(value: int) -> grpc.StatusCode:
    """The status code a link header's ``code`` (:func:`status_value`) names; UNKNOWN for another number."""
    for code in grpc.StatusCode:
        if code.value[0] == value:
            return code
    return grpc.StatusCode.UNKNOWN


def status_value(code: grpc.StatusCode) -> int:
    return int(code.value[0])


__all__ = ["GATHERED_BYTES", "Channel", "Header", "LinkClosed", "Serve", "frame_bound", "status_code", "status_value"]

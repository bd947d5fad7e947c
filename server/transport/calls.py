"""Calls as servicers see them: the methods registered (:class:`Services`), a call's :class:`Context` (grpc.aio's
``ServicerContext`` methods a server-side handler uses), its request stream (:class:`Requests`), and
:class:`Handler`, which carries a handler coroutine, stepped once in place, on in a task."""

from __future__ import annotations

import asyncio
from collections import abc, deque
from collections.abc import Callable, Generator, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import grpc

from ferry.server.transport.headers import metadata
from ferry.server.transport.http2 import U32

if TYPE_CHECKING:
    from ferry.server.transport.connection import Connection, Stream


class Aborted(Exception):
    """``context.abort``: ends the handler; the call ends with this status."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class Method:
    __slots__ = ("behavior", "deserialize", "kind", "serialize")

    def __init__(self, handler: grpc.RpcMethodHandler) -> None:
        self.kind = int(handler.response_streaming) | int(handler.request_streaming) << 1
        self.behavior = (handler.unary_unary, handler.unary_stream, handler.stream_unary, handler.stream_stream)[
            self.kind
        ]
        self.deserialize: Callable[[Any], Any] = handler.request_deserializer or bytes  # bytes or a memoryview
        self.serialize: Callable[[Any], bytes] = handler.response_serializer or bytes


class _Details:
    """The ``grpc.HandlerCallDetails`` a generic handler looks a method up by."""

    __slots__ = ("invocation_metadata", "method")

    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata: tuple[()] = ()


class Services:
    """The servicers a transport serves, registered the way generated code registers them on a grpc server."""

    def __init__(self) -> None:
        self._methods: dict[bytes, Method] = {}
        self._generic: list[grpc.GenericRpcHandler] = []

    def add_generic_rpc_handlers(self, handlers: Iterable[grpc.GenericRpcHandler]) -> None:
        self._generic.extend(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        for name, handler in handlers.items():
            self._methods[f"/{service}/{name}".encode()] = Method(handler)

    def lookup(self, path: bytes) -> Method | None:
        method = self._methods.get(path)
        if method is None and self._generic:
            details = _Details(path.decode(errors="replace"))
            for generic in self._generic:
                handler = generic.service(details)
                if handler is not None:
                    method = self._methods[path] = Method(handler)  # found ones only: the table stays bounded
                    break
        return method


class Requests:
    """A request stream as the handler reads it (an async iterator of parsed messages); the stream's receive window
    is given back as messages are taken, so a client cannot queue more than a window ahead of the handler."""

    __slots__ = ("_conn", "_items", "_stream", "_waiter", "ended", "queued")

    def __init__(self, conn: Connection, stream: Stream) -> None:
        self._conn = conn
        self._stream = stream
        self._items: deque[tuple[Any, int]] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self.ended = False
        self.queued = 0  # bytes of messages received and not yet read

    def put(self, message: Any, size: int) -> None:
        self._items.append((message, size))
        self.queued += size
        self._wake()

    def end(self) -> None:
        self.ended = True
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def __aiter__(self) -> Requests:
        return self

    async def __anext__(self) -> Any:
        while not self._items:
            if self.ended:
                raise StopAsyncIteration
            self._waiter = self._conn.loop.create_future()
            await self._waiter
        message, size = self._items.popleft()
        self.queued -= size
        self._conn.credit(self._stream)
        return message

    async def read(self) -> Any:
        """grpc.aio's ``context.read()``: the next message, or ``grpc.aio.EOF`` after the last."""
        try:
            return await self.__anext__()
        except StopAsyncIteration:
            return grpc.aio.EOF


class Context:
    """What a servicer sees of its call: grpc.aio's ``ServicerContext`` methods that a server-side handler uses."""

    __slots__ = ("_code", "_conn", "_details", "_initial", "_invocation", "_stream", "_trailing")

    def __init__(self, conn: Connection, stream: Stream) -> None:
        self._conn = conn
        self._stream = stream
        self._invocation: tuple[tuple[str, str | bytes], ...] | None = None
        self._code: grpc.StatusCode | None = None
        self._details = ""
        self._trailing: Sequence[tuple[str, str | bytes]] = ()
        self._initial: Sequence[tuple[str, str | bytes]] = ()

    def invocation_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        if self._invocation is None:
            self._invocation = tuple(metadata(self._stream.fields))
        return self._invocation

    def time_remaining(self) -> float | None:
        deadline = self._stream.deadline
        return None if deadline is None else max(0.0, deadline - self._conn.loop.time())

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Sequence[tuple[str, str | bytes]] = ()
    ) -> None:
        if code == grpc.StatusCode.OK:
            raise ValueError("abort() needs a status other than OK")
        if trailing_metadata:
            self._trailing = trailing_metadata
        raise Aborted(code, details)

    async def write(self, message: Any) -> None:
        """Send one response message; waits only while the client's window holds back more than the stream's
        write high-water mark."""
        stream = self._stream
        if stream.closed:
            raise asyncio.CancelledError("the call has ended")
        data = stream.method.serialize(message)  # type: ignore[union-attr]  # set before the handler runs
        self._conn.send(stream, b"\x00" + U32.pack(len(data)) + data, self._initial)
        while len(stream.pending) > self._conn.limits.stream_write_high_water_bytes and not stream.closed:
            stream.writable = self._conn.loop.create_future()
            await stream.writable

    async def read(self) -> Any:
        if self._stream.requests is None:
            raise RuntimeError("read() is for calls with a request stream")
        return await self._stream.requests.read()

    async def send_initial_metadata(self, metadata: Sequence[tuple[str, str | bytes]]) -> None:
        self._initial = metadata
        if not self._stream.opened:
            self._conn.send(self._stream, b"", metadata)

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def set_details(self, details: str) -> None:
        self._details = details

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def details(self) -> str:
        return self._details

    def set_trailing_metadata(self, metadata: Sequence[tuple[str, str | bytes]]) -> None:
        self._trailing = metadata

    def trailing_metadata(self) -> Sequence[tuple[str, str | bytes]]:
        return self._trailing

    def peer(self) -> str:
        return self._conn.peer

    def auth_context(self) -> dict[str, list[bytes]]:
        """grpc.aio's: under TLS ``transport_security_type`` and, with a verified client certificate, its
        ``x509_*`` properties; empty without TLS. Shared by the connection's calls: do not modify."""
        return self._conn.auth_context()

    def cancelled(self) -> bool:
        return self._stream.closed and self._stream.task is not None and self._stream.task.cancelled()

    def done(self) -> bool:
        return self._stream.closed

    def set_compression(self, compression: grpc.Compression) -> None:
        return None  # replies are sent uncompressed

    def disable_next_message_compression(self) -> None:
        return None


class Handler(abc.Coroutine[Any, Any, None]):
    """A handler coroutine that was stepped once in place and has to wait, carried on by a task: it hands the task
    what the handler waits on and passes everything the task sends or throws to the handler.

    This is what makes a call's resources safe however it ends (DESIGN.md, trust rule 1): a task cancelled before
    its first step (an RST_STREAM in the same read, a deadline timer or a lost connection ahead of it in the loop)
    throws the cancellation in at that first step. Wrapped in an ``async def``, the cancellation would end the
    wrapper before it started, the handler would stay suspended for good, and its ``finally`` blocks (a batcher's
    slot, a cache flight) would never run: the model version wedged. Here it reaches the handler, which unwinds;
    what it was waiting on is cancelled, as a task's own cancellation would."""

    __slots__ = ("_coro", "_first")

    def __init__(self, coro: abc.Coroutine[Any, Any, None], first: Any) -> None:
        self._coro = coro
        self._first = first  # the future the handler waits on, until the task's first step takes it

    def send(self, value: Any) -> Any:
        first = self._first
        if first is not None:
            self._first = None
            return first
        return self._coro.send(value)

    def throw(self, *error: Any) -> Any:
        first, self._first = self._first, None
        if isinstance(first, asyncio.Future):
            first.cancel()
        return self._coro.throw(*error)

    def close(self) -> None:
        self._first = None
        self._coro.close()

    def __await__(self) -> Generator[Any, Any, None]:
        return (yield from self._coro.__await__())  # not used by tasks


__all__ = ["Aborted", "Context", "Handler", "Method", "Requests", "Services"]

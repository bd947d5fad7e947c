"""Many concurrent ``infer`` calls over one ``ModelStreamInfer`` stream.

A bidirectional stream costs the server about half as much per message as a unary call (measured on a 2-core
machine: ~40-60 µs against 90-240 µs of event-loop time), so a service that makes many small concurrent calls gets
streaming throughput without changing its code: ``AsyncClient(target, multiplex=True)``. Each call gets a unique
wire id; replies are matched by it, so they may arrive in any order. Per call:

- the deadline is honoured on the client (the call raises DeadlineExceeded) and sent to the server as the request's
  ``timeout`` parameter (µs), so a request that expires in the server's queue never reaches the model;
- cancelling the calling task forgets the call (a late reply is dropped);
- an error reply fails only that call, with the FerryError of its status code.

When the stream itself fails, every call in flight fails with that error and the next call opens a new stream.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

import grpc

from ferry.client._proto import grpc_service_pb2 as pb
from ferry.client.errors import STATUS_CODE_PARAMETER, DeadlineExceeded, FerryError, Unavailable, error_for_status


class StreamMultiplexer:
    """Shares one ModelStreamInfer call among concurrent requests. Use from one event loop."""

    def __init__(self, stub: Any, metadata: tuple[tuple[str, str], ...]) -> None:
        self._stub = stub
        self._metadata = metadata
        self._call: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._waiting: dict[str, asyncio.Future[pb.ModelInferResponse]] = {}
        self._ids = itertools.count()
        self._write_lock = asyncio.Lock()

    async def infer(self, request: pb.ModelInferRequest, timeout: float | None) -> pb.ModelInferResponse:
        """Send one request on the shared stream and wait for its reply; the reply carries the caller's id."""
        deadline = None if timeout is None else time.monotonic() + timeout
        caller_id = request.id
        wire_id = f"mx{next(self._ids)}"
        request.id = wire_id
        if timeout is not None:
            request.parameters["timeout"].int64_param = max(1, int(timeout * 1e6))
        future: asyncio.Future[pb.ModelInferResponse] = asyncio.get_running_loop().create_future()
        self._waiting[wire_id] = future
        try:
            call = self._ensure_stream()
            async with self._write_lock:  # one writer at a time on a stream
                await call.write(request)
            remaining = None if deadline is None else deadline - time.monotonic()
            try:
                response = await asyncio.wait_for(future, remaining)
            except TimeoutError:
                raise DeadlineExceeded(f"no reply within the {timeout:g} s deadline") from None
        except grpc.aio.AioRpcError as err:
            raise error_for_status(err.code(), err.details() or "") from err
        except (asyncio.InvalidStateError, grpc.aio.UsageError) as err:
            raise Unavailable(f"the shared stream closed: {err}") from None
        finally:
            self._waiting.pop(wire_id, None)
            request.id = caller_id
        response.id = caller_id
        return response

    def _ensure_stream(self) -> Any:
        if self._call is None or self._call.done():
            self._call = self._stub.ModelStreamInfer(metadata=self._metadata)
            self._reader = asyncio.get_running_loop().create_task(self._read(self._call))
        return self._call

    async def _read(self, call: Any) -> None:
        error: FerryError
        try:
            async for reply in call:
                future = self._waiting.get(reply.infer_response.id)
                if future is None or future.done():
                    continue  # its caller gave up
                if reply.error_message:
                    params = reply.infer_response.parameters
                    name = params[STATUS_CODE_PARAMETER].string_param if STATUS_CODE_PARAMETER in params else ""
                    code = grpc.StatusCode.__members__.get(name, grpc.StatusCode.UNKNOWN)
                    future.set_exception(error_for_status(code, reply.error_message))
                else:
                    future.set_result(reply.infer_response)
            error = Unavailable("the server ended the shared stream")
        except grpc.aio.AioRpcError as err:
            error = error_for_status(err.code(), err.details() or "")
        except asyncio.CancelledError:
            error = Unavailable("the client closed the shared stream")
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(error)
                future.exception()  # retrieved: its caller may already have left

    async def close(self) -> None:
        if self._call is not None:
            self._call.cancel()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)

"""Graceful shutdown for ``--transport grpcio`` (grpc.aio's server), with the guarantees of Ferry's transport.

Why it is needed: grpc-core hands an incoming call to the application only when the application asks for the next
one, and grpc.aio asks one call at a time from its event loop; a call core has accepted but grpc.aio has not asked
for yet waits in core's queue. ``Server.stop(grace)`` shuts core down, and core cancels every call in that queue at
once (the client sees CANCELLED, which it does not retry) whatever the grace: measured here, 17 of 300 calls sent
1 s before ``stop(5)`` on a busy loop, 257 of 300 sent 0.2 s before, where calls already handed over finished.

And a call that reaches core after its shutdown began is cancelled too (CANCELLED): behind a balancer that opens
connections as it pleases (nginx makes one per request), a few calls each time. grpc.aio has no way to stop
accepting before the shutdown.

So :func:`stop` first stops new connections: it shuts down the listening socket grpc-core holds (found among this
process's file descriptors by its port; connections are refused from then on, which balancers and clients retry
elsewhere), as Ferry's transport closes its listener first. Then it closes admission (:class:`Admission`): the
calls core started before that moment (core's count, from channelz) still run when they are handed over, later
ones (new streams on connections already open) are answered UNAVAILABLE at once, which clients retry. It waits
until grpc.aio has been handed every call core started, and only then lets ``stop(grace)`` shut core down: what
remains in flight is work already running, which gets the rest of the grace.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

log = logging.getLogger(__name__)

SHUTTING_DOWN = "the server is shutting down"


class Admission(grpc.aio.ServerInterceptor):
    """Counts the calls grpc.aio hands over; past :attr:`serve_until` of them, answers UNAVAILABLE, runs nothing."""

    def __init__(self) -> None:
        self.handed = 0
        self.serve_until: float = float("inf")

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        self.handed += 1
        handler = await continuation(handler_call_details)
        if self.handed <= self.serve_until or handler is None:
            return handler
        return _refusing(handler)


def _refusing(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)

    make: Any = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(handler.request_streaming, handler.response_streaming)]
    return make(
        refuse, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
    )


def core_calls_started(port: int) -> int | None:
    """Calls grpc-core started on the server listening on ``port`` (channelz), or None when channelz cannot say."""
    try:
        from grpc._cython import cygrpc

        servers = json.loads(cygrpc.channelz_get_servers(0)).get("server", [])
        for server in servers:
            if any(s.get("name", "").endswith(f":{port}") for s in server.get("listenSocket", [])):
                return int(server.get("data", {}).get("callsStarted", 0))
    except Exception as err:  # a private API: if it changes, shutdown still works, with a fixed wait instead
        log.debug("channelz gives no call count: %s", err)
    return None


def stop_listening(port: int) -> int:
    """Shut down this process's listening TCP sockets on ``port`` (grpc-core's): connections are refused from now
    on. Returns how many were found (0 where /proc is not there: then only core's shutdown stops accepting)."""
    found = 0
    with contextlib.suppress(OSError):
        for name in os.listdir("/proc/self/fd"):
            try:
                fd = os.dup(int(name))
            except (OSError, ValueError):
                continue  # gone
            try:
                sock = socket.socket(fileno=fd)
            except OSError:
                os.close(fd)  # not a socket: the duplicate must not outlive this look
                continue
            with sock:
                try:
                    listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
                    if listening and sock.type == socket.SOCK_STREAM and sock.getsockname()[1] == port:
                        sock.shutdown(socket.SHUT_RDWR)  # on the shared socket: it leaves LISTEN
                        found += 1
                except (OSError, IndexError, TypeError):
                    continue
    return found


async def stop(server: grpc.aio.Server, admission: Admission, port: int, grace_s: float) -> None:
    """Stop new connections, close admission, wait (within ``grace_s``) until every call core started was handed
    over, then stop."""
    if not stop_listening(port):
        log.debug("no listening socket of port %d found: grpc-core stops accepting at its shutdown", port)
    started = core_calls_started(port)
    admission.serve_until = admission.handed if started is None else started
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        started = core_calls_started(port)
        if started is None:  # without channelz: give the loop a moment to take what core queued
            await asyncio.sleep(min(0.2, max(deadline - time.monotonic(), 0)))
            break
        if admission.handed >= started:
            break
        await asyncio.sleep(0.005)
    await server.stop(max(deadline - time.monotonic(), 0.0))


__all__ = ["SHUTTING_DOWN", "Admission", "core_calls_started", "stop", "stop_listening"]

"""The one place gRPC errors are made: domain errors to statuses, and the SERVER span of a traced call.

Every RPC method of every Ferry service is wrapped by :func:`rpc` (a test checks none is missing).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc
from opentelemetry.trace import Status, StatusCode

from client.errors import FerryError
from server.telemetry import Tracing

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


def status_of(err: BaseException, method: str) -> tuple[grpc.StatusCode, str]:
    if isinstance(err, FerryError):
        return err.code, err.message
    log.exception("%s failed unexpectedly", method)
    return grpc.StatusCode.INTERNAL, f"internal error in {method}: {type(err).__name__}: {err}"


# Server-side codes that mark an RPC span as an error (OpenTelemetry RPC conventions); client mistakes do not.
_SERVER_FAULTS = {
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DATA_LOSS,
}


def _end_span(span: Any, code: grpc.StatusCode, message: str) -> None:
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code in _SERVER_FAULTS:
        span.set_status(Status(StatusCode.ERROR, message))


def rpc(fn: F) -> F:
    """Turn FerryError (and any unexpected exception, as INTERNAL) into the call's gRPC status; with tracing on,
    run the call inside its SERVER span."""
    if inspect.isasyncgenfunction(fn):

        @functools.wraps(fn)
        async def stream(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            tracing: Tracing = self.tracing
            with contextlib.ExitStack() as stack:
                span = (
                    stack.enter_context(tracing.rpc_span(fn.__name__, context.invocation_metadata()))
                    if (tracing.enabled)
                    else None
                )
                try:
                    async for item in fn(self, request, context):
                        yield item
                    code, message = grpc.StatusCode.OK, ""
                except Exception as err:
                    code, message = status_of(err, fn.__name__)
                if span is not None:
                    _end_span(span, code, message)
            if code != grpc.StatusCode.OK:
                await context.abort(code, message)

        return stream  # type: ignore[return-value]

    @functools.wraps(fn)
    async def unary(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        tracing: Tracing = self.tracing
        if not tracing.enabled:
            try:
                return await fn(self, request, context)
            except Exception as err:
                code, message = status_of(err, fn.__name__)
        else:
            with tracing.rpc_span(fn.__name__, context.invocation_metadata()) as span:
                try:
                    reply = await fn(self, request, context)
                    _end_span(span, grpc.StatusCode.OK, "")
                    return reply
                except Exception as err:
                    code, message = status_of(err, fn.__name__)
                    _end_span(span, code, message)
        await context.abort(code, message)

    return unary  # type: ignore[return-value]

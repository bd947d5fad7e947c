"""The one place gRPC errors are made: domain errors to statuses, and the SERVER span of a traced call.

Every RPC method of every Ferry service is wrapped by :func:`rpc` (a test checks none is missing). Servicers carry
``tracing`` and ``service_name`` (the full gRPC service name spans are named after).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
from opentelemetry.trace import Status, StatusCode

from ferry.client.errors import FerryError
from ferry.server.observability.telemetry import Tracing, restore, use

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


def rpc(fn: F) -> F:
    """Turn FerryError (and any unexpected exception, as INTERNAL) into the call's gRPC status; with tracing on,
    record the call's SERVER span (current while the method runs) when the sampler keeps it."""

    @functools.wraps(fn)
    async def method(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        tracing: Tracing = self.tracing
        span = (
            tracing.rpc_span(
                self.service_name, fn.__name__, context.invocation_metadata(), getattr(request, "model_name", "")
            )
            if tracing.enabled
            else None
        )
        if span is None:
            try:
                return await fn(self, request, context)
            except Exception as err:
                code, message = status_of(err, fn.__name__)
        else:
            token = use(span)
            code, message = grpc.StatusCode.CANCELLED, "the call was cancelled"
            try:
                reply = await fn(self, request, context)
                code, message = grpc.StatusCode.OK, ""
                return reply
            except Exception as err:
                code, message = status_of(err, fn.__name__)
            finally:
                restore(token)
                span.attributes["rpc.grpc.status_code"] = code.value[0]
                if code in _SERVER_FAULTS:
                    span.status = Status(StatusCode.ERROR, message)
                tracing.end(span)
        await context.abort(code, message)

    return method  # type: ignore[return-value]

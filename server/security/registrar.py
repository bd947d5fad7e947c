"""What services register on when auth is on: a stand-in for the server (grpc.aio's, or Ferry's ``Services``
table) that hands every method handler to the guard as it is registered, generic handlers included."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import grpc

if TYPE_CHECKING:
    from ferry.server.security.guard import Guard


class Registrar:
    """Stands in for a server (grpc.aio's or Ferry's ``Services``) while generated code registers services."""

    def __init__(self, guard: Guard, server: Any) -> None:
        self._guard = guard
        self._server = server

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self._guard.services.add(service)
        guarded = {name: self._guard.wrap(f"/{service}/{name}", h) for name, h in handlers.items()}
        self._server.add_registered_method_handlers(service, guarded)

    def add_generic_rpc_handlers(self, handlers: Iterable[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(tuple(GuardedGeneric(self._guard, h) for h in handlers))


class GuardedGeneric(grpc.GenericRpcHandler):
    """A generic handler whose methods come out guarded (wrapped once per method found)."""

    def __init__(self, guard: Guard, inner: grpc.GenericRpcHandler) -> None:
        self._guard = guard
        self._inner = inner
        self._found: dict[str, grpc.RpcMethodHandler] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        found = self._found.get(method)
        if found is None:
            handler = self._inner.service(handler_call_details)
            if handler is None:
                return None
            found = self._found[method] = self._guard.wrap(method, handler)
        return found


def unimplemented_stub(method: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
    """A plain (not async) unary handler, called inline: what generated servicer bases leave for a method the
    servicer does not implement (grpc_health's aio servicer and ``List``), which set UNIMPLEMENTED and raise."""

    async def call(request: Any, context: Any) -> Any:
        try:
            return behavior(request, context)
        except NotImplementedError:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not implemented")

    return call


def refuse_all(method: str) -> Callable[..., Any]:
    async def refused(request: Any, context: Any) -> None:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{method} has no scope in Ferry's auth table")

    return refused


__all__ = ["GuardedGeneric", "Registrar", "refuse_all", "unimplemented_stub"]

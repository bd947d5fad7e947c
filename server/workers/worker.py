"""A worker's side of ``--workers N``: its link to the supervisor, and the RPCs that reach every worker.

A worker is a whole Ferry server. What a caller changes or reads about the server as a whole goes through the
supervisor (:class:`WorkerLink`):

- ``RepositoryModelLoad``, ``RepositoryModelUnload`` and ``TraceSetting`` with settings are *broadcast*: the
  supervisor applies them to every worker, one change at a time, and the call returns once all have answered (the
  worker the caller reached included, through the same path, so every worker sees the changes in one order);
- ``ModelStatistics`` and ``/metrics`` are *gathered*: the worker asked answers with its own and every other
  worker's, summed (:mod:`~ferry.server.workers.merge`);
- ``ReportOutcomes``: outcomes the worker asked has no prediction for are offered to the others (a prediction is
  remembered by the worker that made it).

The caller's credentials are checked once, by the worker it reached (the guard wraps these methods as any other);
the supervisor calls the other workers' handlers directly (:func:`call_local`), over the socket pair only the two
processes hold. Those calls run with no caller, so they see every model: a change to a model the caller may not see
is not broadcast but answered by the worker reached alone, as a lone server answers it (as an unknown model).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from ferry.client._proto import ferry_pb2 as fpb
from ferry.client._proto import grpc_service_pb2 as pb
from ferry.client.errors import FerryError, error_for_status
from ferry.server.api.rest_context import Aborted
from ferry.server.api.rpc import rpc
from ferry.server.api.servicer import InferenceServicer
from ferry.server.observability.outcomes import OutcomeServicer, OutcomeTracker, from_proto
from ferry.server.transport import Services
from ferry.server.workers.channel import Channel, Header, status_code
from ferry.server.workers.merge import add_statistics

log = logging.getLogger(__name__)

ENV = "FERRY_WORKER"
"""``index/count/fd``: set by the supervisor for the workers it starts (fd: this worker's end of the socket pair)."""

INFERENCE = "/inference.GRPCInferenceService/"
LOAD = INFERENCE + "RepositoryModelLoad"
UNLOAD = INFERENCE + "RepositoryModelUnload"
TRACE = INFERENCE + "TraceSetting"
STATISTICS = INFERENCE + "ModelStatistics"
BROADCAST = frozenset({LOAD, UNLOAD, TRACE})
"""Methods the supervisor applies to every worker (TraceSetting only when it changes settings)."""

_COUNT = struct.Struct("!I")


class LocalContext:
    """What a handler sees of a call the supervisor makes: no metadata, no deadline, no peer certificate."""

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()

    def time_remaining(self) -> float | None:
        return None

    def auth_context(self) -> dict[str, list[bytes]]:
        return {}

    def peer(self) -> str:
        return "unix:supervisor"

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()) -> None:
        raise Aborted(code, details)

    def cancelled(self) -> bool:
        return False


async def call_local(services: Services, path: str, body: bytes) -> bytes:
    """Run the unary handler of ``path`` in this worker on a serialized request; the serialized reply, or the
    handler's status raised as a FerryError."""
    method = services.lookup(path.encode())
    if method is None or method.kind != 0:
        raise error_for_status(grpc.StatusCode.UNIMPLEMENTED, f"{path} is not served")
    try:
        reply = await method.behavior(method.deserialize(body), LocalContext())
    except Aborted as err:
        raise error_for_status(err.code, err.details) from None
    return method.serialize(reply)


class WorkerLink:
    """This worker's link to the supervisor (``index`` of ``count``). :meth:`attach` gives it the server's local
    handlers and scrape; :meth:`start` runs the link."""

    def __init__(self, index: int, count: int, sock: socket.socket, max_frame_bytes: int) -> None:
        self.index = index
        self.count = count
        self.channel = Channel(sock, self._serve, "the supervisor", max_frame_bytes)
        self._services: Services | None = None
        self._scrape: Callable[[], bytes] | None = None
        self._outcomes: OutcomeTracker | None = None
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def from_env(cls, max_frame_bytes: int) -> WorkerLink | None:
        value = os.environ.get(ENV)
        if not value:
            return None
        index, count, fd = (int(part) for part in value.split("/"))
        return cls(index, count, socket.socket(fileno=fd), max_frame_bytes)

    def attach(self, services: Services, scrape: Callable[[], bytes], outcomes: OutcomeTracker) -> None:
        """``services``: this worker's handlers, unguarded and not broadcast (what the supervisor calls);
        ``scrape``: this worker's own /metrics text."""
        self._services = services
        self._scrape = scrape
        self._outcomes = outcomes

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.channel.run(), name="supervisor link")

    async def join(self) -> None:
        """Tell the supervisor this worker has loaded its models: it replays the changes made through other
        workers (loads, unloads, trace settings) onto this one before answering, and from then on sends it every
        change. Called before the gRPC port accepts connections."""
        await self.channel.call("join")

    async def ready(self, line: str) -> None:
        await self.channel.call("ready", {"line": line})

    async def stop(self) -> None:
        self.channel.close()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)

    # -- requests from the supervisor

    async def _serve(self, header: Header, body: bytes) -> tuple[Header, bytes]:
        op = header["op"]
        if op == "call":
            assert self._services is not None
            return {}, await call_local(self._services, str(header["method"]), body)
        if op == "ping":  # the supervisor checks this worker's loop answers while it applies a change
            return {}, b""
        if op == "metrics":
            assert self._scrape is not None
            return {}, self._scrape()
        if op == "outcomes":
            assert self._outcomes is not None
            outcomes = [from_proto(i, o) for i, o in enumerate(fpb.ReportOutcomesRequest.FromString(body).outcomes)]
            result = self._outcomes.report(outcomes, count_unmatched=False)
            return {"unmatched": list(result.unmatched_index)}, b""
        raise error_for_status(grpc.StatusCode.UNIMPLEMENTED, f"unknown link request {op!r}")

    # -- requests to the supervisor

    async def broadcast(self, path: str, body: bytes) -> bytes:
        """Apply a change on every worker; this worker's reply. Fails with the first failure's status when any
        worker failed (naming the workers when they did not all fail alike)."""
        header, out = await self.channel.call("broadcast", {"method": path}, body)
        results: list[dict[str, Any]] = header["results"]
        failed = [r for r in results if r["code"]]
        if failed:
            if len(failed) == len(results) and len({(r["code"], r["message"]) for r in failed}) == 1:
                raise error_for_status(status_code(failed[0]["code"]), failed[0]["message"])
            ok = [r["worker"] for r in results if not r["code"]]
            detail = "; ".join(f"worker {r['worker']}: {r['message']}" for r in failed)
            raise error_for_status(status_code(failed[0]["code"]), f"{detail} (done on workers {ok})")
        return _parts(out, len(results))[[r["worker"] for r in results].index(self.index)]

    async def gather(self, path: str, body: bytes) -> list[bytes]:
        """The replies of every other worker to a read (those that failed left out, and logged)."""
        header, out = await self.channel.call("gather", {"method": path}, body)
        replies = []
        for result, part in zip(header["results"], _parts(out, len(header["results"])), strict=True):
            if result["code"]:
                log.warning("worker %s: %s: %s", result["worker"], path, result["message"])
            else:
                replies.append(part)
        return replies

    async def metrics(self) -> tuple[dict[int, bytes], bytes]:
        """Every running worker's own /metrics text by worker index (this one's included), and the supervisor's."""
        assert self._scrape is not None
        own = self._scrape()
        header, out = await self.channel.call("metrics")
        parts = _parts(out, len(header["workers"]) + 1)
        texts = dict(zip(header["workers"], parts, strict=False))
        texts[self.index] = own
        return dict(sorted(texts.items())), parts[-1]

    async def outcomes(self, request: fpb.ReportOutcomesRequest) -> list[set[int]]:
        """Offer outcomes to every other worker; the positions each left unmatched."""
        header, _ = await self.channel.call("outcomes", {}, request.SerializeToString())
        return [set(r["unmatched"]) for r in header["results"]]


def pack(parts: Sequence[bytes]) -> bytes:
    """Several bodies as one: each prefixed by its length."""
    return b"".join(_COUNT.pack(len(part)) + part for part in parts)


def _parts(body: bytes, count: int) -> list[bytes]:
    parts, at = [], 0
    for _ in range(count):
        (size,) = _COUNT.unpack_from(body, at)
        parts.append(body[at + _COUNT.size : at + _COUNT.size + size])
        at += _COUNT.size + size
    return parts


class FleetServicer:
    """The inference service as callers reach it with several workers: the servicer of this worker, with the
    changes broadcast and the statistics gathered (the module docstring). ``visible(model)``: whether the current
    caller may see a model (the guard's :meth:`~ferry.server.security.guard.Guard.visible`; None: no auth)."""

    def __init__(
        self, servicer: InferenceServicer, link: WorkerLink, visible: Callable[[str], bool] | None = None
    ) -> None:
        self._servicer = servicer
        self._link = link
        self._visible = visible
        self.tracing = servicer.tracing
        self.service_name = servicer.service_name

    def __getattr__(self, name: str) -> Any:
        return getattr(self._servicer, name)

    async def _broadcast(self, path: str, request: Any, reply_type: Any) -> Any:
        return reply_type.FromString(await self._link.broadcast(path, request.SerializeToString()))

    def _hidden(self, model: str) -> bool:
        """Whether ``model`` is one the caller may not see: the other workers' handlers, called with no caller,
        would see it, so the change must not reach them."""
        return bool(model) and self._visible is not None and not self._visible(model)

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Any
    ) -> pb.RepositoryModelLoadResponse:
        if self._hidden(request.model_name):  # this worker's own handler refuses it, as a lone server does
            return await self._servicer.RepositoryModelLoad(request, context)
        return await self._load_change(request, context)

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Any
    ) -> pb.RepositoryModelUnloadResponse:
        if self._hidden(request.model_name):
            return await self._servicer.RepositoryModelUnload(request, context)
        return await self._unload_change(request, context)

    async def _load_change(self, request: pb.RepositoryModelLoadRequest, context: Any) -> Any:
        return await self._broadcast(LOAD, request, pb.RepositoryModelLoadResponse)

    async def _unload_change(self, request: pb.RepositoryModelUnloadRequest, context: Any) -> Any:
        return await self._broadcast(UNLOAD, request, pb.RepositoryModelUnloadResponse)

    _load_change.__name__ = "RepositoryModelLoad"  # the span's name
    _load_change = rpc(_load_change)
    _unload_change.__name__ = "RepositoryModelUnload"
    _unload_change = rpc(_unload_change)

    async def TraceSetting(self, request: pb.TraceSettingRequest, context: Any) -> pb.TraceSettingResponse:
        if not request.settings or self._hidden(request.model_name):  # a read (the same on every worker), or refused
            return await self._servicer.TraceSetting(request, context)
        return await self._trace_change(request, context)

    async def _trace_change(self, request: pb.TraceSettingRequest, context: Any) -> pb.TraceSettingResponse:
        return await self._broadcast(TRACE, request, pb.TraceSettingResponse)

    _trace_change.__name__ = "TraceSetting"  # the span's name
    _trace_change = rpc(_trace_change)

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: Any) -> pb.ModelStatisticsResponse:
        """This worker's statistics (its errors as they are) plus every other worker's."""
        reply: pb.ModelStatisticsResponse = await self._servicer.ModelStatistics(request, context)
        if reply is None:  # aborted with an error already
            return reply
        try:
            others = await self._link.gather(STATISTICS, request.SerializeToString())
        except FerryError as err:
            await context.abort(err.code, f"ModelStatistics: the other workers' are missing: {err.message}")
            raise
        for other in others:
            add_statistics(reply, pb.ModelStatisticsResponse.FromString(other))
        return reply


class FleetOutcomes:
    """``ferry.v1.OutcomeService`` with several workers: an outcome this worker has no prediction for is offered
    to the others; it is unmatched only if none of them has it."""

    def __init__(self, servicer: OutcomeServicer, tracker: OutcomeTracker, link: WorkerLink) -> None:
        self._tracker = tracker
        self._link = link
        self.tracing = servicer.tracing
        self.service_name = servicer.service_name

    @rpc
    async def ReportOutcomes(self, request: fpb.ReportOutcomesRequest, context: object) -> fpb.ReportOutcomesResponse:
        outcomes = [from_proto(i, o) for i, o in enumerate(request.outcomes)]
        result = self._tracker.report(outcomes, count_unmatched=False)
        unmatched = set(result.unmatched_index)
        matched = result.matched
        if unmatched:
            rest = fpb.ReportOutcomesRequest(outcomes=[request.outcomes[i] for i in sorted(unmatched)])
            order = sorted(unmatched)
            still = set(range(len(order)))
            for left in await self._link.outcomes(rest):
                still &= left
            unmatched = {order[i] for i in still}
            matched += len(order) - len(still)
        self._tracker.count_unmatched(len(unmatched))
        return fpb.ReportOutcomesResponse(matched=matched, unmatched=len(unmatched), unmatched_index=sorted(unmatched))


__all__ = ["ENV", "FleetOutcomes", "FleetServicer", "LocalContext", "WorkerLink", "call_local", "pack"]

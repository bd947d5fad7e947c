"""The gRPC face of Ferry: thin methods that turn protocol messages into calls on the repository and
``inference.infer``. One decorator maps errors to statuses on every RPC (a test checks none is missing)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from ferry.client._proto import grpc_service_pb2 as pb
from ferry.client._proto import grpc_service_pb2_grpc as pb_grpc
from ferry.client.errors import STATUS_CODE_PARAMETER, InvalidArgument, Unimplemented
from ferry.server import __version__
from ferry.server.api.rpc import rpc, status_of
from ferry.server.inference.cache import ResultCache
from ferry.server.inference.call import Call, infer
from ferry.server.models.repository import ModelRepository
from ferry.server.observability.telemetry import NO_TRACING, Span, Tracing, current_span, restore, use

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name

EXTENSIONS = ("binary_tensor_data", "model_configuration", "model_repository", "statistics", "trace")
"""Triton protocol extensions Ferry implements (perf_analyzer reads `statistics` to ask for server stats);
``binary_tensor_data`` is the REST API's (:mod:`ferry.server.api.rest_tensors`)."""


def _unimplemented(feature: str) -> Callable[..., Any]:
    @rpc
    async def method(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        raise Unimplemented(f"Ferry does not implement {feature}")

    return method


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The call's deadline on the monotonic clock, or None when the caller set none."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """``inference.GRPCInferenceService``. ``on_change`` is called after models load or unload."""

    def __init__(
        self,
        repository: ModelRepository,
        cache: ResultCache,
        is_ready: Callable[[], bool],
        on_change: Callable[[], Awaitable[None]],
        tracing: Tracing = NO_TRACING,
    ) -> None:
        self._repository = repository
        self._cache = cache
        self.in_flight = 0  # inference requests being handled, for the metrics
        self.tracing = tracing
        self.service_name = SERVICE_NAME
        self._is_ready = is_ready
        self._on_change = on_change
        self._load_lock = asyncio.Lock()

    @rpc
    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @rpc
    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._is_ready())

    @rpc
    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self._repository.is_ready(request.name, request.version))

    @rpc
    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Any) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="ferry", version=__version__, extensions=EXTENSIONS)

    @rpc
    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        model = self._repository.resolve(request.name, request.version)
        versions = (
            [model.version_str]
            if request.version
            else [str(v) for v in sorted(self._repository.get_model(request.name).versions)]
        )
        mbs = model.max_batch_size

        def meta(specs: Any) -> list[pb.ModelMetadataResponse.TensorMetadata]:
            return [
                pb.ModelMetadataResponse.TensorMetadata(name=t.name, datatype=t.datatype.name, shape=t.wire_shape(mbs))
                for t in specs
            ]

        return pb.ModelMetadataResponse(
            name=model.name,
            versions=versions,
            platform=model.config.platform or model.config.backend,
            inputs=meta(model.inputs),
            outputs=meta(model.outputs),
        )

    @rpc
    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Any) -> pb.ModelConfigResponse:
        return pb.ModelConfigResponse(config=self._repository.resolve(request.name, request.version).config)

    @rpc
    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        self.in_flight += 1
        try:
            return await infer(request, self._repository, self._cache, deadline_of(context), self.tracing)
        finally:
            self.in_flight -= 1

    @rpc
    async def ModelStreamInfer(self, requests: AsyncIterator[pb.ModelInferRequest], context: Any) -> None:
        """Requests on one stream run concurrently; each answer is written when ready (matched by ``id``). A
        request the model can run at once is answered in the reading turn, with no task of its own (the streaming
        fast path); the others are answered by a task each. A failed request is answered with ``error_message``
        and the stream stays open. Answers go out through ``context.write``, one at a time."""
        deadline = deadline_of(context)
        writing = asyncio.Lock()
        tasks: set[asyncio.Task[None]] = set()

        async def write(reply: pb.ModelStreamInferResponse) -> None:
            async with writing:
                await context.write(reply)

        async def answer(request: pb.ModelInferRequest, call: Call) -> None:
            self.in_flight += 1
            try:
                reply = pb.ModelStreamInferResponse(infer_response=await call.later())
            except Exception as err:
                reply = _stream_error(request, err)
            finally:
                self.in_flight -= 1
            await write(reply)

        stream = current_span()  # sampled: each request gets a span of its own under the stream's
        try:
            async for request in requests:
                span = token = None
                if stream is not None:
                    attributes = {"ferry.model": request.model_name, "ferry.request_id": request.id}
                    span = self.tracing.child_span("ModelStreamInfer request", stream, attributes)
                    token = use(span)
                try:
                    call = Call(request, self._repository, self._cache, deadline, self.tracing)
                    response = call.now()
                except Exception as err:
                    response = None
                    reply: pb.ModelStreamInferResponse | None = _stream_error(request, err)
                else:
                    reply = None if response is None else pb.ModelStreamInferResponse(infer_response=response)
                finally:
                    if token is not None:
                        restore(token)
                if reply is not None:
                    if span is not None:
                        self.tracing.end(span)
                    await write(reply)
                    continue
                work = answer(request, call)
                task = asyncio.create_task(work if span is None else self._traced(work, span))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            while tasks:  # the client is done sending: answer what is still running
                await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()

    async def _traced(self, work: Awaitable[None], span: Span) -> None:
        """Run a stream request's answer with its span current, and record the span when it is answered."""
        use(span)  # this task's own context: nothing to restore
        try:
            await work
        finally:
            self.tracing.end(span)

    @rpc
    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: Any) -> pb.ModelStatisticsResponse:
        if request.name:
            model = self._repository.get_model(request.name)
            if request.version:
                versions = [self._repository.resolve(request.name, request.version)]
            else:
                versions = [model.versions[v] for v in sorted(model.versions)]
        else:
            if request.version:
                raise InvalidArgument("ModelStatistics: a version needs a model name")
            versions = [mv for m in self._repository.models() for _, mv in sorted(m.versions.items())]
        return pb.ModelStatisticsResponse(model_stats=[mv.stats.to_proto(mv.name, mv.version) for mv in versions])

    @rpc
    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: Any) -> pb.RepositoryIndexResponse:
        entries = await asyncio.to_thread(lambda: list(self._repository.index()))
        return pb.RepositoryIndexResponse(
            models=[
                pb.RepositoryIndexResponse.ModelIndex(name=e.name, version=e.version, state=e.state, reason=e.reason)
                for e in entries
                if not request.ready or e.state == "READY"
            ]
        )

    @rpc
    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Any
    ) -> pb.RepositoryModelLoadResponse:
        if request.parameters:
            raise InvalidArgument(f"RepositoryModelLoad: parameters are not supported ({sorted(request.parameters)})")
        async with self._load_lock:
            model = await self._repository.load(request.model_name)
            await self._on_change()
        if not model.ready:
            raise InvalidArgument(f"model {request.model_name!r} failed to load: {model.errors}")
        return pb.RepositoryModelLoadResponse()

    @rpc
    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Any
    ) -> pb.RepositoryModelUnloadResponse:
        async with self._load_lock:
            await self._repository.unload(request.model_name)
            await self._on_change()
        return pb.RepositoryModelUnloadResponse()

    SystemSharedMemoryStatus = _unimplemented("system shared memory")
    SystemSharedMemoryRegister = _unimplemented("system shared memory")
    SystemSharedMemoryUnregister = _unimplemented("system shared memory")
    CudaSharedMemoryStatus = _unimplemented("CUDA shared memory")
    CudaSharedMemoryRegister = _unimplemented("CUDA shared memory")
    CudaSharedMemoryUnregister = _unimplemented("CUDA shared memory")

    @rpc
    async def TraceSetting(self, request: pb.TraceSettingRequest, context: Any) -> pb.TraceSettingResponse:
        """Triton's trace extension: read (no settings) or change what is sampled, globally or for one model."""
        model = request.model_name or None
        if model is not None:
            self._repository.get_model(model)  # NOT_FOUND for a model the repository does not have
        settings = self.tracing.settings
        changes = {name: list(value.value) for name, value in request.settings.items()}
        current = settings.update(model, changes) if changes else settings.get(model)
        if changes:
            log.info("trace settings%s: %s", f" of model {model!r}" if model else "", current)
        value = pb.TraceSettingResponse.SettingValue
        return pb.TraceSettingResponse(settings={name: value(value=v) for name, v in current.items()})

    LogSettings = _unimplemented("log settings")


def _stream_error(request: pb.ModelInferRequest, err: Exception) -> pb.ModelStreamInferResponse:
    """A stream's answer to a failed request: the message as ``error_message``, the status code as a parameter."""
    code, message = status_of(err, "ModelStreamInfer")
    log.debug("stream request %r failed: %s %s", request.id, code, message)
    return pb.ModelStreamInferResponse(
        error_message=message,
        infer_response=pb.ModelInferResponse(
            id=request.id,
            model_name=request.model_name,
            model_version=request.model_version,
            # error_message is text only: the status code travels as a parameter clients may read
            parameters={STATUS_CODE_PARAMETER: pb.InferParameter(string_param=code.name)},
        ),
    )


__all__ = ["EXTENSIONS", "InferenceServicer"]

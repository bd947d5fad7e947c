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
from ferry.client._proto import model_config_pb2 as mc
from ferry.client.errors import STATUS_CODE_PARAMETER, InvalidArgument, Unavailable, Unimplemented
from ferry.server import __version__
from ferry.server.api.rpc import rpc, status_of
from ferry.server.inference.cache import ResultCache
from ferry.server.inference.call import Call, infer
from ferry.server.inference.shadow import ShadowRunner
from ferry.server.models.repository import CONTROL_REFUSED, ModelRepository, iso_time
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
        shadows: ShadowRunner | None = None,
    ) -> None:
        self._repository = repository
        self._shadows = shadows
        self._cache = cache
        self.in_flight = 0  # inference requests being handled, for the metrics
        self.tracing = tracing
        self.service_name = SERVICE_NAME
        self._is_ready = is_ready
        self._on_change = on_change

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
        """The version's completed config, with its provenance added as ``parameters``: ``ferry.sha256`` (of the
        model file), ``ferry.loaded_at`` (UTC, when the build finished loading and warming), ``ferry.model_file``.
        Loading such a config back as an override drops these keys."""
        version = self._repository.resolve(request.name, request.version)
        config = mc.ModelConfig()
        config.CopyFrom(version.config)
        for key, value in (
            ("ferry.sha256", version.sha256),
            ("ferry.loaded_at", iso_time(version.loaded_at)),
            ("ferry.model_file", str(version.path)),
        ):
            config.parameters[key].string_value = value
        return pb.ModelConfigResponse(config=config)

    @rpc
    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        self.in_flight += 1
        try:
            return await infer(
                request, self._repository, self._cache, deadline_of(context), self.tracing, self._shadows
            )
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
                    call = Call(request, self._repository, self._cache, deadline, self.tracing, self._shadows)
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
        """Triton's load: ``config`` (a JSON ModelConfig used instead of config.pbtxt) and ``file:<path>`` (bytes
        that replace the model directory's content for this load) parameters. A version that fails keeps its
        serving build; the call then fails with the reasons (INVALID_ARGUMENT)."""
        self._check_control("RepositoryModelLoad")
        name = request.model_name
        config, files = _load_parameters(request)
        result = await self._repository.load(name, config, files)
        await self._on_change()
        if result.failures:
            reasons = "; ".join(
                f"{'model' if v is None else f'version {v}'}: {why}"
                for v, why in sorted(result.failures.items(), key=lambda e: -1 if e[0] is None else e[0])
            )
            serving = sorted(result.model.versions)
            raise InvalidArgument(f"model {name!r} failed to load ({reasons}); serving versions {serving}")
        return pb.RepositoryModelLoadResponse()

    @rpc
    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Any
    ) -> pb.RepositoryModelUnloadResponse:
        self._check_control("RepositoryModelUnload")
        await self._repository.unload(request.model_name)
        await self._on_change()
        return pb.RepositoryModelUnloadResponse()

    def _check_control(self, method: str) -> None:
        """Load and unload requests are taken in the explicit mode only (Triton's status and words)."""
        if self._repository.control_mode != "explicit":
            raise Unavailable(f"{method}: {CONTROL_REFUSED} (--model-control-mode {self._repository.control_mode})")

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


def _load_parameters(request: pb.RepositoryModelLoadRequest) -> tuple[str | None, dict[str, bytes]]:
    """``config`` (string) and ``file:<path>`` (bytes) parameters of a load request; any other is refused."""
    config: str | None = None
    files: dict[str, bytes] = {}
    for key, param in request.parameters.items():
        kind = param.WhichOneof("parameter_choice")
        if key == "config":
            if kind != "string_param":
                raise InvalidArgument(f"RepositoryModelLoad: parameter 'config' must be a string, got {kind}")
            config = param.string_param
        elif key.startswith("file:"):
            if kind != "bytes_param":
                raise InvalidArgument(f"RepositoryModelLoad: parameter {key!r} must be bytes, got {kind}")
            files[key.removeprefix("file:")] = param.bytes_param
        else:
            raise InvalidArgument(
                f"RepositoryModelLoad: unknown parameter {key!r} (known: 'config', 'file:<version>/<file>')"
            )
    return config, files


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

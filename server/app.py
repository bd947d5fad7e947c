"""Composition root: builds the gRPC and HTTP listeners around one model repository. gRPC is carried by Ferry's own
HTTP/2 transport (:mod:`ferry.server.transport`) or, with ``transport="grpcio"``, by grpc.aio.

Creating the server (:meth:`FerryServer.start`, which returns once models are loaded and the ports are bound) is
separate from running it until a signal (:func:`serve`), so tests start it on port 0 and stop it in ``finally``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import grpc
from aiohttp import web
from google.protobuf.descriptor import FileDescriptor
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc
from prometheus_client.core import Metric

from ferry.client._proto import ferry_pb2, ferry_pb2_grpc, grpc_service_pb2
from ferry.client._proto import grpc_service_pb2_grpc as pb_grpc
from ferry.client.errors import Unavailable
from ferry.server.api.http import HttpLimits, LimitedSite, create_http_app
from ferry.server.api.servicer import SERVICE_NAME, InferenceServicer
from ferry.server.config import ServerConfig
from ferry.server.inference.cache import ResultCache
from ferry.server.models.repository import ModelRepository
from ferry.server.observability.loopwatch import LoopWatch
from ferry.server.observability.metrics import FerryCollector, exposition, registry_for
from ferry.server.observability.monitoring import Monitoring, metric_families
from ferry.server.observability.outcomes import SERVICE_NAME as OUTCOME_SERVICE
from ferry.server.observability.outcomes import OutcomeServicer, OutcomeTracker
from ferry.server.observability.predlog import PredictionLog, PredictionLogSettings
from ferry.server.observability.telemetry import Tracing
from ferry.server.transport import Limits, Services, Transport

log = logging.getLogger(__name__)

T = TypeVar("T")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def reflection_pool() -> DescriptorPool:
    """A pool describing every service served, so grpcurl and other reflection clients need no local .proto: Ferry's
    files live in ``ferry.client._proto.POOL``, health's and reflection's in protobuf's default pool."""
    pool = DescriptorPool()
    added: set[str] = set()

    def add(file: FileDescriptor) -> None:
        if file.name not in added:
            for dependency in file.dependencies:  # a file loads only after the files it imports
                add(dependency)
            pool.AddSerializedFile(file.serialized_pb)
            added.add(file.name)

    for file in (grpc_service_pb2.DESCRIPTOR, ferry_pb2.DESCRIPTOR, health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR):
        add(file)
    return pool


class FerryServer:
    """One Ferry server: the repository, the gRPC server (inference, health, reflection, outcomes) and the HTTP port
    (the REST API over the same registered handlers, and /metrics)."""

    def __init__(self, config: ServerConfig, tracing: Tracing | None = None) -> None:
        """``tracing`` defaults to what the OTEL_* environment variables ask for."""
        self.config = config
        self.cache = ResultCache(config.cache_max_bytes)
        self.tracing = tracing if tracing is not None else Tracing.from_env()
        log_settings = PredictionLogSettings(
            config.prediction_log_path, config.prediction_log_max_bytes, config.prediction_log_backups
        )
        self.monitoring = Monitoring(
            PredictionLog.from_settings(log_settings), OutcomeTracker(config.outcome_window, max_pending=100_000)
        )
        self.repository = ModelRepository(
            config, on_close=self.cache.drop_version, tracing=self.tracing, monitoring=self.monitoring
        )
        self.loopwatch = LoopWatch(config.loop_lag_warn_s)
        self.grpc_port = 0
        self.http_port: int | None = None
        self._health = health.aio.HealthServicer()
        self._draining = False
        self._http_runner: web.AppRunner | None = None
        self._grpc: grpc.aio.Server | None = None  # made in start(): it binds to the running event loop
        self._transport: Transport | None = None
        self._models_with_health: set[str] = set()
        self.services = Services()  # every gRPC method, whichever transport carries gRPC: REST calls through it

    def is_ready(self) -> bool:
        if self._draining or not self.repository.loaded:
            return False
        return not self.config.strict_readiness or all(m.ready for m in self.repository.models())

    async def start(self) -> None:
        """Bind the ports, load every model, then report SERVING. Raises if a port cannot be bound."""
        self.monitoring.loop = asyncio.get_running_loop()
        self.loopwatch.start()  # first, so stalls while models load are seen too
        servicer = InferenceServicer(self.repository, self.cache, self.is_ready, self.update_health, self.tracing)
        self.metrics = FerryCollector(self.repository, self.cache, lambda: servicer.in_flight)
        self.metrics.extras.append(self._monitoring_metrics)
        self.metrics.extras.append(self.loopwatch.metric_families)
        self._registry = registry_for(self.metrics)
        self._register(servicer, self.services)
        if self.config.transport == "ferry":
            await self._start_ferry_transport(servicer)
        else:
            await self._start_grpcio(servicer)
        await self.update_health()  # NOT_SERVING while models load
        if self.config.http_port is not None:
            await self._start_http(self.config.http_port)
        await asyncio.to_thread(self.repository.load_all)
        await self.update_health()

    def _register(self, servicer: InferenceServicer, server: Any) -> None:
        """Every gRPC service Ferry serves, on either transport (both take generated code's registrations)."""
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        ferry_pb2_grpc.add_OutcomeServiceServicer_to_server(
            OutcomeServicer(self.monitoring.outcomes, self.tracing), server
        )
        services = (SERVICE_NAME, OUTCOME_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME)
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
            reflection.aio.ReflectionServicer(services, pool=reflection_pool()), server
        )

    async def _start_ferry_transport(self, servicer: InferenceServicer) -> None:
        limits = Limits(
            max_message_bytes=self.config.max_message_bytes, max_concurrent_streams=self.config.max_pending_calls
        )
        self._transport = Transport(self.services, limits)
        address = f"{self.config.host}:{self.config.grpc_port}"
        try:
            self.grpc_port = await self._transport.start(self.config.host, self.config.grpc_port)
        except OSError as err:
            raise Unavailable(f"cannot bind gRPC to {address}: {err}") from None

    async def _start_grpcio(self, servicer: InferenceServicer) -> None:
        limit, pending = self.config.max_message_bytes, self.config.max_pending_calls
        self._grpc = server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                # soft == hard: no random early drops below the bound (see ServerConfig.max_pending_calls)
                ("grpc.server.max_pending_requests", pending),
                ("grpc.server.max_pending_requests_hard_limit", pending),
            ]
        )
        self._register(servicer, server)
        address = f"{self.config.host}:{self.config.grpc_port}"
        try:
            self.grpc_port = server.add_insecure_port(address)
        except RuntimeError as err:
            raise Unavailable(f"cannot bind gRPC to {address}: {err}") from None
        if self.grpc_port == 0:
            raise Unavailable(f"cannot bind gRPC to {address}")
        await server.start()

    async def _start_http(self, port: int) -> None:
        limits = self.http_limits()
        app = create_http_app(lambda: exposition(self._registry), self.services.lookup, limits)
        # on stop, calls in flight get the drain time, as gRPC's do (aiohttp's default is 60 s)
        runner = web.AppRunner(
            app, access_log=None, shutdown_timeout=self.config.shutdown_grace_s, **limits.runner_options()
        )
        await runner.setup()
        site = LimitedSite(runner, self.config.host, port, max_connections=limits.max_connections)
        try:
            await site.start()
        except OSError as err:
            await runner.cleanup()
            raise Unavailable(f"cannot bind HTTP to {self.config.host}:{port}: {err}") from None
        self._http_runner = runner
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.http_port = sockets[0].getsockname()[1] if sockets else port

    def http_limits(self) -> HttpLimits:
        config = self.config
        return HttpLimits(
            max_body_bytes=config.max_message_bytes,
            body_timeout_s=config.http_body_timeout_s,
            keepalive_timeout_s=config.http_keepalive_timeout_s,
            max_connections=config.http_max_connections,
        )

    async def update_health(self) -> None:
        """Publish readiness to the health service: "" and the inference service, and one entry per model."""
        overall = SERVING if self.is_ready() else NOT_SERVING
        await self._health.set("", overall)
        await self._health.set(SERVICE_NAME, overall)
        models = {m.name: m for m in self.repository.models()}
        for name in self._models_with_health - set(models):
            await self._health.set(name, NOT_SERVING)
        for name, model in models.items():
            await self._health.set(name, SERVING if model.ready and not self._draining else NOT_SERVING)
        self._models_with_health |= set(models)

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop taking calls, give in-flight ones ``grace_s`` to finish, then release the models."""
        self._draining = True
        with contextlib.suppress(Exception):
            await self.update_health()
        grace = self.config.shutdown_grace_s if grace_s is None else grace_s
        if self._grpc is not None:
            await self._grpc.stop(grace)
        if self._transport is not None:
            await self._transport.stop(grace)
        if self._http_runner is not None:
            await self._http_runner.cleanup()
        await self.repository.close()
        self.tracing.shutdown()
        if self.monitoring.predlog is not None:
            await asyncio.to_thread(self.monitoring.predlog.close)
        self.loopwatch.stop()

    def _monitoring_metrics(self) -> Iterator[Metric]:
        monitors = [mv.monitor for m in self.repository.models() for mv in m.versions.values() if mv.monitor]
        return metric_families(monitors, self.monitoring)

    def ready_line(self) -> str:
        models = self.repository.models()
        ready = sum(m.ready for m in models)
        http = f"{self.config.host}:{self.http_port}" if self.http_port is not None else "off"
        return f"ferry ready: grpc={self.config.host}:{self.grpc_port} http={http} models={ready}/{len(models)} ready"


async def serve(config: ServerConfig) -> None:
    """Run a server until SIGINT or SIGTERM, then drain. Prints one line when ready."""
    server = FerryServer(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await server.start()
        print(server.ready_line(), flush=True)
        await stop.wait()
        log.info("stopping: draining in-flight calls for up to %.1fs", config.shutdown_grace_s)
    finally:
        await server.stop()


def run(main: Coroutine[Any, Any, T], use_uvloop: bool) -> T:
    """Run ``main`` to completion, on uvloop when it is installed and wanted; returns its result."""
    factory = None
    if use_uvloop:
        try:
            import uvloop
        except ImportError:
            log.info("uvloop is not installed: using asyncio's default event loop")
        else:
            factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)

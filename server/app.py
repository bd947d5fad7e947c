"""Composition root: builds the gRPC and HTTP listeners around one model repository. gRPC is carried by Ferry's own
HTTP/2 transport (:mod:`ferry.server.transport`) or, with ``transport="grpcio"``, by grpc.aio.

Creating the server (:meth:`FerryServer.start`, which returns once models are loaded and the ports are bound) is
separate from running it until a signal (:func:`serve`), so tests start it on port 0 and stop it in ``finally``.

Start before serve: the gRPC port is bound at once (a port in use fails the start before any model loads) but
accepts connections only once the initial load finished; until then a connection is refused, so nginx, Envoy and
gRPC's own round_robin pass the replica by as they do a stopped one. HTTP opens first (live 200, ready 503); a
request that reaches the server while it loads for a model it does not know yet is answered UNAVAILABLE ("model
'x' is loading", retryable), never NOT_FOUND.

Drain (:func:`serve`, on SIGTERM or SIGINT): readiness false at once (HTTP ready 503, gRPC health NOT_SERVING,
ServerReady false); the listeners go on accepting and serving for ``drain_delay_s``; then GOAWAY, no new
connections, and calls in flight and queued get ``shutdown_grace_s`` to finish; exit 0. A second signal exits at
once, with 128 + the signal's number.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import os
import signal
import socket
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf.descriptor import FileDescriptor
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

from ferry.client._proto import ferry_pb2, ferry_pb2_grpc, grpc_service_pb2
from ferry.client._proto import grpc_service_pb2_grpc as pb_grpc
from ferry.client.errors import Unavailable
from ferry.server.api.http import HttpLimits, create_http_app
from ferry.server.api.servicer import SERVICE_NAME, InferenceServicer
from ferry.server.config import ServerConfig
from ferry.server.inference.cache import ResultCache
from ferry.server.inference.shadow import ShadowRunner
from ferry.server.models.repository import ModelRepository
from ferry.server.observability.loopwatch import LoopWatch
from ferry.server.observability.metrics import FerryCollector, exposition, registry_for
from ferry.server.observability.monitoring import Monitoring, metric_families
from ferry.server.observability.outcomes import SERVICE_NAME as OUTCOME_SERVICE
from ferry.server.observability.outcomes import OutcomeServicer, OutcomeTracker
from ferry.server.observability.predlog import PredictionLog, PredictionLogSettings
from ferry.server.observability.telemetry import Tracing
from ferry.server.security.audit import AuditLog
from ferry.server.security.guard import Guard
from ferry.server.security.guard import metric_families as security_metric_families
from ferry.server.security.tls import GRPC_ALPN, HTTP_ALPN, CertificateReloader, TlsFiles
from ferry.server.transport import Limits, Services, Transport, grpcaio
from ferry.server.transport.http1 import Http1Server
from ferry.server.transport.server import bound_socket
from ferry.server.workers.channel import frame_bound
from ferry.server.workers.merge import merge_metrics
from ferry.server.workers.worker import FleetOutcomes, FleetServicer, WorkerLink

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

    def __init__(self, config: ServerConfig, tracing: Tracing | None = None, worker: WorkerLink | None = None) -> None:
        """``tracing`` defaults to what the OTEL_* environment variables ask for. ``worker``: this server is one of
        several workers (:mod:`ferry.server.workers`), linked to their supervisor."""
        self.config = config
        self.worker = worker
        self.cache = ResultCache(config.cache_max_bytes)
        self.tracing = tracing if tracing is not None else Tracing.from_env()
        log_settings = PredictionLogSettings(
            config.prediction_log_path, config.prediction_log_max_bytes, config.prediction_log_backups
        )
        self.monitoring = Monitoring(
            PredictionLog.from_settings(log_settings), OutcomeTracker(config.outcome_window, max_pending=100_000)
        )
        self.audit = (
            AuditLog(config.audit_log_path, config.audit_log_max_bytes, config.audit_log_backups)
            if config.audit_log_path is not None
            else None
        )
        self.guard = Guard.from_config(config, self.audit)  # None: no auth, nothing wrapped
        self.reloaders: list[Callable[[], Awaitable[object]]] = []
        """Called, in order, on SIGHUP (:meth:`reload`): the auth rules, the TLS certificates."""
        if self.guard is not None:
            self.reloaders.append(self.guard.reload)
        self.repository = ModelRepository(
            config,
            on_close=self.cache.drop_version,
            tracing=self.tracing,
            monitoring=self.monitoring,
            visible=self.guard.visible if self.guard is not None else None,
        )
        self.loopwatch = LoopWatch(config.loop_lag_warn_s)
        # models' shadow versions (their `shadow`), shed while the loop is busy
        self.shadows = ShadowRunner(
            self.repository, self.tracing, lambda: self.loopwatch.busy, config.shadow_max_loop_busy
        )
        self.tls: CertificateReloader | None = None  # loaded here: a bad certificate stops the server before it binds
        if config.tls_cert is not None and config.tls_key is not None:
            files = TlsFiles(config.tls_cert, config.tls_key, config.tls_client_ca)
            self.tls = CertificateReloader(files, config.tls_reload_check_s)
            self.reloaders.append(self._reload_tls)
            if self.audit is not None:
                self.tls.listeners.append(self._audit_tls_reload)
        self.grpc_port = 0
        self.http_port: int | None = None
        self._health = health.aio.HealthServicer()
        self._draining = False
        self._http: Http1Server | None = None
        self._grpc: grpc.aio.Server | None = None  # made in start(): it binds to the running event loop
        self._transport: Transport | None = None
        self._grpc_socket: socket.socket | None = None  # holds the grpcio port until grpc.aio listens on it
        self._grpc_servicer: tuple[Any, Any] | None = None  # the inference and outcome services, for grpcio
        self._models_with_health: set[str] = set()
        self._poller: asyncio.Task[None] | None = None
        self.services = Services()  # every gRPC method, whichever transport carries gRPC: REST calls through it

    def is_ready(self) -> bool:
        if self._draining or not self.repository.loaded:
            return False
        return not self.config.strict_readiness or all(m.ready for m in self.repository.models())

    async def start(self) -> None:
        """Bind the ports, load every model, then accept gRPC connections and report SERVING. Raises if a port cannot
        be bound (before loading anything)."""
        self.monitoring.loop = asyncio.get_running_loop()
        self.loopwatch.start()  # first, so stalls while models load are seen too
        servicer = InferenceServicer(
            self.repository, self.cache, self.is_ready, self.update_health, self.tracing, self.shadows
        )
        self.metrics = FerryCollector(self.repository, self.cache, lambda: servicer.in_flight)
        self.metrics.extras.append(self._monitoring_metrics)
        self.metrics.extras.append(self.shadows.metric_families)
        self.metrics.extras.append(self.loopwatch.metric_families)
        self.metrics.extras.append(lambda: security_metric_families(self.guard, self.audit))
        self._registry = registry_for(self.metrics)
        if self.tls is not None:
            self.tls.start()
        elif not _loopback(self.config.host):
            log.warning("listening on %s without TLS: calls and models travel in plaintext", self.config.host)
        outcomes = OutcomeServicer(self.monitoring.outcomes, self.tracing)
        public: Any = servicer
        public_outcomes: Any = outcomes
        if self.worker is not None:  # the methods every worker answers together go through the supervisor
            local = Services()
            pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, local)
            self.worker.attach(local, lambda: exposition(self._registry), self.monitoring.outcomes)
            self.worker.start()
            public = FleetServicer(servicer, self.worker, self.guard.visible if self.guard is not None else None)
            public_outcomes = FleetOutcomes(outcomes, self.monitoring.outcomes, self.worker)
        self._register(public, public_outcomes, self.services)
        self._bind_grpc(public, public_outcomes)
        await self.update_health()  # NOT_SERVING while models load
        if self.guard is not None:
            self.guard.start()  # watches the auth file
        if self.config.http_port is not None and self.worker is None:
            await self._start_http(self.config.http_port)  # health and /metrics answer while models load
        await self.repository.load_startup()
        if self.worker is not None:
            await self.worker.join()  # the changes made through the other workers, before taking calls
            if self.config.http_port is not None:  # the other workers answer meanwhile: REST waits as gRPC does
                await self._start_http(self.config.http_port)
        await self.update_health()
        await self._listen_grpc()
        if self.config.model_control_mode == "poll":
            self._poller = asyncio.get_running_loop().create_task(self._poll(), name="repository poll")

    async def _poll(self) -> None:
        """The poll mode: apply the repository's changes every ``repository_poll_secs``."""
        while True:
            await asyncio.sleep(self.config.repository_poll_secs)
            try:
                await self.repository.poll()
                await self.update_health()
            except Exception:  # a poll that failed is logged; the next one tries again
                log.exception("repository poll failed")

    def _bind_grpc(self, servicer: Any, outcomes: Any) -> None:
        """Take the gRPC port, not yet accepting (see the module docstring: start before serve)."""
        address = f"{self.config.host}:{self.config.grpc_port}"
        try:
            if self.config.transport == "ferry":
                self._transport = self._ferry_transport()
                reuse = self.worker is not None  # the workers share the port
                self.grpc_port = self._transport.bind(self.config.host, self.config.grpc_port, reuse_port=reuse)
            else:
                # grpc-core may listen from add_insecure_port on: the port is held here (SO_REUSEPORT, as grpc-core
                # binds it) and handed to grpc.aio once the models are loaded
                self._grpc_servicer = (servicer, outcomes)
                self._grpc_socket = bound_socket(self.config.host, self.config.grpc_port, reuse_port=True)
                self.grpc_port = int(self._grpc_socket.getsockname()[1])
        except OSError as err:
            raise Unavailable(f"cannot bind gRPC to {address}: {err}") from None

    async def _listen_grpc(self) -> None:
        if self._transport is not None:
            tls = self.tls.listener_context(GRPC_ALPN) if self.tls is not None else None
            await self._transport.listen(tls)
        elif self._grpc_servicer is not None:
            try:
                await self._start_grpcio(*self._grpc_servicer)
            finally:
                if self._grpc_socket is not None:
                    self._grpc_socket.close()
                    self._grpc_socket = None

    def _register(self, servicer: Any, outcomes: Any, server: Any) -> None:
        """Every gRPC service Ferry serves, on either transport (both take generated code's registrations). With
        auth on, every method is registered guarded (:meth:`Guard.registrar`); without it, as it is."""
        if self.guard is not None:
            server = self.guard.registrar(server)
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        ferry_pb2_grpc.add_OutcomeServiceServicer_to_server(outcomes, server)
        services = (SERVICE_NAME, OUTCOME_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME)
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
            reflection.aio.ReflectionServicer(services, pool=reflection_pool()), server
        )

    def _ferry_transport(self) -> Transport:
        config = self.config
        limits = Limits(
            max_message_bytes=config.max_message_bytes,
            max_concurrent_streams=config.max_pending_calls,
            max_connection_age_s=config.max_connection_age_s,
            max_connection_age_grace_s=config.max_connection_age_grace_s,
            keepalive_min_time_s=config.keepalive_min_time_s,
            idle_timeout_s=config.idle_timeout_s,
        )
        return Transport(self.services, limits)

    def _grpcio_options(self) -> list[tuple[str, int]]:
        config = self.config
        limit, pending = config.max_message_bytes, config.max_pending_calls
        options = [
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            # soft == hard: no random early drops below the bound (see ServerConfig.max_pending_calls)
            ("grpc.server.max_pending_requests", pending),
            ("grpc.server.max_pending_requests_hard_limit", pending),
            # keepalive enforcement as on Ferry's transport (transport/limits.py): pings with or without calls
            ("grpc.http2.min_ping_interval_without_data_ms", round(config.keepalive_min_time_s * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_ping_strikes", 2),
            # a TLS handshake (or a plaintext connection's HTTP/2 setup) not done by then is closed
            ("grpc.server_handshake_timeout_ms", round(Limits().tls_handshake_timeout_s * 1000)),
        ]
        if config.max_connection_age_s:  # gRFC A9; grpc-core adds the ±10% jitter itself
            options.append(("grpc.max_connection_age_ms", round(config.max_connection_age_s * 1000)))
            options.append(("grpc.max_connection_age_grace_ms", round(config.max_connection_age_grace_s * 1000)))
        if config.idle_timeout_s:
            options.append(("grpc.max_connection_idle_ms", round(config.idle_timeout_s * 1000)))
        return options

    async def _start_grpcio(self, servicer: Any, outcomes: Any) -> None:
        self._admission = grpcaio.Admission()
        self._grpc = server = grpc.aio.server(options=self._grpcio_options(), interceptors=[self._admission])
        self._register(servicer, outcomes, server)
        address = f"{self.config.host}:{self.grpc_port}"
        try:
            if self.tls is not None:
                self.grpc_port = server.add_secure_port(address, self.tls.grpc_credentials())
            else:
                self.grpc_port = server.add_insecure_port(address)
        except RuntimeError as err:
            raise Unavailable(f"cannot bind gRPC to {address}: {err}") from None
        if self.grpc_port == 0:
            raise Unavailable(f"cannot bind gRPC to {address}")
        await server.start()

    async def _start_http(self, port: int) -> None:
        limits = self.http_limits()
        app = create_http_app(self._scrape, self.services.lookup, limits)
        server = Http1Server(app, limits)
        try:
            await server.start(
                self.config.host,
                port,
                ssl=self.tls.listener_context(HTTP_ALPN) if self.tls is not None else None,
                reuse_port=self.worker is not None,  # the workers share the port
            )
        except OSError as err:
            raise Unavailable(f"cannot bind HTTP to {self.config.host}:{port}: {err}") from None
        self._http = server
        self.http_port = server.port

    def _scrape(self) -> bytes | Awaitable[bytes]:
        """``GET /metrics``: this server's metrics; with several workers, every worker's merged."""
        if self.worker is None:
            return exposition(self._registry)
        return self._scrape_workers()

    async def _scrape_workers(self) -> bytes:
        assert self.worker is not None
        texts, supervisor = await self.worker.metrics()
        return merge_metrics(texts, text_string_to_metric_families(supervisor.decode()))

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

    async def drain(self) -> None:
        """Not ready from now on (HTTP ready 503, gRPC health NOT_SERVING, ServerReady false); still serving."""
        self._draining = True
        await self.update_health()

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop taking calls, give in-flight ones ``grace_s`` to finish, then release the models."""
        self._draining = True
        with contextlib.suppress(Exception):
            await self.update_health()
        grace = self.config.shutdown_grace_s if grace_s is None else grace_s
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
        if self._grpc is not None:
            await grpcaio.stop(self._grpc, self._admission, self.grpc_port, grace)
        if self._transport is not None:
            await self._transport.stop(grace)
        if self._grpc_socket is not None:
            self._grpc_socket.close()
            self._grpc_socket = None
        if self._http is not None:
            await self._http.stop(grace)  # calls in flight get the drain time, as gRPC's do
        await self.shadows.close()
        await self.repository.close()
        if self.guard is not None:
            await self.guard.stop()
        if self.audit is not None:
            await asyncio.to_thread(self.audit.close)
        self.tracing.shutdown()
        if self.tls is not None:
            await self.tls.stop()
        if self.worker is not None:
            await self.worker.stop()
        if self.monitoring.predlog is not None:
            await asyncio.to_thread(self.monitoring.predlog.close)
        self.loopwatch.stop()

    async def reload(self) -> None:
        """SIGHUP: run every reloader; one that fails is logged and the others still run."""
        for reloader in list(self.reloaders):
            try:
                await reloader()
            except Exception:
                log.exception("reload failed: %r", reloader)

    async def _reload_tls(self) -> None:
        """The TLS certificate and key (and client CA), for new connections."""
        if self.tls is not None:
            self.tls.reload("SIGHUP")

    def _audit_tls_reload(self, ok: bool, detail: str) -> None:
        if self.audit is not None:
            self.audit.system("authz_admin", "cert_reload", "OK" if ok else "INVALID_ARGUMENT", detail)

    def _monitoring_metrics(self) -> Iterator[Metric]:
        monitors = [mv.monitor for m in self.repository.models() for mv in m.versions.values() if mv.monitor]
        return metric_families(monitors, self.monitoring)

    def ready_line(self) -> str:
        models = self.repository.models()
        ready = sum(m.ready for m in models)
        http = f"{self.config.host}:{self.http_port}" if self.http_port is not None else "off"
        return f"ferry ready: grpc={self.config.host}:{self.grpc_port} http={http} models={ready}/{len(models)} ready"


async def serve(config: ServerConfig) -> None:
    """Run a server until SIGINT or SIGTERM, then drain (see the module docstring). Prints one line when ready.
    Started by a supervisor as one of several workers (:mod:`ferry.server.workers`), it tells the supervisor
    instead, writes its own prediction and audit logs, and stops as on SIGTERM if the supervisor goes away."""
    worker = WorkerLink.from_env(frame_bound(config.max_message_bytes))
    if worker is not None:
        config = _worker_config(config, worker.index)
    server = FerryServer(config, worker=worker)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    if worker is not None:
        orphaned = loop.create_task(worker.channel.closed.wait())
        orphaned.add_done_callback(lambda _: stop.set())

    def on_signal(sig: signal.Signals) -> None:
        if stop.is_set():  # the second signal: no more waiting
            log.warning("%s again: exiting at once", sig.name)
            logging.shutdown()
            os._exit(128 + sig.value)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    reloads: set[asyncio.Task[None]] = set()

    def reload() -> None:
        task = loop.create_task(server.reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, reload)
    try:
        await server.start()
        if not stop.is_set():  # a signal while loading: never ready, so no one to tell by draining
            if worker is not None:
                await worker.ready(server.ready_line())
            else:
                print(server.ready_line(), flush=True)
            await stop.wait()
            await server.drain()
            log.info(
                "stopping: not ready; serving %.1fs more, then in-flight calls get up to %.1fs",
                config.drain_delay_s,
                config.shutdown_grace_s,
            )
            await asyncio.sleep(config.drain_delay_s)
    finally:
        await server.stop()


def _worker_config(config: ServerConfig, index: int) -> ServerConfig:
    """A worker's configuration: its own prediction and audit log files (``predictions.jsonl`` →
    ``predictions.w1.jsonl``), as one file rotated by several processes would lose lines."""

    def own(path: Path | None) -> Path | None:
        return None if path is None else path.with_name(f"{path.stem}.w{index}{path.suffix}")

    return dataclasses.replace(
        config,
        prediction_log_path=own(config.prediction_log_path),
        audit_log_path=own(config.audit_log_path),
    )


def _loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name) is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


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

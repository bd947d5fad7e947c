"""The server's configuration: one frozen, validated object built from the command line or by tests."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ferry.client.errors import InvalidArgument

GRAPH_OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")
EXECUTION_PROVIDERS = ("cpu", "cuda")
TRANSPORTS = ("ferry", "grpcio")
MODEL_CONTROL_MODES = ("none", "explicit", "poll")


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Everything a Ferry server needs to start. Units are in the names."""

    model_repository: Path
    """Directory in Triton's layout: ``<repo>/<model>/config.pbtxt`` and ``<repo>/<model>/<version>/model.onnx``."""

    host: str = "127.0.0.1"
    """Address both listeners bind to (``0.0.0.0`` for all interfaces)."""

    grpc_port: int = 8001
    """gRPC port; 0 picks a free port (the ready line prints it)."""

    http_port: int | None = 8000
    """HTTP port: the REST API (the Open Inference Protocol over HTTP) and ``/metrics``; 0 picks a free port, None
    turns HTTP off."""

    http_keepalive_timeout_s: float = 30.0
    """An HTTP connection that sends no complete request header within this long, from its opening or its last
    answer, is closed: idle keep-alive connections and slowloris clients alike."""

    http_body_timeout_s: float = 30.0
    """An HTTP request body must arrive within this long of its headers, or it is answered 408."""

    http_max_connections: int = 1000
    """HTTP connections open at once; one past it is answered 503 and closed."""

    max_message_bytes: int = 64 * 1024 * 1024
    """Largest gRPC message received or sent. Larger requests fail with RESOURCE_EXHAUSTED."""

    max_pending_calls: int = 4096
    """Calls gRPC has accepted that Ferry's event loop has not picked up yet: a burst faster than the loop reads
    waits there, out of reach of Ferry's queues. Left at grpc-core's defaults (1,000 soft, 3,000 hard), calls past
    1,000 were dropped at random with a bare CANCELLED, which clients do not retry: 3-4% of a burst of 1,500 calls
    and a third of 4,000 on this machine. Here soft and hard limit are both this value, so Ferry's own admission
    (a full queue: UNAVAILABLE, retryable) decides below it; past it gRPC still cancels, which bounds memory.
    On Ferry's own transport, which picks every call up as it arrives, it is the streams one connection may have
    open at once (SETTINGS_MAX_CONCURRENT_STREAMS): gRPC clients queue calls past it, and a stream opened anyway is
    refused (REFUSED_STREAM, which gRPC clients retry)."""

    transport: str = "ferry"
    """What carries gRPC: "ferry", Ferry's own HTTP/2 transport (:mod:`ferry.server.transport`: 2-3x the calls per
    second of grpcio's on the same cores), or "grpcio", grpc.aio's server."""

    intra_op_threads: int = 0
    """onnxruntime threads inside one operator (0 = onnxruntime's default: one per physical core)."""

    inter_op_threads: int = 0
    """onnxruntime threads across independent operators (0 = onnxruntime's default)."""

    graph_optimization_level: str = "all"
    """onnxruntime graph optimizations: disable, basic, extended or all."""

    execution_provider: str = "cpu"
    """cpu, or cuda: CUDA is used when onnxruntime has it, with the CPU as fallback."""

    cache_max_bytes: int = 256 * 1024 * 1024
    """Bound of the server-wide result cache (inputs + outputs of the entries), used by models whose config.pbtxt
    has ``response_cache { enable: true }``; 0 turns the cache off for every model."""

    max_queue_size: int = 1024
    """Requests that may wait per model version and priority level when config.pbtxt leaves ``max_queue_size`` at
    0; past it, requests are rejected at once with UNAVAILABLE."""

    inline_run_us: int = 100
    """Batches whose recent average run time is below this many µs run on the event loop instead of a worker
    thread, whose hand-off costs more than they do (0 = always use the worker threads)."""

    ort_spinning: bool = False
    """Let idle onnxruntime pool threads spin-wait for work (its default). Off by default: on a small machine the
    spinning threads take the cores that the event loop and gRPC need between runs."""

    prediction_log_path: Path | None = None
    """JSON Lines file for sampled predictions (models choose their rate with ``prediction_log_rate``); None = off."""

    prediction_log_max_bytes: int = 64 * 1024 * 1024
    """Rotate the prediction log before it passes this size (0 = never)."""

    prediction_log_backups: int = 5
    """Rotated prediction logs kept."""

    outcome_window: int = 1000
    """Outcomes per model version in the rolling window of live accuracy / error."""

    strict_readiness: bool = False
    """If true, ServerReady is false while any model failed to load (as Triton's default); if false, the
    server is ready once loading finished, and broken models report themselves through ModelReady."""

    shutdown_grace_s: float = 5.0
    """On SIGINT/SIGTERM, after the drain delay: in-flight and queued calls get this long to finish before they
    are cancelled."""

    drain_delay_s: float = 5.0
    """On SIGINT/SIGTERM, readiness turns false at once, and the listeners go on accepting and serving for this
    long (so load balancers and Kubernetes' endpoints controller see the replica leave) before they close."""

    max_connection_age_s: float = 0.0
    """A gRPC connection older than this (±10% jitter, gRFC A9) is asked to go away (GOAWAY), so long-lived clients
    reconnect and spread over replicas; its calls finish first. 0 = no limit (gRPC's default)."""

    max_connection_age_grace_s: float = 30.0
    """Calls still running on an aged connection this long after its GOAWAY are cancelled and it is closed."""

    keepalive_min_time_s: float = 300.0
    """Least interval between a client's keepalive PINGs while the server sent it nothing (gRPC's default, 5
    minutes); a client that pings more often gets GOAWAY ENHANCE_YOUR_CALM "too_many_pings" at its third strike."""

    idle_timeout_s: float = 0.0
    """A gRPC connection with no call for this long is closed (GOAWAY, then close). 0 = never (gRPC's default)."""

    use_uvloop: bool = True
    """Run the event loop on uvloop when it is installed (about 20% more requests/s measured here)."""

    loop_lag_warn_s: float = 0.25
    """Log a WARNING (at most one per few seconds) when the event loop runs a timer this late: a stall every
    connection felt. The lag itself is always exported as ``ferry_event_loop_lag_seconds``."""

    shadow_max_loop_busy: float = 0.6
    """Past this share of its last sampled interval busy (running or waiting for a CPU), the event loop counts as
    saturated and models' shadow runs are dropped (all but one per model per second), so they never delay the
    calls the server answers. 1.0: never dropped for that."""

    tls_cert: Path | None = None
    """PEM certificate chain (the server's certificate first, then any intermediates): with ``tls_key``, both ports
    speak TLS only. None: plaintext."""

    tls_key: Path | None = None
    """PEM private key of ``tls_cert``."""

    tls_client_ca: Path | None = None
    """PEM CA certificate(s): both ports then require a client certificate that chains to one of them (mTLS)."""

    tls_reload_check_s: float = 5.0
    """How often the TLS files are checked for a change (inode, size, mtime); a change, like SIGHUP, reloads them
    for new connections."""

    auth_config_path: Path | None = None
    """The auth file (YAML or JSON: identities, scopes, model allow-lists, rates; see server/security/auth.py);
    None = no authentication (unless the restricted-protocol flags ask for some)."""

    auth_poll_s: float = 2.0
    """How often the auth file is looked at for changes (it is also reloaded on SIGHUP)."""

    grpc_restricted_protocol: tuple[str, ...] = ()
    """Triton's ``--grpc-restricted-protocol`` values, ``<group>[,<group>...]:<key>=<value>``: those API groups need
    the header ``triton-grpc-protocol-<key>: <value>``."""

    http_restricted_api: tuple[str, ...] = ()
    """Triton's ``--http-restricted-api`` values: as above with the header ``<key>: <value>``."""

    audit_log_path: Path | None = None
    """JSON Lines file of security events (refusals, state changes, sampled inference calls); None = off."""

    audit_log_max_bytes: int = 64 * 1024 * 1024
    """Rotate the audit log before it passes this size (0 = never)."""

    audit_log_backups: int = 5
    """Rotated audit logs kept."""

    audit_sample_rate: float = 0.0
    """Fraction of allowed inference calls written to the audit log, in [0, 1]."""

    model_control_mode: str = "none"
    """Triton's model control modes. "none": load every model at start; load and unload requests are refused
    (UNAVAILABLE). "explicit": load the ``load_models`` at start; load and unload requests change what serves.
    "poll": load every model at start, then apply what changes in the repository every ``repository_poll_secs``
    (load and unload requests are refused)."""

    load_models: tuple[str, ...] = ()
    """Models the explicit mode loads at start (``("*",)``: all of them; empty: none)."""

    repository_poll_secs: float = 15.0
    """Seconds between two polls of the repository in the poll mode (Triton's default: 15). A model directory is
    applied once two polls in a row find its files unchanged (a file still being written waits)."""

    model_load_threads: int = 4
    """Threads that build and warm model versions: loads of different models run side by side, at most this many
    (Triton's default: 4); loads of one model wait for each other."""

    workers: int = 1
    """Server processes on the same ports (``SO_REUSEPORT``) under one supervisor (:mod:`ferry.server.workers`);
    1: this process is the server."""

    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.extra:
            raise InvalidArgument(f"unknown configuration keys: {sorted(self.extra)}")
        if not (0 <= self.grpc_port <= 65535):
            raise InvalidArgument(f"grpc_port must be in 0..65535, got {self.grpc_port}")
        if self.http_port is not None and not (0 <= self.http_port <= 65535):
            raise InvalidArgument(f"http_port must be in 0..65535 or None, got {self.http_port}")
        for name in ("http_keepalive_timeout_s", "http_body_timeout_s"):
            if not 0 < getattr(self, name) <= 86400:  # NaN fails too
                raise InvalidArgument(f"{name} must be in (0, 86400], got {getattr(self, name)}")
        if not (1 <= self.http_max_connections <= 1_000_000):
            raise InvalidArgument(f"http_max_connections must be in 1..1000000, got {self.http_max_connections}")
        if not (1024 <= self.max_message_bytes <= 2**31 - 1):
            raise InvalidArgument(f"max_message_bytes must be in 1024..2147483647, got {self.max_message_bytes}")
        if self.transport not in TRANSPORTS:
            raise InvalidArgument(f"transport must be one of {', '.join(TRANSPORTS)}, got {self.transport!r}")
        if not (1 <= self.max_pending_calls <= 1_000_000):
            raise InvalidArgument(f"max_pending_calls must be in 1..1000000, got {self.max_pending_calls}")
        for name in ("intra_op_threads", "inter_op_threads"):
            if not (0 <= getattr(self, name) <= 1024):
                raise InvalidArgument(f"{name} must be in 0..1024, got {getattr(self, name)}")
        if self.graph_optimization_level not in GRAPH_OPTIMIZATION_LEVELS:
            raise InvalidArgument(
                f"graph_optimization_level must be one of {GRAPH_OPTIMIZATION_LEVELS}, "
                f"got {self.graph_optimization_level!r}"
            )
        if self.execution_provider not in EXECUTION_PROVIDERS:
            raise InvalidArgument(
                f"execution_provider must be one of {EXECUTION_PROVIDERS}, got {self.execution_provider!r}"
            )
        if not (0 <= self.inline_run_us <= 1_000_000):
            raise InvalidArgument(f"inline_run_us must be in 0..1000000, got {self.inline_run_us}")
        if not (1 <= self.outcome_window <= 10_000_000):
            raise InvalidArgument(f"outcome_window must be in 1..10000000, got {self.outcome_window}")
        if self.cache_max_bytes < 0:
            raise InvalidArgument(f"cache_max_bytes must be >= 0, got {self.cache_max_bytes}")
        if not (1 <= self.max_queue_size <= 1_000_000):
            raise InvalidArgument(f"max_queue_size must be in 1..1000000, got {self.max_queue_size}")
        for name in (
            "shutdown_grace_s",
            "drain_delay_s",
            "max_connection_age_s",
            "max_connection_age_grace_s",
            "keepalive_min_time_s",
            "idle_timeout_s",
        ):
            if not 0 <= getattr(self, name) <= 1e9:  # NaN fails too
                raise InvalidArgument(f"{name} must be in 0..1e9 seconds, got {getattr(self, name)}")
        if not self.loop_lag_warn_s > 0:  # NaN fails too
            raise InvalidArgument(f"loop_lag_warn_s must be > 0, got {self.loop_lag_warn_s}")
        if not 0 <= self.shadow_max_loop_busy <= 1:  # NaN fails too
            raise InvalidArgument(f"shadow_max_loop_busy must be in 0..1, got {self.shadow_max_loop_busy}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise InvalidArgument("TLS needs both tls_cert and tls_key (--tls-cert, --tls-key)")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise InvalidArgument("tls_client_ca (--tls-client-ca) needs tls_cert and tls_key")
        if not 0.1 <= self.tls_reload_check_s <= 86_400:  # NaN fails too
            raise InvalidArgument(f"tls_reload_check_s must be in 0.1..86400, got {self.tls_reload_check_s}")
        if not 0.0 <= self.audit_sample_rate <= 1.0:  # NaN fails too
            raise InvalidArgument(f"audit_sample_rate must be in [0, 1], got {self.audit_sample_rate}")
        if not self.auth_poll_s > 0:
            raise InvalidArgument(f"auth_poll_s must be > 0, got {self.auth_poll_s}")
        if self.audit_log_max_bytes < 0:
            raise InvalidArgument(f"audit_log_max_bytes must be >= 0, got {self.audit_log_max_bytes}")
        if not 0 <= self.audit_log_backups <= 1000:
            raise InvalidArgument(f"audit_log_backups must be in 0..1000, got {self.audit_log_backups}")
        if self.model_control_mode not in MODEL_CONTROL_MODES:
            raise InvalidArgument(
                f"model_control_mode must be one of {', '.join(MODEL_CONTROL_MODES)}, got {self.model_control_mode!r}"
            )
        if self.load_models and self.model_control_mode != "explicit":
            raise InvalidArgument(
                f"load_models {list(self.load_models)} needs model_control_mode explicit "
                f"(the {self.model_control_mode} mode loads every model)"
            )
        if "*" in self.load_models and len(self.load_models) > 1:
            raise InvalidArgument("load_models: '*' (all models) must be the only one named")
        if not 0.1 <= self.repository_poll_secs <= 86400:  # NaN fails too
            raise InvalidArgument(f"repository_poll_secs must be in 0.1..86400, got {self.repository_poll_secs}")
        if not 1 <= self.workers <= 256:
            raise InvalidArgument(f"workers must be in 1..256, got {self.workers}")
        if not 1 <= self.model_load_threads <= 64:
            raise InvalidArgument(f"model_load_threads must be in 1..64, got {self.model_load_threads}")
        if not self.model_repository.is_dir():
            raise InvalidArgument(f"model repository {str(self.model_repository)!r} is not a directory")

    @classmethod
    def build(cls, **values: Any) -> ServerConfig:
        """Build from keyword values, rejecting unknown keys (a misspelt option must not be ignored)."""
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        unknown = {k: v for k, v in values.items() if k not in known}
        given = {k: v for k, v in values.items() if k in known}
        for name in ("model_repository", "tls_cert", "tls_key", "tls_client_ca"):
            if given.get(name) is not None:
                given[name] = Path(os.fspath(given[name]))
        for key in ("grpc_restricted_protocol", "http_restricted_api"):
            if given.get(key) is not None:
                given[key] = tuple(given[key])
            else:
                given.pop(key, None)
        return cls(**given, extra=unknown)

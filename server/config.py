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
    """On SIGINT/SIGTERM, in-flight calls get this long to finish before they are cancelled."""

    use_uvloop: bool = True
    """Run the event loop on uvloop when it is installed (about 20% more requests/s measured here)."""

    loop_lag_warn_s: float = 0.25
    """Log a WARNING (at most one per few seconds) when the event loop runs a timer this late: a stall every
    connection felt. The lag itself is always exported as ``ferry_event_loop_lag_seconds``."""

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
        if self.shutdown_grace_s < 0:
            raise InvalidArgument(f"shutdown_grace_s must be >= 0, got {self.shutdown_grace_s}")
        if not self.loop_lag_warn_s > 0:  # NaN fails too
            raise InvalidArgument(f"loop_lag_warn_s must be > 0, got {self.loop_lag_warn_s}")
        if not self.model_repository.is_dir():
            raise InvalidArgument(f"model repository {str(self.model_repository)!r} is not a directory")

    @classmethod
    def build(cls, **values: Any) -> ServerConfig:
        """Build from keyword values, rejecting unknown keys (a misspelt option must not be ignored)."""
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        unknown = {k: v for k, v in values.items() if k not in known}
        given = {k: v for k, v in values.items() if k in known}
        if "model_repository" in given:
            given["model_repository"] = Path(os.fspath(given["model_repository"]))
        return cls(**given, extra=unknown)

"""``ferry``: the command line. ``ferry serve --model-repository DIR`` runs a server in the foreground."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from ferry.client.errors import FerryError
from ferry.server import __version__
from ferry.server.app import run, serve
from ferry.server.config import (
    EXECUTION_PROVIDERS,
    GRAPH_OPTIMIZATION_LEVELS,
    MODEL_CONTROL_MODES,
    TRANSPORTS,
    ServerConfig,
)
from ferry.server.security.auth import hash_token
from ferry.server.workers.worker import ENV as WORKER_ENV


class _ShowDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` gives every option's default: a flag or an unset file reads "off"; required options none."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.required or action.default is argparse.SUPPRESS or not action.option_strings:
            return action.help
        if action.default is None or action.default is False:
            return f"{action.help or ''} (default: off)".lstrip()
        return super()._get_help_string(action)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ferry", description="Ferry: a gRPC model server for ONNX models")
    parser.add_argument("--version", action="version", version=f"ferry {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    s = commands.add_parser(
        "serve", help="serve a model repository until SIGINT/SIGTERM", formatter_class=_ShowDefaults
    )
    s.add_argument("--model-repository", required=True, help="model repository directory (Triton layout)")
    s.add_argument("--host", default="127.0.0.1", help="address both listeners bind (0.0.0.0: all interfaces)")
    s.add_argument("--grpc-port", type=int, default=8001, help="gRPC port; 0 = any free port (in the ready line)")
    s.add_argument("--http-port", type=int, default=8000, help="HTTP port (REST, /metrics); 0 = any free, -1 = off")
    s.add_argument(
        "--http-keepalive-timeout-s",
        type=float,
        default=30.0,
        help="close an HTTP connection that sends no complete request header for this long (idle or slowloris)",
    )
    s.add_argument(
        "--http-body-timeout-s", type=float, default=30.0, help="an HTTP request body must arrive within this long"
    )
    s.add_argument("--http-max-connections", type=int, default=1000, help="HTTP connections open at once")
    s.add_argument("--max-message-bytes", type=int, default=64 * 1024 * 1024, help="largest gRPC message, in bytes")
    s.add_argument(
        "--max-pending-calls",
        type=int,
        default=4096,
        help="on Ferry's transport: streams one connection may have open at once (clients queue calls past it); "
        "with --transport grpcio: calls gRPC accepted that Ferry has not picked up yet (past it gRPC cancels them)",
    )
    s.add_argument("--transport", choices=TRANSPORTS, default="ferry", help="Ferry's own HTTP/2 transport, or grpc.aio")
    s.add_argument("--intra-op-threads", type=int, default=0, help="onnxruntime intra-op threads (0 = its choice)")
    s.add_argument("--inter-op-threads", type=int, default=0, help="onnxruntime inter-op threads (0 = its choice)")
    s.add_argument(
        "--graph-optimization-level",
        choices=GRAPH_OPTIMIZATION_LEVELS,
        default="all",
        help="onnxruntime graph optimizations",
    )
    s.add_argument("--execution-provider", choices=EXECUTION_PROVIDERS, default="cpu", help="cuda falls back to cpu")
    s.add_argument(
        "--max-queue-size", type=int, default=1024, help="queued requests per model version and priority level"
    )
    s.add_argument("--cache-max-bytes", type=int, default=256 * 1024 * 1024, help="result cache bound (0 = off)")
    s.add_argument(
        "--inline-run-us",
        type=int,
        default=100,
        help="run batches estimated faster than this (µs) on the loop; 0 = never",
    )
    s.add_argument("--ort-spinning", action="store_true", help="let idle onnxruntime threads spin-wait")
    s.add_argument("--prediction-log", type=Path, help="JSON Lines file for sampled predictions")
    s.add_argument("--prediction-log-max-bytes", type=int, default=64 << 20, help="rotate the log past this size")
    s.add_argument("--prediction-log-backups", type=int, default=5, help="rotated logs kept")
    s.add_argument("--outcome-window", type=int, default=1000, help="outcomes in the live accuracy window")
    s.add_argument("--strict-readiness", action="store_true", help="not ready while any model failed to load")
    s.add_argument(
        "--drain-delay-s",
        type=float,
        default=5.0,
        help="on SIGINT/SIGTERM: not ready at once, but keep accepting and serving this long, in seconds",
    )
    s.add_argument(
        "--shutdown-grace-s",
        type=float,
        default=5.0,
        help="after the drain delay: time in-flight and queued calls get to finish, in seconds",
    )
    s.add_argument(
        "--max-connection-age-s",
        type=float,
        default=0.0,
        help="GOAWAY to gRPC connections older than this (±10%%), so clients spread over replicas; 0 = never",
    )
    s.add_argument(
        "--max-connection-age-grace-s",
        type=float,
        default=30.0,
        help="calls on an aged connection still running this long after its GOAWAY are cancelled",
    )
    s.add_argument(
        "--keepalive-min-time-s",
        type=float,
        default=300.0,
        help="least interval of a client's PINGs while nothing is sent to it; more often: GOAWAY too_many_pings",
    )
    s.add_argument(
        "--idle-timeout-s", type=float, default=0.0, help="close gRPC connections with no call this long; 0 = never"
    )
    s.add_argument("--no-uvloop", action="store_true", help="use asyncio's default event loop")
    s.add_argument(
        "--loop-lag-warn-ms", type=float, default=250.0, help="warn when the event loop stalls this long, in ms"
    )
    s.add_argument(
        "--shadow-max-loop-busy",
        type=float,
        default=0.6,
        help="drop shadow runs while the event loop is busier than this share (0..1) of its last 0.1 s",
    )
    s.add_argument("--tls-cert", type=Path, help="PEM certificate chain: TLS on the gRPC and HTTP ports")
    s.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    s.add_argument("--tls-client-ca", type=Path, help="PEM CA: require client certificates it issued (mTLS)")
    s.add_argument(
        "--tls-reload-check-s", type=float, default=5.0, help="check the TLS files for changes this often (s)"
    )
    s.add_argument("--auth-config", type=Path, help="auth file (YAML/JSON): identities, scopes, models, rates")
    s.add_argument(
        "--grpc-restricted-protocol",
        action="append",
        metavar="GROUPS:KEY=VALUE",
        help="Triton's syntax: these API groups need the header triton-grpc-protocol-KEY: VALUE (repeatable)",
    )
    s.add_argument(
        "--http-restricted-api",
        action="append",
        metavar="GROUPS:KEY=VALUE",
        help="Triton's syntax: these API groups need the header KEY: VALUE (repeatable)",
    )
    s.add_argument("--audit-log", type=Path, help="JSON Lines file of security events")
    s.add_argument("--audit-log-max-bytes", type=int, default=64 << 20, help="rotate the audit log past this size")
    s.add_argument("--audit-log-backups", type=int, default=5, help="rotated audit logs kept")
    s.add_argument("--audit-sample-rate", type=float, default=0.0, help="fraction of allowed inference calls audited")
    s.add_argument(
        "--model-control-mode",
        choices=MODEL_CONTROL_MODES,
        default="none",
        help="none: load all at start, refuse load/unload; explicit: --load-model at start, load/unload allowed; "
        "poll: load all, then apply repository changes",
    )
    s.add_argument(
        "--load-model",
        action="append",
        default=None,
        metavar="NAME",
        help="explicit mode: a model to load at start (repeatable; '*' = all)",
    )
    s.add_argument(
        "--repository-poll-secs", type=float, default=15.0, help="poll mode: seconds between repository polls"
    )
    s.add_argument("--model-load-threads", type=int, default=4, help="threads loading models side by side")
    s.add_argument(
        "--workers",
        type=int,
        default=1,
        help="server processes sharing the ports (SO_REUSEPORT) under one supervisor; 1: this process serves",
    )
    s.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="log level")
    from ferry.loadtest.cli import add_arguments  # argparse only: the load generator is imported by its handler

    add_arguments(commands.add_parser("loadtest", help="load-test a server, find its capacity, plan replicas"))
    from ferry.client.codegen import add_arguments as add_client_arguments  # argparse only, as for loadtest

    add_client_arguments(commands.add_parser("client", help="client tools: generate typed per-model clients"))
    auth = commands.add_parser("auth", help="auth tools").add_subparsers(dest="auth_command", required=True)
    hashing = auth.add_parser("hash-token", help="print the token_sha256 of a bearer token for the auth file")
    hashing.add_argument("token", nargs="?", help="the token (default: read from stdin, so it stays out of history)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "loadtest":
        from ferry.loadtest.cli import run as loadtest

        return loadtest(args)
    if args.command == "client":
        from ferry.client.codegen import run as client_command

        return client_command(args)
    if args.command == "auth":
        token = args.token if args.token is not None else sys.stdin.readline().rstrip("\r\n")
        if not token:
            print("ferry: no token given (an argument, or one line on stdin)", file=sys.stderr)
            return 2
        print(hash_token(token))
        return 0
    worker = os.environ.get(WORKER_ENV, "").split("/")[0]
    where = f" [worker {worker}]" if worker else ""
    logging.basicConfig(level=args.log_level, format=f"%(asctime)s %(levelname)s{where} %(name)s: %(message)s")
    try:
        config = ServerConfig.build(
            model_repository=args.model_repository,
            host=args.host,
            grpc_port=args.grpc_port,
            http_port=None if args.http_port < 0 else args.http_port,
            http_keepalive_timeout_s=args.http_keepalive_timeout_s,
            http_body_timeout_s=args.http_body_timeout_s,
            http_max_connections=args.http_max_connections,
            max_message_bytes=args.max_message_bytes,
            max_pending_calls=args.max_pending_calls,
            transport=args.transport,
            intra_op_threads=args.intra_op_threads,
            inter_op_threads=args.inter_op_threads,
            graph_optimization_level=args.graph_optimization_level,
            execution_provider=args.execution_provider,
            max_queue_size=args.max_queue_size,
            cache_max_bytes=args.cache_max_bytes,
            inline_run_us=args.inline_run_us,
            ort_spinning=args.ort_spinning,
            prediction_log_path=args.prediction_log,
            prediction_log_max_bytes=args.prediction_log_max_bytes,
            prediction_log_backups=args.prediction_log_backups,
            outcome_window=args.outcome_window,
            strict_readiness=args.strict_readiness,
            shutdown_grace_s=args.shutdown_grace_s,
            drain_delay_s=args.drain_delay_s,
            max_connection_age_s=args.max_connection_age_s,
            max_connection_age_grace_s=args.max_connection_age_grace_s,
            keepalive_min_time_s=args.keepalive_min_time_s,
            idle_timeout_s=args.idle_timeout_s,
            use_uvloop=not args.no_uvloop,
            loop_lag_warn_s=args.loop_lag_warn_ms / 1000,
            shadow_max_loop_busy=args.shadow_max_loop_busy,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            tls_client_ca=args.tls_client_ca,
            tls_reload_check_s=args.tls_reload_check_s,
            auth_config_path=args.auth_config,
            grpc_restricted_protocol=args.grpc_restricted_protocol,
            http_restricted_api=args.http_restricted_api,
            audit_log_path=args.audit_log,
            audit_log_max_bytes=args.audit_log_max_bytes,
            audit_log_backups=args.audit_log_backups,
            audit_sample_rate=args.audit_sample_rate,
            model_control_mode=args.model_control_mode,
            load_models=tuple(args.load_model or ()),
            repository_poll_secs=args.repository_poll_secs,
            model_load_threads=args.model_load_threads,
            workers=args.workers,
        )
        if config.workers > 1:
            from ferry.server.workers.supervisor import supervise

            return run(supervise(config, argv if argv is not None else sys.argv[1:]), config.use_uvloop)
        run(serve(config), config.use_uvloop)
    except FerryError as err:
        print(f"ferry: {err.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

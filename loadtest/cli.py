"""``ferry loadtest``: sweep a server, find the highest rate it sustains within an SLO, plan replicas, report.

Only argparse is imported at module level: ``ferry serve`` builds its parser with :func:`add_arguments` and must
not pay for (or depend on) the load generator, numpy plotting or rich; :func:`run` imports them.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys
from collections.abc import Sequence

MODES = ("unary", "stream")
PROTOCOLS = ("grpc", "http")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Load-test a Ferry (or any Open Inference Protocol gRPC) server: a closed-loop concurrency sweep or open-loop "
        "rates, an optional capacity search against a p99 SLO, and a replica plan. Writes report.json, steps.csv, "
        "summary.md and PNG plots to --out."
    )
    p.add_argument("--target", required=True, metavar="HOST:PORT", help="gRPC address, or HTTP address with "
                   "--protocol http (loopback unless --allow-remote)")  # fmt: skip
    p.add_argument("--protocol", choices=PROTOCOLS, default="grpc", help="gRPC (ModelInfer), or the REST API "
                   "(POST /v2/models/{model}/infer, keep-alive HTTP/1.1) (default grpc)")  # fmt: skip
    p.add_argument("--http-data", choices=("binary", "json"), default="binary", help="with --protocol http: "
                   "tensors as Triton's binary extension or as JSON lists (default binary)")  # fmt: skip
    p.add_argument("--allow-remote", action="store_true", help="allow a target that is not a loopback address")
    p.add_argument("--model", required=True, help="model name")
    p.add_argument("--version", default="", help="model version (default: the server's latest)")
    load = p.add_mutually_exclusive_group()
    load.add_argument("--concurrency", metavar="LIST", help="closed loop: requests in flight, e.g. 1,4,16 or 1:64 "
                      "(powers of two from 1 to 64)")  # fmt: skip
    load.add_argument("--rate", metavar="LIST", help="open loop: requests/s, e.g. 100,200,400")
    p.add_argument("--poisson", action="store_true", help="open loop: Poisson arrivals (default: constant spacing)")
    p.add_argument("--duration", type=float, default=10.0, metavar="S", help="measured seconds per step (default 10)")
    p.add_argument("--warmup", type=float, default=None, metavar="S", help="unmeasured seconds before each window "
                   "(default: 20%% of --duration, at most 1 s)")  # fmt: skip
    p.add_argument("--out", required=True, metavar="DIR", help="report directory (created)")
    p.add_argument("--slo-p99-ms", type=float, default=None, metavar="MS", help="p99 latency objective")
    p.add_argument("--max-error-rate", type=float, default=0.001, metavar="R", help="error-rate objective (0.001)")
    p.add_argument("--capacity", action="store_true", help="search for the highest open-loop rate within the SLO")
    p.add_argument(
        "--capacity-start-rps",
        type=float,
        default=None,
        metavar="R",
        help="first rate of the search (default: from the sweep, else from a short closed-loop probe)",
    )
    p.add_argument("--max-rps", type=float, default=100_000.0, metavar="R", help="highest rate the search tries")
    p.add_argument("--tolerance", type=float, default=0.05, help="search stops when upper/lower - 1 <= this (0.05)")
    p.add_argument("--max-steps", type=int, default=12, help="most steps the capacity search runs (12)")
    p.add_argument("--target-peak-rps", type=float, default=None, metavar="R", help="plan replicas for this peak")
    p.add_argument(
        "--headroom", type=float, default=0.3, metavar="H", help="fraction of each replica's capacity kept spare (0.3)"
    )
    p.add_argument("--mode", choices=MODES, default="unary", help="ModelInfer calls or one ModelStreamInfer stream "
                   "per process (default unary)")  # fmt: skip
    p.add_argument("--rows", default="1", help="rows per request: N, a list (1,4,16) or 'mixed' (default 1)")
    p.add_argument("--inputs", default="random", help="random, zeros, or FILE.npy / FILE.npz / FILE.json")
    p.add_argument(
        "--duplicate-fraction",
        type=float,
        default=0.0,
        metavar="F",
        help="share of requests repeating a few fixed ones (exercises the result cache)",
    )
    p.add_argument("--client", choices=("wire", "grpcio"), default="wire", help="wire: ferry.loadtest.wire, gRPC "
                   "written onto HTTP/2 (about perf_analyzer's CPU per call); grpcio: grpc.aio, 2-3x that "
                   "(wire)")  # fmt: skip
    p.add_argument("--processes", type=int, default=default_processes(), help="load generator processes (default: "
                   "one per CPU, at most 4)")  # fmt: skip
    p.add_argument("--max-requests", type=int, default=1_000_000, metavar="N", help="cap on requests per step")
    p.add_argument("--timeout", type=float, default=10.0, metavar="S", help="per-request deadline, also the "
                   "longest drain after a step (10)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed of inputs and Poisson arrivals")
    p.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE", help="gRPC metadata sent "
                   "with every call, e.g. 'authorization=Bearer TOKEN' for --auth-config (repeatable)")  # fmt: skip
    p.add_argument(
        "--progress",
        choices=("auto", "rich", "plain"),
        default="auto",
        help="live progress: rich on a terminal, plain lines otherwise (auto)",
    )


def default_processes() -> int:
    """One per CPU, at most 4. Fewer processes leave more CPU to a server on the same machine (a Python gRPC client
    spends about 2.5 times perf_analyzer's CPU per request) but serialize more answers on each event loop: on 2
    shared cores, 1 process measured 0.68 of perf_analyzer at concurrency 4 where 2 measured 0.88 (BENCHMARKS.md)."""
    return max(1, min(4, os.cpu_count() or 1))


def parse_levels(text: str, what: str) -> list[float]:
    """``1,4,16`` or ``A:B`` (powers of two from A to B)."""
    try:
        if ":" in text:
            first, last = (int(part) for part in text.split(":"))
            levels: list[float] = []
            level = first
            while 0 < level <= last:
                levels.append(level)
                level *= 2
        else:
            levels = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--{what} {text!r}: expected numbers like 1,4,16 or 1:64") from None
    if not levels or any(v <= 0 for v in levels):
        raise ValueError(f"--{what} {text!r}: every level must be positive")
    return levels


def check_target(target: str, allow_remote: bool) -> None:
    """Refuse a target that is not loopback (every address its host resolves to), unless allowed."""
    if allow_remote or target.startswith("unix:"):
        return
    host = target.rsplit(":", 1)[0] if ":" in target else target
    host = host.strip("[]")
    try:
        addresses = {str(info[4][0]) for info in socket.getaddrinfo(host, None)}
    except socket.gaierror as err:
        raise ValueError(f"--target {target}: cannot resolve {host!r}: {err}") from None
    remote = sorted(a for a in addresses if not ipaddress.ip_address(a.split("%")[0]).is_loopback)
    if remote:
        raise ValueError(f"--target {target} resolves to {', '.join(remote)}, not loopback: pass --allow-remote "
                         "to load-test another machine")  # fmt: skip


def validate(args: argparse.Namespace) -> None:
    if args.concurrency is None and args.rate is None and not args.capacity:
        raise ValueError("give --concurrency, --rate or --capacity")
    if args.capacity and args.slo_p99_ms is None:
        raise ValueError("--capacity needs --slo-p99-ms (the latency the rate must stay within)")
    if args.target_peak_rps is not None and not args.capacity:
        raise ValueError("--target-peak-rps needs --capacity (the plan divides the peak by the measured capacity)")
    if args.duration <= 0 or args.duration > 3600:
        raise ValueError("--duration must be in (0, 3600] seconds")
    if args.processes < 1 or args.processes > 64:
        raise ValueError("--processes must be in 1..64")
    if not 0 <= args.max_error_rate <= 1:
        raise ValueError("--max-error-rate must be in 0..1")
    if not 0 <= args.headroom < 1:
        raise ValueError("--headroom is the spare fraction of capacity, in [0, 1)")
    if args.protocol == "http" and args.mode == "stream":
        raise ValueError("--protocol http has no stream mode: REST answers one request per call")
    if args.protocol == "http" and args.client != "wire":
        raise ValueError("--client chooses the gRPC client; --protocol http uses its own HTTP client")
    if args.max_requests < 1 or args.timeout <= 0:
        raise ValueError("--max-requests and --timeout must be positive")
    check_target(args.target, args.allow_remote)


def run(args: argparse.Namespace) -> int:
    """The ``ferry loadtest`` command; returns the exit status."""
    try:
        validate(args)
        levels = parse_levels(args.concurrency, "concurrency") if args.concurrency else None
        rates = parse_levels(args.rate, "rate") if args.rate else None
    except ValueError as err:
        print(f"ferry loadtest: {err}", file=sys.stderr)
        return 2
    from ferry.loadtest.session import Session  # the load generator, numpy and matplotlib load only now

    try:
        session = Session.open(args)
    except (ValueError, ConnectionError) as err:
        print(f"ferry loadtest: {err}", file=sys.stderr)
        return 2
    return session.run(levels, rates)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ferry loadtest")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

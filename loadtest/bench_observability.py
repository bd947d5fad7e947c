"""What watching costs: throughput with tracing (100% and 10% sampled), a metrics scraper, and the prediction log
(10% sampled), each as a ratio to the same server without it, measured back to back in one run.

    python -m loadtest.bench_observability --models examples/models --out bench-out [--quick] [--doc BENCHMARKS.md]

Ferry serves ``mlp`` and ``tiny`` with ``dynamic_batching { }``; perf_analyzer drives unary calls at concurrency
16. Traces go over OTLP/gRPC to a receiver in this process (it only counts what arrives), as they would to a
collector; the scraper GETs ``/metrics`` once a second, as Prometheus would.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from concurrent import futures
from pathlib import Path
from typing import IO, Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from loadtest import perf_analyzer
from loadtest.bench import ROOT, Running, Settings, check_answers, ferry_command, machine, replace_section, serving
from loadtest.bench_batching import paired

START, END = "<!-- bench:observability:start -->", "<!-- bench:observability:end -->"
CONCURRENCY = 16
LOGGED = 'parameters { key: "prediction_log_rate" value: { string_value: "0.1" } }\n'


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP trace receiver that counts spans."""

    def __init__(self) -> None:
        self.spans = 0

    def Export(self, request: Any, context: Any) -> Any:
        self.spans += sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
        return trace_service_pb2.ExportTraceServiceResponse()


@contextlib.contextmanager
def otlp_receiver() -> Iterator[tuple[int, Receiver]]:
    receiver = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port, receiver
    finally:
        server.stop(0)


@contextlib.contextmanager
def scraper(port: int, period_s: float = 1.0) -> Iterator[list[int]]:
    """GET /metrics every ``period_s`` until the block ends; yields the sizes of the answers."""
    sizes: list[int] = []
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(period_s):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
                sizes.append(len(response.read()))

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield sizes
    finally:
        stop.set()
        thread.join(15)


def build_repository(models: Path, root: Path, extra: str = "") -> Path:
    for name in ("mlp", "tiny"):
        (root / name / "1").mkdir(parents=True)
        shutil.copy(models / name / "1" / "model.onnx", root / name / "1" / "model.onnx")
        (root / name / "config.pbtxt").write_text(
            f'name: "{name}"\nmax_batch_size: 128\ndynamic_batching {{ }}\n{extra}'
        )
    return root


@contextlib.contextmanager
def ferry(name: str, repo: Path, log: IO[str], env: dict[str, str] | None = None, *extra: str) -> Iterator[Running]:
    """A Ferry subprocess with extra environment variables and flags."""
    saved = dict(os.environ)
    os.environ.update(env or {})
    try:
        with serving(name, [*ferry_command(repo), *extra], "ferry ready:", log) as running:
            os.environ.clear()
            os.environ.update(saved)
            for model in ("mlp", "tiny"):
                check_answers(running, model)
            yield running
    finally:
        os.environ.clear()
        os.environ.update(saved)


def measure_all(models: Path, work: Path, settings: Settings, log: IO[str]) -> dict[str, Any]:
    plain = build_repository(models, work / "plain")
    logged = build_repository(models, work / "logged", LOGGED)
    out: dict[str, Any] = {}
    with otlp_receiver() as (port, receiver), ferry("baseline", plain, log) as base:
        otlp = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
                "OTEL_EXPORTER_OTLP_INSECURE": "true"}  # fmt: skip
        metrics_port = free_port()
        variants = {
            "tracing 100%": (plain, {**otlp, "OTEL_TRACES_SAMPLER": "always_on"}, ()),
            "tracing 10%": (
                plain,
                {**otlp, "OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1"},
                (),
            ),
            "prediction log 10%": (logged, {}, ("--prediction-log", str(work / "predictions.jsonl"))),
            "metrics scraped 1/s": (plain, {}, ("--http-port", str(metrics_port))),  # the last --http-port wins
        }
        for label, (repo, env, flags) in variants.items():
            with ferry("variant", repo, log, env, *flags) as variant:
                out[label] = {}
                for model in ("mlp", "tiny"):
                    print(f"{label}, {model}:", flush=True)
                    scraping: contextlib.AbstractContextManager[list[int]] = (
                        scraper(metrics_port) if label.startswith("metrics") else contextlib.nullcontext([])
                    )
                    with scraping as scraped:
                        out[label][model] = paired(base, variant, settings, model, CONCURRENCY)
                    out[label][model]["scrapes"] = len(scraped)
        out["spans_received"] = receiver.spans
    return out


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def render(results: dict[str, Any]) -> str:
    r, m = results["runs"], results["machine"]
    lines = [
        f"Measured {results['date']} on {m['nproc']} CPUs ({m['cpu']}); load average "
        f"{results['load_average_1m']['start']:.1f} → {results['load_average_1m']['end']:.1f}.",
        "",
        f"Command: `{results['command']}` ({results['duration_s']:.0f} s). perf_analyzer unary, concurrency "
        f"{CONCURRENCY}, 1 row; windows of {results['settings']['measurement_ms']} ms "
        f"x {results['settings']['trials']}, "
        f"{results['settings']['rounds']} round(s), baseline and variant back to back in alternating order. "
        f"Spans received by the OTLP receiver: {r['spans_received']:,}.",
        "",
        "| feature | model | baseline req/s | with it req/s | with ÷ without (per round) | loss |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for label, models in r.items():
        if not isinstance(models, dict):
            continue
        for model, case in models.items():
            base, variant = case["baseline"], case["variant"]
            rounds = ", ".join(f"{x:.2f}" for x in case["per_round"])
            lines.append(
                f"| {label} | {model} | {base['infer_per_s']:,.0f} | {variant['infer_per_s']:,.0f} | "
                f"**{case['ratio']:.2f}** ({rounds}) | {(1 - case['ratio']) * 100:.0f}% |"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench_observability")
    parser.add_argument("--models", type=Path, default=ROOT / "examples" / "models")
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--doc", type=Path)
    args = parser.parse_args(argv)
    ok, why = perf_analyzer.usable()
    if not ok:
        print(f"bench: {why}", file=sys.stderr)
        return 2
    settings = Settings.quick() if args.quick else Settings(rounds=1)
    doc = args.doc or (None if args.quick else ROOT / "BENCHMARKS.md")
    args.out.mkdir(parents=True, exist_ok=True)
    started, load_start = time.perf_counter(), os.getloadavg()[0]
    results: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "command": f"python -m loadtest.bench_observability {' '.join(argv)}".strip(),
        "settings": {"measurement_ms": settings.measurement_ms, "trials": settings.trials, "rounds": settings.rounds},
    }
    with tempfile.TemporaryDirectory() as work, (args.out / "servers-observability.log").open("w") as log:
        results["runs"] = measure_all(args.models.resolve(), Path(work), settings, log)
    results["duration_s"] = time.perf_counter() - started
    results["load_average_1m"] = {"start": load_start, "end": os.getloadavg()[0]}
    (args.out / "results-observability.json").write_text(json.dumps(results, indent=2) + "\n")
    section = render(results)
    print(section)
    if doc is not None:
        doc.write_text(replace_section(doc.read_text() if doc.exists() else "", section, START, END))
    return 0


if __name__ == "__main__":
    sys.exit(main())

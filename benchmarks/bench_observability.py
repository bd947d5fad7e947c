"""What watching costs: throughput with tracing (100% and 10% sampled), a metrics scraper, and the prediction log
(10% sampled), each as a ratio to the same server without it, measured back to back in one run.

    python -m benchmarks.bench_observability --models examples/models --out bench-out [--quick] [--doc BENCHMARKS.md]

Ferry serves ``mlp`` and ``tiny`` with ``dynamic_batching { }``; perf_analyzer drives unary calls at concurrency
16. Traces go over OTLP/gRPC to a receiver in this process (it only counts what arrives), as they would to a
collector; the scraper GETs ``/metrics`` once a second, as Prometheus would.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import sys
import threading
import urllib.request
from collections.abc import Iterator, Sequence
from concurrent import futures
from pathlib import Path
from typing import IO, Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from benchmarks.bench import Running, Settings, check_answers, ferry_command, serving
from benchmarks.bench_batching import bench_main, paired

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


def otlp_env(port: int) -> dict[str, str]:
    """The environment that points a Ferry's OTLP trace exporter at :func:`otlp_receiver`'s ``port``."""
    return {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
            "OTEL_EXPORTER_OTLP_INSECURE": "true"}  # fmt: skip


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
        (root / name / "config.pbtxt").write_text(config_text(name, extra))
    return root


def config_text(name: str, extra: str = "") -> str:
    """The config.pbtxt both benchmarks serve ``name`` with; ``extra`` adds lines (e.g. a prediction log rate)."""
    return f'name: "{name}"\nmax_batch_size: 128\ndynamic_batching {{ }}\n{extra}'


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
    with otlp_receiver() as (port, receiver), ferry("ferry-baseline", plain, log) as base:
        otlp = otlp_env(port)
        metrics_port = free_port()
        variants = {
            # A/A: a second Ferry identical to the baseline: the bias of the pairing itself (divided out)
            CONTROL: (plain, {}, ()),
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
            with ferry("ferry-variant", repo, log, env, *flags) as variant:
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


CONTROL = "control: nothing on"


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
        "| feature | model | baseline req/s | with it req/s | with ÷ without (per round) | loss | loss net of the "
        "control | server CPU µs/request without / with | CPU added |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    control = r.get(CONTROL, {})
    for label, models in r.items():
        if not isinstance(models, dict):
            continue
        for model, case in models.items():
            base = case.get("ferry-baseline") or case["baseline"]  # the names runs before 2026-11-26 23:20 used
            variant = case.get("ferry-variant") or case["variant"]
            rounds = ", ".join(f"{x:.2f}" for x in case["per_round"])
            net = "-"
            if label != CONTROL and model in control:
                net = f"{(1 - case['ratio'] / control[model]['ratio']) * 100:.0f}%"
            cpu, added = "-", "-"
            if "cpu_us_per_request" in base and "cpu_us_per_request" in variant:
                without, with_it = base["cpu_us_per_request"], variant["cpu_us_per_request"]
                cpu, added = f"{without:,.0f} / {with_it:,.0f}", f"**{(with_it / without - 1) * 100:+.0f}%**"
            lines.append(
                f"| {label} | {model} | {base['infer_per_s']:,.0f} | {variant['infer_per_s']:,.0f} | "
                f"**{case['ratio']:.2f}** ({rounds}) | {(1 - case['ratio']) * 100:.0f}% | {net} | {cpu} | {added} |"
            )
    if control:
        lines += ["", f"*{CONTROL}* is a second Ferry with the baseline's exact configuration, measured the same way: "
                  "what it loses is the pairing's own bias and noise, and *loss net of the control* divides it out "
                  "(with ÷ without, over the control's with ÷ without). *Server CPU* is the server process's CPU "
                  "time (all threads, from /proc) over each perf_analyzer run divided by the requests its "
                  "`ModelStatistics` counted, averaged over rounds: on a CPU-bound server the throughput a feature "
                  "costs, read with less of the scheduling noise that moves req/s."]  # fmt: skip
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    return bench_main("observability", argv, measure_all, render, (START, END))


if __name__ == "__main__":
    sys.exit(main())

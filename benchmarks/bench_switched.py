"""What watching costs on one server process, switched on and off between short windows at a fixed request rate:
the server's CPU time per request with tracing at 10% and 100% (TraceSetting) and with the prediction log at 10%
(the model reloaded with or without its rate), against the same process with them off.

    python -m benchmarks.bench_switched --models examples/models --out bench-out [--rounds PAIRS] [--quick] [--doc F]

Why this design, beside ``bench_observability`` (two server processes, perf_analyzer at saturation): on this
machine two Ferry processes of one configuration differ by several % in CPU per request and ~±10% in req/s (that
benchmark's A/A control), and a saturated closed loop moves its batch sizes with every scheduling hiccup. Here one
process serves both arms, the load is an open loop at a fixed rate below capacity (the same work offered in every
window), and the arms alternate many times (A B, B A, ...), so drift cancels and the spread of the per-pair ratios
gives a confidence interval. The control switches off against off the same way.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import grpc
import numpy as np

from benchmarks.bench import Running, Settings, check_answers, cpu_seconds
from benchmarks.bench_batching import bench_main
from benchmarks.bench_observability import LOGGED, build_repository, config_text, ferry, otlp_env, otlp_receiver
from ferry.client._proto import grpc_service_pb2 as pb
from ferry.client._proto import grpc_service_pb2_grpc as pb_grpc
from ferry.loadtest.generator import WireClient

START, END = "<!-- bench:switched:start -->", "<!-- bench:switched:end -->"
RATES = {"mlp": 500.0, "tiny": 800.0}
"""Requests per second offered to each model: below its capacity with either feature on (BENCHMARKS.md)."""
DIMS = {"mlp": 256, "tiny": 16}
TICK_S = 0.005
SETTLE_S = 0.3
"""Load offered after each switch before the measured window opens."""
ARMS = {
    "off": ("OFF", "", False),
    "tracing 10%": ("TIMESTAMPS", "10", False),
    "tracing 100%": ("TIMESTAMPS", "1", False),
    "logged 10%": ("OFF", "", True),
}
"""Each arm: the trace level and rate the TraceSetting RPC sets, and whether the model is reloaded with a prediction
log rate of 0.1 (the prediction-log arms reload in both arms, so both start on a fresh model version)."""
CASES = {
    "tracing 10%": ("off", "tracing 10%", False),
    "tracing 100%": ("off", "tracing 100%", False),
    "prediction log 10%": ("off", "logged 10%", True),
    "control: off against off": ("off", "off", True),
}
CONTROL = "control: off against off"


def request_bytes(model: str) -> bytes:
    x = np.random.default_rng(0).standard_normal((1, DIMS[model])).astype(np.float32)
    tensor = pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[1, DIMS[model]])
    return pb.ModelInferRequest(model_name=model, inputs=[tensor], raw_input_contents=[x.tobytes()]).SerializeToString()


async def offer(client: WireClient, message: bytes, rate: float, seconds: float) -> tuple[int, int]:
    """``rate`` calls a second for ``seconds`` (sent in ticks of 5 ms, not waiting for answers); (answered, sent)."""
    loop = asyncio.get_running_loop()
    start, sent, calls = loop.time(), 0, []
    while (elapsed := loop.time() - start) < seconds:
        while sent < elapsed * rate:
            calls.append(asyncio.ensure_future(client.unary(message, 10.0)))
            sent += 1
        await asyncio.sleep(TICK_S)
    statuses = await asyncio.gather(*calls)
    return sum(s == "OK" for s in statuses), len(statuses)


def switch(server: Running, repo: Path, model: str, arm: str, reload: bool) -> None:
    """Put ``server`` in ``arm``: its trace settings, and (``reload``) ``model`` reloaded from a config.pbtxt with or
    without a prediction log rate."""
    level, rate, logged = ARMS[arm]
    request = pb.TraceSettingRequest()
    request.settings["trace_level"].value.append(level)
    if rate:
        request.settings["trace_rate"].value.append(rate)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        stub.TraceSetting(request, timeout=10)
        if reload:
            (repo / model / "config.pbtxt").write_text(config_text(model, LOGGED if logged else ""))
            stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=model), timeout=60)
    if reload:
        check_answers(server, model)


async def measure_case(
    server: Running, repo: Path, model: str, case: str, pairs: int, window_s: float
) -> dict[str, Any]:
    a, b, reload = CASES[case]
    rate, message = RATES[model], request_bytes(model)
    client = WireClient(server.address)
    await client.ready(10.0)
    try:
        cpu: dict[str, list[float]] = {"a": [], "b": []}
        unanswered = 0
        for i in range(pairs):
            for side, arm in (("a", a), ("b", b)) if i % 2 == 0 else (("b", b), ("a", a)):
                await asyncio.to_thread(switch, server, repo, model, arm, reload)
                await offer(client, message, rate, SETTLE_S)
                before = cpu_seconds(server.pid)
                answered, sent = await offer(client, message, rate, window_s)
                after = cpu_seconds(server.pid)
                if before is None or after is None or not answered:
                    raise RuntimeError(f"cannot measure {server.name}: CPU time {before}..{after}, {answered} answered")
                unanswered += sent - answered
                cpu[side].append((after - before) * 1e6 / answered)
    finally:
        await client.close()
    ratios = [y / x for x, y in zip(cpu["a"], cpu["b"], strict=True)]
    mean = statistics.fmean(ratios)
    half_width = 1.96 * statistics.stdev(ratios) / len(ratios) ** 0.5 if len(ratios) > 1 else float("nan")
    print(f"  {model:4} {case:26} {statistics.fmean(cpu['a']):6.0f} -> {statistics.fmean(cpu['b']):6.0f} µs/request "
          f"{(mean - 1) * 100:+.1f}% ± {half_width * 100:.1f}%", flush=True)  # fmt: skip
    return {
        "rate": rate, "pairs": pairs, "window_s": window_s, "unanswered": unanswered,
        "cpu_us_off": statistics.fmean(cpu["a"]), "cpu_us_on": statistics.fmean(cpu["b"]),
        "ratio": mean, "ci95": half_width, "per_pair": ratios,
    }  # fmt: skip


def measure_all(models: Path, work: Path, settings: Settings, log: IO[str]) -> dict[str, Any]:
    repo = build_repository(models, work / "switched")
    out: dict[str, Any] = {}
    with otlp_receiver() as (port, receiver):
        env = otlp_env(port)
        # it reloads models between windows: load requests need the explicit mode
        flags: tuple[str, ...] = ("--prediction-log", str(work / "predictions.jsonl"))
        flags += ("--model-control-mode", "explicit", "--load-model", "*")
        with ferry("ferry-switched", repo, log, env, *flags) as server:
            for case in CASES:
                out[case] = {}
                for model in RATES:
                    out[case][model] = asyncio.run(
                        measure_case(server, repo, model, case, settings.rounds, settings.measurement_ms / 1000)
                    )
        out["spans_received"] = receiver.spans
    return out


def render(results: dict[str, Any]) -> str:
    r, m = results["runs"], results["machine"]
    any_case = next(iter(r[CONTROL].values()))
    lines = [
        f"Measured {results['date']} on {m['nproc']} CPUs ({m['cpu']}); load average "
        f"{results['load_average_1m']['start']:.1f} → {results['load_average_1m']['end']:.1f}.",
        "",
        f"Command: `{results['command']}` ({results['duration_s']:.0f} s). One Ferry (OTLP exporter to a receiver in "
        f"the benchmark, `--prediction-log`); the wire client offers each model a fixed rate in windows of "
        f"{any_case['window_s']:g} s, {any_case['pairs']} pairs per case, the arms' order alternating; before each "
        f"window the TraceSetting RPC sets the arm's trace level (and the prediction-log cases reload the model with "
        f"or without `prediction_log_rate` 0.1, in both arms). Spans received: {r['spans_received']:,}.",
        "",
        "| feature | model | rate offered | server CPU µs/request off → on | CPU added (mean of per-pair ratios) "
        "| 95% interval | unanswered |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for case, models in r.items():
        if not isinstance(models, dict):
            continue
        for model, c in models.items():
            lines.append(
                f"| {case} | {model} | {c['rate']:,.0f}/s | {c['cpu_us_off']:,.0f} → {c['cpu_us_on']:,.0f} | "
                f"**{(c['ratio'] - 1) * 100:+.1f}%** | ±{c['ci95'] * 100:.1f}% | {c['unanswered']} |"
            )
    lines += ["", "CPU per request is the server process's CPU time (all threads, from /proc) over a window divided "
              "by the calls answered in it. At a fixed rate below capacity the throughput a feature would cost at "
              "saturation shows up as this CPU; the control's row is what the pairing itself reads. Tracing at 100% "
              "gives the cost of one sampled request with ten times the signal: a tenth of it, plus the ~1.5 µs "
              "an unsampled request costs, is what 10% should read."]  # fmt: skip
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    return bench_main("switched", argv, measure_all, render, (START, END), rounds=24)


if __name__ == "__main__":
    sys.exit(main())

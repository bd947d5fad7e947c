"""What a shadow costs the requests it shadows: the primary's latency with a shadow on ÷ off, in one server run.

    python -m benchmarks.bench_shadow --models examples/models --out bench-out [--quick] [--fraction 0.2]

One ``ferry serve`` holds each model twice, as ``NAME`` and ``NAME_shadowed``: versions 1 and 2 (copies of the
example's version 1), ``dynamic_batching { }``, and for ``NAME_shadowed`` the parameter ``shadow`` =
``version=2,fraction=F``. Closed-loop gRPC callers (``--concurrency``) send version 1 of one, then of the other
(the order alternates by round), ``--requests`` calls each; the ratio of their latency percentiles is taken per
round, so both sides share the machine's state. The shadow's own runs, drops (by reason) and latency come from
``/metrics``. ``--control`` leaves the shadow out of ``NAME_shadowed``: an A/A run, whose ratios show the noise floor
(two identical models on one server) that the shadow's ratios are read against.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import socket
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.bench import ferry_command, machine, serving
from ferry.client._proto import grpc_service_pb2 as pb
from ferry.client._proto import grpc_service_pb2_grpc as pb_grpc
from ferry.client.tensors import to_raw

MODELS = {"mlp": 256, "tiny": 16}  # model -> input features


def build_repository(models: Path, root: Path, names: Sequence[str], fraction: float, control: bool = False) -> Path:
    for name in names:
        shadowed = "" if control else f"version=2,fraction={fraction}"
        for served, shadow in ((name, ""), (f"{name}_shadowed", shadowed)):
            for version in ("1", "2"):
                (root / served / version).mkdir(parents=True)
                shutil.copy(models / name / "1" / "model.onnx", root / served / version / "model.onnx")
            lines = [f'name: "{served}"', "max_batch_size: 128", "dynamic_batching { }", "version_policy: { all { } }"]
            if shadow:
                lines.append(f'parameters {{ key: "shadow" value: {{ string_value: "{shadow}" }} }}')
            (root / served / "config.pbtxt").write_text("\n".join(lines) + "\n")
    return root


def request_for(model: str, features: int) -> pb.ModelInferRequest:
    x = np.random.default_rng(0).standard_normal((1, features)).astype(np.float32)
    request = pb.ModelInferRequest(model_name=model, model_version="1")
    request.inputs.add(name="input", datatype="FP32", shape=x.shape)
    request.raw_input_contents.append(to_raw(x))
    return request


async def latencies(address: str, request: pb.ModelInferRequest, count: int, concurrency: int) -> list[float]:
    """Seconds per call of ``count`` calls from ``concurrency`` closed-loop callers on one channel."""
    out: list[float] = []
    left = count

    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        async def caller() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                began = time.perf_counter()
                await stub.ModelInfer(request, timeout=60)
                out.append(time.perf_counter() - began)

        await asyncio.gather(*(caller() for _ in range(concurrency)))
    return out


def percentiles(values: list[float]) -> dict[str, float]:
    p50, p99 = np.percentile(values, [50, 99])
    return {"p50_ms": float(p50) * 1e3, "p99_ms": float(p99) * 1e3, "mean_ms": statistics.fmean(values) * 1e3}


def shadow_metrics(http_port: int, model: str) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=30) as response:
        text = response.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("ferry_shadow_") and s.labels.get("model") == model and "le" not in s.labels:
                qualifier = s.labels.get("output") or s.labels.get("reason")  # dropped: by reason, and summed
                out[s.name + (f"[{qualifier}]" if qualifier else "")] = s.value
                if "reason" in s.labels:
                    out[s.name] = out.get(s.name, 0.0) + s.value
        if family.name == "ferry_event_loop_busy_ratio":
            out["loop_busy_at_end"] = family.samples[0].value
    return out


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def run(args: argparse.Namespace) -> dict[str, Any]:
    names = [args.model] if args.model else list(MODELS)
    results: dict[str, Any] = {"machine": machine(), "fraction": args.fraction, "concurrency": args.concurrency,
                               "requests": args.requests, "rounds": args.rounds, "control": args.control,
                               "shadow_max_loop_busy": args.shadow_max_loop_busy,
                               "models": {}}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, (args.out / "bench_shadow.log").open("w") as log:
        repo = build_repository(args.models, Path(tmp), names, args.fraction, args.control)
        http_port = free_port()
        command = [*ferry_command(repo), "--http-port", str(http_port)]  # the last --http-port wins
        if args.shadow_max_loop_busy is not None:
            command += ["--shadow-max-loop-busy", str(args.shadow_max_loop_busy)]
        with serving("ferry", command, "ferry ready:", log) as ferry:
            for name in names:
                off, on = request_for(name, MODELS[name]), request_for(f"{name}_shadowed", MODELS[name])
                asyncio.run(latencies(ferry.address, off, 50, args.concurrency))  # warm both
                asyncio.run(latencies(ferry.address, on, 50, args.concurrency))
                rounds = []
                for i in range(args.rounds):
                    timed: dict[str, dict[str, float]] = {}
                    order = (("off", off), ("on", on)) if i % 2 == 0 else (("on", on), ("off", off))
                    for side, request in order:
                        timed[side] = percentiles(
                            asyncio.run(latencies(ferry.address, request, args.requests, args.concurrency))
                        )
                    ratios = {k: timed["on"][k] / timed["off"][k] for k in ("p50_ms", "p99_ms", "mean_ms")}
                    rounds.append({"off": timed["off"], "on": timed["on"], "on_over_off": ratios})
                    print(f"{name} round {i + 1}: on ÷ off p50 {ratios['p50_ms']:.2f}, p99 {ratios['p99_ms']:.2f}")
                median = {k: statistics.median(r["on_over_off"][k] for r in rounds) for k in ("p50_ms", "p99_ms")}
                time.sleep(0.5)  # let the last shadow runs finish before reading their counts
                results["models"][name] = {
                    "rounds": rounds,
                    "median_on_over_off": median,
                    "shadow": shadow_metrics(http_port, f"{name}_shadowed"),
                }
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, default=Path("examples/models"))
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--model", choices=sorted(MODELS), help="one model only (default: all)")
    parser.add_argument("--fraction", type=float, default=0.2, help="the shadow's fraction (default 0.2)")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--requests", type=int, default=3000, help="calls per side per round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--shadow-max-loop-busy", type=float, help="the server's flag (default: the server's)")
    parser.add_argument("--control", action="store_true", help="A/A: no shadow on either side (the noise floor)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: few calls, one round each way")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.rounds = 200, 2
    results = run(args)
    (args.out / "bench_shadow.json").write_text(json.dumps(results, indent=2))
    for name, case in results["models"].items():
        median, shadow = case["median_on_over_off"], case["shadow"]
        prefix = "ferry_shadow_dropped_total["
        reasons = ", ".join(f"{k[len(prefix) : -1]} {v:.0f}" for k, v in shadow.items() if k.startswith(prefix) and v)
        print(
            f"{name}: primary latency with shadow on ÷ off, median of rounds: p50 {median['p50_ms']:.2f}, "
            f"p99 {median['p99_ms']:.2f}; shadow runs {shadow.get('ferry_shadow_runs_total', 0):.0f}, "
            f"dropped {shadow.get('ferry_shadow_dropped_total', 0):.0f} "
            f"({reasons or 'none'})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

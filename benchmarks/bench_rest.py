"""What REST costs against gRPC: one Ferry server, perf_analyzer on its gRPC port (``-i grpc``) and on its REST API
(``-i http``, binary tensor data), ``tiny`` and ``mlp`` at concurrency 1 and 16, the two protocols taking turns in
rotating order, in the same run.

    python -m benchmarks.bench_rest --models examples/models --out bench-out [--rounds 2] [--quick] [--cases tiny-16]

Writes ``OUT/rest.json`` and prints a table of REST ÷ gRPC throughput (the issue's target: at least 0.7 on
``tiny`` at c16). Ferry REST ÷ MLServer REST is not measured here: perf_analyzer ``-i http`` needs
``GET /v2/models/{model}/config``, which MLServer's REST API does not serve.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import perf_analyzer
from benchmarks.bench import Settings, batched_copy, check_answers, ferry_command, machine, serving
from benchmarks.bench_observability import free_port

CASES = (("tiny", 1), ("tiny", 16), ("mlp", 1), ("mlp", 16))
PROTOCOLS = ("grpc", "http")


def run(address: str, model: str, concurrency: int, protocol: str, settings: Settings) -> dict[str, float]:
    """One perf_analyzer run (measured again, up to 3 times, when a busy machine makes its windows unstable)."""
    for attempt in range(3):
        try:
            (step,) = perf_analyzer.run(
                address,
                model,
                [concurrency],
                measurement_ms=settings.measurement_ms,
                extra=settings.perf_extra(),
                timeout_s=settings.perf_timeout_s(),
                protocol=protocol,
            )
            return {"infer_per_s": step.infer_per_s, "p50_us": step.p50_us, "p99_us": step.p99_us}
        except RuntimeError as err:
            if "stable measurement" not in str(err) or attempt == 2:
                raise
    raise AssertionError("unreachable")


def measure(
    models: Path, work: Path, settings: Settings, cases: tuple[tuple[str, int], ...], log: Any
) -> dict[str, Any]:
    repo = batched_copy(models, work / "repo", sorted({model for model, _ in cases}))
    http_port = free_port()
    command = [*ferry_command(repo)]
    command[command.index("--http-port") + 1] = str(http_port)
    out: dict[str, Any] = {}
    with serving("ferry", command, "ferry ready:", log) as ferry:
        addresses = {"grpc": ferry.address, "http": f"127.0.0.1:{http_port}"}
        for model, _ in cases:
            check_answers(ferry, model)
        for model, concurrency in cases:
            runs: dict[str, list[dict[str, float]]] = {p: [] for p in PROTOCOLS}
            for r in range(settings.rounds):
                order = PROTOCOLS[r % 2 :] + PROTOCOLS[: r % 2]
                for protocol in order:
                    runs[protocol].append(run(addresses[protocol], model, concurrency, protocol, settings))
            out[f"{model}-{concurrency}"] = {
                p: {k: statistics.fmean(x[k] for x in rs) for k in ("infer_per_s", "p50_us", "p99_us")}
                | {"per_round": [x["infer_per_s"] for x in rs]}
                for p, rs in runs.items()
            }
    return out


def render(results: dict[str, Any]) -> str:
    s = results["settings"]
    lines = [
        f"perf_analyzer windows of {s['measurement_ms']} ms x {s['trials']}, {s['rounds']} round(s), gRPC and REST "
        "(binary tensor data) on one server, in rotating order; `dynamic_batching { }` on both models.",
        "",
        "| case | gRPC req/s | REST req/s | REST ÷ gRPC | p50 µs gRPC / REST | p99 µs gRPC / REST |",
        "|---|---:|---:|---:|---|---|",
    ]
    for key, case in results["runs"].items():
        g, h = case["grpc"], case["http"]
        lines.append(
            f"| {key.replace('-', ' c')} | {g['infer_per_s']:,.0f} | {h['infer_per_s']:,.0f} "
            f"| **{h['infer_per_s'] / g['infer_per_s']:.2f}** | {g['p50_us']:,.0f} / {h['p50_us']:,.0f} "
            f"| {g['p99_us']:,.0f} / {h['p99_us']:,.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_rest", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, default=Path("examples/models"))
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="short windows, one round: to see that it runs")
    parser.add_argument("--cases", help="only these cases, e.g. tiny-16,mlp-1 (default: all)")
    args = parser.parse_args(argv)
    usable, why = perf_analyzer.usable()
    if not usable:
        print(f"bench_rest: {why}", file=sys.stderr)
        return 2
    settings = Settings.quick() if args.quick else Settings(rounds=args.rounds)
    cases: tuple[tuple[str, int], ...] = CASES
    if args.cases:
        wanted = set(args.cases.split(","))
        cases = tuple(c for c in CASES if f"{c[0]}-{c[1]}" in wanted)
        if not cases:
            parser.error(f"--cases {args.cases}: none of {[f'{m}-{c}' for m, c in CASES]}")
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with (args.out / "servers-rest.log").open("w") as log, tempfile.TemporaryDirectory() as work:
        runs = measure(args.models, Path(work), settings, cases, log)
    results = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine(),
        "settings": {"measurement_ms": settings.measurement_ms, "trials": settings.trials, "rounds": settings.rounds},
        "duration_s": time.monotonic() - started,
        "runs": runs,
    }
    (args.out / "rest.json").write_text(json.dumps(results, indent=2))
    print(render(results))
    return 0


__all__ = ["CASES", "main", "measure", "render"]

if __name__ == "__main__":
    sys.exit(main())

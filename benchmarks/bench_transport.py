"""What the transport costs: the bare echo server on grpc.aio (``benchmarks/echo.py``, the ceiling E the batching
benchmarks divide Ferry by) against the same answers over HTTP/2 written by hand (``benchmarks/h2echo.py``), and Ferry
on grpc.aio (``--transport grpcio``) against Ferry on its own transport (``server/transport/``, the default), all
under perf_analyzer: ``tiny`` unary at concurrency 1 and 16 and streaming at 16, ``mlp`` unary at 64.

    python -m benchmarks.bench_transport --models examples/models --out bench-out [--doc BENCHMARKS.md] [--rounds 2]
        [--baseline DIR]

The servers run side by side in their own processes and take turns, the order rotating by round. ``--baseline``
adds *Ferry-base*: the same server from another checkout (``git worktree add DIR COMMIT``), to measure a change
to the transport against the code before it in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.bench import (
    Settings,
    check_answers,
    echo_command,
    ferry_command,
    h2echo_command,
    machine,
    replace_section,
    serving,
)  # fmt: skip
from benchmarks.bench_batching import BATCHED, build_repository, run

START, END = "<!-- bench:transport:start -->", "<!-- bench:transport:end -->"
CASES = (("tiny", "unary", 1), ("tiny", "unary", 16), ("tiny", "stream", 16), ("mlp", "unary", 64))
SERVERS = ("echo", "h2echo", "ferry-grpcio", "ferry", "ferry-base")


def measure(
    models: Path,
    work: Path,
    settings: Settings,
    log: Any,
    baseline: Path | None = None,
    cases: tuple[tuple[str, str, int], ...] = CASES,
) -> dict[str, Any]:
    repo = build_repository(models, work / "on", BATCHED)
    out: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        echo = stack.enter_context(serving("echo", echo_command(repo, "tiny"), "echo ready:", log))
        h2echo = stack.enter_context(serving("h2echo", h2echo_command(repo, "tiny"), "echo ready:", log))
        on_grpcio = stack.enter_context(
            serving("ferry-grpcio", [*ferry_command(repo), "--transport", "grpcio"], "ferry ready:", log)
        )
        ferry = stack.enter_context(serving("ferry", ferry_command(repo), "ferry ready:", log))
        ferrys = [on_grpcio, ferry]
        if baseline is not None:  # the other checkout's server: its own code first on the path
            env = {**os.environ, "PYTHONPATH": str(baseline.resolve())}
            base = serving("ferry-base", ferry_command(repo), "ferry ready:", log, env=env, cwd=baseline.resolve())
            ferrys.append(stack.enter_context(base))
        for server in ferrys:
            for model in ("tiny", "mlp"):
                check_answers(server, model)
        for model, mode, concurrency in cases:
            servers = [echo, h2echo, *ferrys]
            if model == "mlp":  # the echo servers describe tiny only
                servers = ferrys
            runs: dict[str, list[dict[str, Any]]] = {s.name: [] for s in servers}
            for r in range(settings.rounds):
                k = r % len(servers)
                for server in servers[k:] + servers[:k]:
                    runs[server.name].append(run(server, model, concurrency, settings, streaming=mode == "stream"))
            out[f"{model}-{mode}-{concurrency}"] = {
                name: {k: statistics.fmean(x[k] for x in rs) for k in ("infer_per_s", "p50_us", "p99_us")}
                | {"per_round": [x["infer_per_s"] for x in rs]}
                for name, rs in runs.items()
            }
    return out


def render(results: dict[str, Any]) -> str:
    m, s = results["machine"], results["settings"]
    lines = [
        f"Measured {results['date']} on {m['nproc']} CPUs ({m['cpu']}), Python {m['python']}.",
        "",
        f"Command: `{results['command']}` ({results['duration_s']:.0f} s). perf_analyzer, windows of "
        f"{s['measurement_ms']} ms x {s['trials']}, {s['rounds']} round(s), the servers taking turns in "
        "rotating order (the echo servers describe `tiny` only). *E* is the bare grpc.aio echo server, *H* the same "
        "answers over hand-written HTTP/2 (`benchmarks/h2echo.py`), *Ferry-g* the real server on grpc.aio "
        "(`--transport grpcio`), *Ferry* the real server on its own transport (`server/transport/`, the default), "
        "*Ferry-base* (with `--baseline`) the same from another checkout; all with `dynamic_batching { }`.",
        "",
        "| case | E req/s | H req/s | Ferry-g req/s | Ferry req/s | Ferry-base req/s | H ÷ E | Ferry-g ÷ E | Ferry ÷ E "
        "| Ferry ÷ Ferry-g | Ferry ÷ Ferry-base | p50 µs E / H / Ferry-g / Ferry / Ferry-base |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]

    def figure(case: dict[str, Any], name: str, key: str = "infer_per_s") -> str:
        return f"{case[name][key]:,.0f}" if name in case else "-"

    def ratio(case: dict[str, Any], top: str, bottom: str) -> str:
        if top not in case or bottom not in case:
            return "-"
        return f"**{case[top]['infer_per_s'] / case[bottom]['infer_per_s']:.2f}**"

    for model, mode, concurrency in CASES:
        c = results["runs"].get(f"{model}-{mode}-{concurrency}")
        if c is None:
            continue
        rates = " | ".join(figure(c, n) for n in SERVERS)
        p50 = " / ".join(figure(c, n, "p50_us") for n in SERVERS)
        lines.append(
            f"| {model} {mode}, c{concurrency} | {rates} | {ratio(c, 'h2echo', 'echo')} "
            f"| {ratio(c, 'ferry-grpcio', 'echo').strip('*')} | {ratio(c, 'ferry', 'echo')} "
            f"| {ratio(c, 'ferry', 'ferry-grpcio')} | {ratio(c, 'ferry', 'ferry-base')} | {p50} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_transport", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, default=Path("examples/models"))
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--doc", type=Path, help="rewrite this file's bench:transport section")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--baseline", type=Path, help="a checkout of another commit, served beside as Ferry-base")
    parser.add_argument("--cases", help="only these cases, e.g. tiny-unary-16,mlp-unary-64 (default: all)")
    args = parser.parse_args(argv)
    settings = Settings(rounds=args.rounds)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with (args.out / "servers-transport.log").open("w") as log, tempfile.TemporaryDirectory() as work:
        cases: tuple[tuple[str, str, int], ...] = CASES
        if args.cases:
            wanted = set(args.cases.split(","))
            cases = tuple(c for c in CASES if "-".join(map(str, c)) in wanted)
        runs = measure(args.models, Path(work), settings, log, args.baseline, cases)
    results = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine(),
        "command": "python -m benchmarks.bench_transport " + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": {"measurement_ms": settings.measurement_ms, "trials": settings.trials, "rounds": settings.rounds},
        "duration_s": time.monotonic() - started,
        "runs": runs,
    }
    (args.out / "results-transport.json").write_text(json.dumps(results, indent=2) + "\n")
    body = render(results)
    print(body)
    if args.doc is not None:
        text = args.doc.read_text() if args.doc.exists() else ""
        args.doc.write_text(replace_section(text, body, START, END))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Cross-check ``ferry loadtest`` against Triton's ``perf_analyzer``: same server, model, concurrency and batch 1.

Both drive one ``ferry serve`` subprocess in closed loop; for every (model, concurrency) they run back to back, the
order alternating by round so drift on a shared machine hits both alike, and never at the same time. The figure
is loadtest's requests/s over perf_analyzer's; within 10% means the Python generator measures the server, not
itself. Writes ``OUT/crosscheck.json`` and, with ``--doc``, the section of ``BENCHMARKS.md`` between
``<!-- bench:loadtest:start -->`` and ``<!-- bench:loadtest:end -->`` (nothing else in the file changes).

    python -m benchmarks.crosscheck --models examples/models --doc BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import resource
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from benchmarks import bench, perf_analyzer
from ferry.loadtest import serverview, workload
from ferry.loadtest.cli import default_processes
from ferry.loadtest.runner import LoadTest, RunConfig
from ferry.loadtest.session import machine
from ferry.loadtest.steps import StepSpec

START, END = "<!-- bench:loadtest:start -->", "<!-- bench:loadtest:end -->"
TOLERANCE = 0.10


def measure_pair(lt: LoadTest, address: str, model: str, concurrency: int, window_ms: int, *, perf_first: bool,
                 trials: int) -> dict[str, Any]:  # fmt: skip
    """One loadtest step and one perf_analyzer run at ``concurrency``, in the given order. Each also reports the
    CPU its generator spent per request the server answered (perf_analyzer's start-up included)."""
    channel = grpc.insecure_channel(address)

    def answered(before: serverview.Snapshot | None) -> int:
        after = serverview.snapshot(channel, model)
        return after.success[0] - before.success[0] if after and before else 0

    def perf() -> dict[str, Any]:
        extra = ["--max-trials", str(trials), "--stability-percentage", "999"]  # a fixed number of windows
        for attempt in range(3):  # even with stability checks off, perf_analyzer gives up now and then here
            before, cpu = serverview.snapshot(channel, model), _children_cpu_s()
            try:
                (step,) = perf_analyzer.run(address, model, [concurrency], measurement_ms=window_ms, extra=extra)
                break
            except RuntimeError as err:
                if attempt == 2:
                    raise
                print(f"perf_analyzer failed, measuring again: {str(err)[-200:]}", file=sys.stderr, flush=True)
        cpu_us = (_children_cpu_s() - cpu) * 1e6 / max(answered(before), 1)
        return {"rps": step.infer_per_s, "p50_ms": step.p50_us / 1e3, "p99_ms": step.p99_us / 1e3,
                "cpu_us_per_request": round(cpu_us, 1)}  # fmt: skip

    def ours() -> dict[str, Any]:
        before, cpu = serverview.snapshot(channel, model), lt.cpu_seconds()
        step = lt.run_step(StepSpec("closed", concurrency=concurrency))
        spent = lt.cpu_seconds()
        cpu_us = (spent - cpu) * 1e6 / max(answered(before), 1) if spent is not None and cpu is not None else None
        return {"rps": step.throughput_rps, "p50_ms": step.latency_ms["p50"], "p99_ms": step.p99_ms,
                "errors": step.errors, "cpu_us_per_request": None if cpu_us is None else round(cpu_us, 1)}  # fmt: skip

    try:
        if perf_first:
            p, o = perf(), ours()
        else:
            o, p = ours(), perf()
    finally:
        channel.close()
    return {"perf_analyzer": p, "loadtest": o, "ratio": o["rps"] / p["rps"] if p["rps"] else None}


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # waited-for children only: perf_analyzer, not the server
    return usage.ru_utime + usage.ru_stime


def run(models_dir: Path, models: Sequence[str], levels: Sequence[int], *, rounds: int, window_ms: int,
        trials: int, processes: int, log_path: Path, target: str | None = None,
        client: str = "wire") -> dict[str, Any]:  # fmt: skip
    """Every (model, concurrency) pair ``rounds`` times, the levels interleaved within each round so slow drift
    spreads over all of them. ``target``: an already running server instead of starting ``ferry serve``."""
    usable, why = perf_analyzer.usable()
    if not usable:
        raise RuntimeError(why)
    load_before = os.getloadavg()[0]
    started = time.monotonic()
    results: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        if target is None:
            log = stack.enter_context(log_path.open("a"))
            target = stack.enter_context(
                bench.serving("ferry", bench.ferry_command(models_dir), "ferry ready", log)
            ).address
        for model in models:
            with grpc.insecure_channel(target) as channel:
                spec = serverview.describe_model(channel, model)
            duration_s = window_ms * trials / 1000  # the same measured time as perf_analyzer's windows together
            config = RunConfig(target=target, model=model, processes=processes, warmup_s=0.5,
                               duration_s=duration_s, timeout_s=10.0, client=client)  # fmt: skip
            runs: dict[int, list[dict[str, Any]]] = {c: [] for c in levels}
            with LoadTest(config, workload.build(spec, (1,), "random")) as lt:
                for r in range(rounds):
                    for c in levels:
                        pair = measure_pair(lt, target, model, c, window_ms, perf_first=r % 2 == 0, trials=trials)
                        runs[c].append(pair)
                        print(f"{model} c={c} round {r}: ratio {pair['ratio']:.3f}", file=sys.stderr, flush=True)
            results[model] = {str(c): summarize(rs) for c, rs in runs.items()}
    return {
        "measured_at": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "seconds": round(time.monotonic() - started),
        "settings": {
            "rounds": rounds,
            "window_ms": window_ms,
            "trials": trials,
            "processes": processes,
            "client": client,
        },
        "concurrency": list(levels),
        "models": results,
    }


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over rounds (a shared machine swings by tens of percent between runs: medians resist that), the
    ratio's range, and perf_analyzer's own spread between rounds: the noise floor any comparison sits on."""
    perf = [r["perf_analyzer"]["rps"] for r in runs]
    ratios = [r["ratio"] for r in runs if r["ratio"] is not None]

    def median_of(tool: str, key: str) -> float | None:
        values = [r[tool][key] for r in runs if r[tool].get(key) is not None]
        return statistics.median(values) if values else None

    return {
        "runs": runs,
        "perf_rps": statistics.median(perf),
        "loadtest_rps": statistics.median(r["loadtest"]["rps"] for r in runs),
        "ratio": statistics.median(ratios) if ratios else None,
        "ratio_range": [min(ratios), max(ratios)] if ratios else None,
        "perf_spread": (max(perf) - min(perf)) / statistics.median(perf) if statistics.median(perf) else None,
        "perf_p50_ms": median_of("perf_analyzer", "p50_ms"),
        "loadtest_p50_ms": median_of("loadtest", "p50_ms"),
        "perf_cpu_us": median_of("perf_analyzer", "cpu_us_per_request"),
        "loadtest_cpu_us": median_of("loadtest", "cpu_us_per_request"),
    }


def render(data: dict[str, Any], command: str) -> str:
    s = data["settings"]
    lines = [
        f"Measured {data['measured_at']} on {data['machine']}; 1-minute load average {data['load_average'][0]} at "
        f"the start, {data['load_average'][1]} at the end ({data['seconds']} s).",
        "",
        f"Command: `{command}`. One `ferry serve` (example repository, defaults) driven in closed loop at batch 1 "
        f"by perf_analyzer (`--measurement-interval {s['window_ms']} --max-trials {s['trials']} "
        f"--stability-percentage 999`: the mean of {s['trials']} windows) and by `ferry loadtest`'s generator "
        f"({s['processes']} processes, client `{s.get('client', 'grpcio')}`, 0.5 s warm-up, then the same "
        f"{s['window_ms'] * s['trials'] / 1000:g} s), back "
        f"to back, never together, the order alternating over {s['rounds']} rounds with the concurrency levels "
        "interleaved in each. Figures are medians over rounds; ratio = loadtest requests/s ÷ perf_analyzer "
        "requests/s of the same round; the check passes when the median ratio is within ±10%. *perf spread* is "
        "(max - min) / median of perf_analyzer's own rounds: the machine's noise. *CPU/req* is what each generator "
        "process spent per request the server answered (from `/proc` and `getrusage`).",
        "",
        "| model | concurrency | perf_analyzer req/s | loadtest req/s | ratio (min-max) | perf spread "
        "| p50 ms perf / loadtest | CPU/req µs perf / loadtest | within 10% |",
        "|---|---:|---:|---:|---|---:|---|---|---|",
    ]
    verdicts = []
    for model, cases in data["models"].items():
        for c, k in cases.items():
            ratio = k["ratio"]
            ok = ratio is not None and abs(ratio - 1) <= TOLERANCE
            verdicts.append(ok)
            lo, hi = k["ratio_range"] or (0.0, 0.0)
            lines.append(
                f"| {model} | {c} | {k['perf_rps']:,.0f} | {k['loadtest_rps']:,.0f} | **{ratio:.2f}** "
                f"({lo:.2f}-{hi:.2f}) | {k['perf_spread']:.0%} | {_num(k['perf_p50_ms'])} / "
                f"{_num(k['loadtest_p50_ms'])} | {_num(k['perf_cpu_us'], 0)} / {_num(k['loadtest_cpu_us'], 0)} "
                f"| {'yes' if ok else 'no'} |"
            )
    lines += ["", f"{sum(verdicts)} of {len(verdicts)} cases within ±10%.", "", *reading(data)]
    return "\n".join(lines)


def reading(data: dict[str, Any]) -> list[str]:
    """What the table says, from its own numbers: where the two agree, and what the generator costs."""
    cases = [(m, int(c), k) for m, cs in data["models"].items() for c, k in cs.items() if k["ratio"] is not None]
    if not cases:
        return []
    top = max(c for _, c, _ in cases)
    at_top = [f"{m} {k['ratio']:.2f}" for m, c, k in cases if c == top]
    cpu = [(k["loadtest_cpu_us"], k["perf_cpu_us"]) for _, _, k in cases if k["loadtest_cpu_us"] and k["perf_cpu_us"]]
    spreads = [k["perf_spread"] for _, _, k in cases if k["perf_spread"] is not None]
    out = [f"At the highest concurrency ({top}), where the server is the bottleneck, the median ratios are "
           f"{', '.join(at_top)}."]  # fmt: skip
    if cpu:
        ours, theirs = statistics.median(a for a, _ in cpu), statistics.median(b for _, b in cpu)
        cost = (f"The generator spends about {ours:,.0f} µs of CPU per request against perf_analyzer's "
                f"{theirs:,.0f} µs ({ours / theirs:.1f}x)")  # fmt: skip
        if ours > 1.2 * theirs:
            out.append(
                f"{cost}: on a machine where it shares the cores with the server, that CPU is taken from the server, "
                "and at concurrency 1 the extra client time is added to every round trip, so low-concurrency figures "
                "come out lower than perf_analyzer's. Give the generator its own cores (or machine, with "
                "`--allow-remote`) when the figure at low concurrency matters."
            )
        else:
            out.append(f"{cost}: the two tools take about the same share of the cores the server runs on.")
    if spreads:
        out.append(f"perf_analyzer's own rounds spread {min(spreads):.0%}-{max(spreads):.0%} here: differences "
                   "smaller than that are noise of the machine, not of either tool.")  # fmt: skip
    return [" ".join(out)]


def _num(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.crosscheck", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", type=Path, default=Path("examples/models"), help="model repository")
    p.add_argument("--model", action="append", help="model(s) to check (default: tiny and mlp)")
    p.add_argument("--concurrency", default="1,4,16", help="closed-loop levels (default 1,4,16)")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--window-ms", type=int, default=1000)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--processes", type=int, default=default_processes(), help="loadtest processes")
    p.add_argument("--client", choices=("wire", "grpcio"), default="wire", help="the generator's client (wire)")
    p.add_argument("--target", default=None, help="a running server (default: start ferry serve on --models)")
    p.add_argument("--out", type=Path, default=Path("bench-out"))
    p.add_argument("--doc", type=Path, default=None, help="rewrite the loadtest section of this BENCHMARKS.md")
    p.add_argument("--render", type=Path, default=None, metavar="JSON", help="measure nothing: render a saved "
                   "crosscheck.json (with the command recorded in it)")  # fmt: skip
    args = p.parse_args(argv)
    if args.render is not None:
        data = json.loads(args.render.read_text())
        return publish(render(data, data["command"]), args.doc)
    args.out.mkdir(parents=True, exist_ok=True)
    levels = [int(x) for x in args.concurrency.split(",")]
    data = run(args.models, args.model or ["tiny", "mlp"], levels, rounds=args.rounds, window_ms=args.window_ms,
               trials=args.trials, processes=args.processes, log_path=args.out / "crosscheck-servers.log",
               target=args.target, client=args.client)  # fmt: skip
    command = "python -m benchmarks.crosscheck " + shlex.join(argv if argv is not None else sys.argv[1:])
    data["command"] = command.strip()
    (args.out / "crosscheck.json").write_text(json.dumps(data, indent=2) + "\n")
    return publish(render(data, data["command"]), args.doc)


def publish(body: str, doc: Path | None) -> int:
    print(body)
    if doc is not None:
        text = doc.read_text() if doc.exists() else ""
        doc.write_text(bench.replace_section(text, body, START, END))
    return 0


if __name__ == "__main__":
    sys.exit(main())

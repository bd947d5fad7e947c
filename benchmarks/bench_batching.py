"""Dynamic batching and the result cache against the two ceilings, in one run (issue 3's figures).

    python -m benchmarks.bench_batching --models examples/models --out bench-out [--quick] [--doc BENCHMARKS.md]

Ceilings measured in the same run: E, the bare ``grpc.aio`` echo server (``benchmarks/echo.py``) under the same
perf_analyzer load and payload, and R, raw in-process onnxruntime at the batch size Ferry formed. Both consume the
same two cores, so for r rows per request the combined ceiling is B = 1 / (1/(E·r) + 1/R).

Cases: ``tiny`` at concurrency 16 (Ferry ÷ E, unary and streaming); ``mlp`` at concurrency 64 with 1 and 16 rows per
request (Ferry rows/s ÷ B); batching on vs off for ``mlp`` and ``tiny`` at concurrency 1, 8, 32, 64; the cache on
identical inputs (100% hits) ÷ E. Ferry runs from temporary copies of the example models with the configs below,
so the figures do not depend on what the example configs say.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

from benchmarks import perf_analyzer, raw_ort
from benchmarks.bench import (
    ROOT,
    Running,
    Settings,
    check_answers,
    cpu_seconds,
    echo_command,
    ferry_command,
    ferry_stats,
    machine,
    replace_section,
    serving,
)

START, END = "<!-- bench:batching:start -->", "<!-- bench:batching:end -->"
BATCHED = "max_batch_size: 128\ndynamic_batching { }\n"
UNBATCHED = "max_batch_size: 128\n"
CACHED = "max_batch_size: 128\ndynamic_batching { }\nresponse_cache { enable: true }\n"
TWO_INSTANCES = BATCHED + "instance_group [ { count: 2 kind: KIND_CPU } ]\n"
SWEEP = (1, 8, 32, 64)


def build_repository(models: Path, root: Path, config: str) -> Path:
    """``mlp`` and ``tiny`` copied from ``models`` with ``config`` (name lines are added)."""
    for name in ("mlp", "tiny"):
        (root / name / "1").mkdir(parents=True)
        shutil.copy(models / name / "1" / "model.onnx", root / name / "1" / "model.onnx")
        (root / name / "config.pbtxt").write_text(f'name: "{name}"\n{config}')
    return root


def run(
    server: Running,
    model: str,
    concurrency: int,
    settings: Settings,
    *,
    rows: int = 1,
    streaming: bool = False,
    zeros: bool = False,
) -> dict[str, Any]:
    """One perf_analyzer run; for Ferry also the mean batch it formed (rows per execution)."""
    is_ferry = server.name.startswith("ferry")
    before = ferry_stats(server.address, model) if is_ferry else None
    cpu_before = cpu_seconds(server.pid) if is_ferry else None
    extra = [*settings.perf_extra(), *(["--input-data", "zero"] if zeros else [])]
    for attempt in range(3):  # on a busy machine perf_analyzer may still call 3 windows unstable: measure again
        try:
            (step,) = perf_analyzer.run(
                server.address,
                model,
                [concurrency],
                batch_size=rows,
                streaming=streaming,
                measurement_ms=settings.measurement_ms,
                extra=extra,
                timeout_s=settings.perf_timeout_s(),
            )
            break
        except RuntimeError as err:
            if "stable measurement" not in str(err) or attempt == 2:
                raise
    result = {"infer_per_s": step.infer_per_s, "p50_us": step.p50_us, "p99_us": step.p99_us}
    if before is not None:
        after = ferry_stats(server.address, model)
        executions = after["executions"] - before["executions"]
        result["rows_per_execution"] = (after["rows"] - before["rows"]) / executions if executions else 0.0
        cpu_after, requests = cpu_seconds(server.pid), after["count"] - before["count"]
        if cpu_before is not None and cpu_after is not None and requests > 0:  # the whole run, warm-up included
            result["cpu_us_per_request"] = (cpu_after - cpu_before) * 1e6 / requests
    mode = "stream" if streaming else "unary"
    print(f"  {server.name:11} {model:4} {mode:6} c={concurrency:<3} b={rows:<3} {step.infer_per_s:9.1f} infer/s  "
          f"p50 {step.p50_us:7.0f} µs  p99 {step.p99_us:7.0f} µs", flush=True)  # fmt: skip
    return result


def paired(a: Running, b: Running, settings: Settings, model: str, concurrency: int, **kw: Any) -> dict[str, Any]:
    """``a`` and ``b`` back to back, their order alternating by round; means over rounds and per-round ratios."""
    runs: dict[str, list[dict[str, Any]]] = {a.name: [], b.name: []}
    for r in range(settings.rounds):
        for server in (a, b) if r % 2 == 0 else (b, a):
            runs[server.name].append(run(server, model, concurrency, settings, **kw))

    def mean(name: str) -> dict[str, float]:
        keys = runs[name][0].keys()
        return {k: statistics.fmean(x[k] for x in runs[name]) for k in keys}

    ratios = [y["infer_per_s"] / x["infer_per_s"] for x, y in zip(runs[a.name], runs[b.name], strict=True)]
    return {a.name: mean(a.name), b.name: mean(b.name), "ratio": statistics.fmean(ratios), "per_round": ratios}


def ceiling_case(
    echo: Running, ferry: Running, models: Path, settings: Settings, concurrency: int, rows: int
) -> dict[str, Any]:
    """Ferry's rows/s on mlp against B = 1 / (1/(E·r) + 1/R), R measured at the batch Ferry formed."""
    case = paired(echo, ferry, settings, "mlp", concurrency, rows=rows)
    formed = max(1, round(case[ferry.name]["rows_per_execution"]))
    r_rows = raw_ort.rows_per_second(models / "mlp" / "1" / "model.onnx", formed, settings.raw_seconds)
    e_rows = case[echo.name]["infer_per_s"]  # perf_analyzer's infer/s at -b r counts rows: it is E·r already
    ceiling = combined_ceiling(e_rows, r_rows)
    case.update(rows=rows, formed_batch=formed, raw_rows_per_s=r_rows, echo_rows_per_s=e_rows, ceiling=ceiling,
                ferry_name=ferry.name)  # fmt: skip
    case["ferry_over_ceiling"] = case[ferry.name]["infer_per_s"] / ceiling  # rows/s too
    return case


def combined_ceiling(echo_rows_per_s: float, raw_rows_per_s: float) -> float:
    """B = 1 / (1/(E·r) + 1/R): the two costs share the cores. Both arguments in rows/s; perf_analyzer's infer/s
    at ``-b r`` is rows/s (requests/s times r), so E·r is the echo server's infer/s as perf_analyzer reports it."""
    return 1 / (1 / echo_rows_per_s + 1 / raw_rows_per_s)


def measure_all(models: Path, work: Path, settings: Settings, log: IO[str]) -> dict[str, Any]:
    on = build_repository(models, work / "on", BATCHED)
    off = build_repository(models, work / "off", UNBATCHED)
    cached = build_repository(models, work / "cached", CACHED)
    two = build_repository(models, work / "two", TWO_INSTANCES)
    out: dict[str, Any] = {
        "configs": {"batching on": BATCHED, "batching off": UNBATCHED, "cache": CACHED, "two instances": TWO_INSTANCES}
    }
    with (
        serving("ferry", ferry_command(on), "ferry ready:", log) as ferry,
        serving("ferry-off", ferry_command(off), "ferry ready:", log) as ferry_off,
        serving("ferry-cache", ferry_command(cached), "ferry ready:", log) as ferry_cache,
        serving("ferry-2inst", ferry_command(two), "ferry ready:", log) as ferry_two,
    ):
        for model in ("tiny", "mlp"):
            for server in (ferry, ferry_off, ferry_cache, ferry_two):
                check_answers(server, model)
        with serving("echo", echo_command(on, "tiny"), "echo ready:", log) as echo:
            check_answers(echo, "tiny")
            print("tiny, concurrency 16:", flush=True)
            out["tiny_unary"] = paired(echo, ferry, settings, "tiny", 16)
            out["tiny_stream"] = paired(echo, ferry, settings, "tiny", 16, streaming=True)
            print("tiny, identical inputs (cache hits), concurrency 16:", flush=True)
            out["cache"] = paired(echo, ferry_cache, settings, "tiny", 16, zeros=True)
        with serving("echo", echo_command(on, "mlp"), "echo ready:", log) as echo:
            check_answers(echo, "mlp")
            print("mlp, concurrency 64, against B:", flush=True)
            out["mlp_b1"] = ceiling_case(echo, ferry, models, settings, 64, 1)
            out["mlp_b16"] = ceiling_case(echo, ferry, models, settings, 64, 16)
            print("mlp, concurrency 64, 16 rows, two instances of one intra-op thread each, against B:", flush=True)
            out["mlp_b16_2inst"] = ceiling_case(echo, ferry_two, models, settings, 64, 16)
        print("batching on vs off:", flush=True)
        out["sweep"] = {
            model: {str(c): paired(ferry_off, ferry, settings, model, c) for c in SWEEP} for model in ("mlp", "tiny")
        }
    return out


def _n(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.2f}"


def render(results: dict[str, Any]) -> str:
    r, m = results["runs"], results["machine"]
    rounds = results["settings"]["rounds"]
    lines = [
        f"Measured {results['date']} on {m['nproc']} CPUs ({m['cpu']}), Python {m['python']}; 1-minute load average "
        f"{results['load_average_1m']['start']:.1f} at the start, {results['load_average_1m']['end']:.1f} at the end.",
        "",
        f"Command: `{results['command']}` ({results['duration_s']:.0f} s). perf_analyzer windows of "
        f"{results['settings']['measurement_ms']} ms x {results['settings']['trials']}, {rounds} round(s) per pair, "
        "order alternating by round; each Ferry in its own process with the config shown. Ratios are per-run "
        "means; the per-round values show the noise.",
        "",
        "| case | ceiling | ceiling figure | Ferry | Ferry ÷ ceiling (per round) | target |",
        "|---|---|---:|---:|---:|---:|",
    ]

    def pair_row(label: str, case: dict[str, Any], ferry: str, target: str) -> str:
        rounds_txt = ", ".join(f"{x:.2f}" for x in case["per_round"])
        return (
            f"| {label} | echo E | {_n(case['echo']['infer_per_s'])} req/s | {_n(case[ferry]['infer_per_s'])} req/s "
            f"| **{case['ratio']:.2f}** ({rounds_txt}) | {target} |"
        )

    lines.append(pair_row("tiny, 1 row, c16, unary", r["tiny_unary"], "ferry", "≥ 0.85"))
    lines.append(pair_row("tiny, 1 row, c16, streaming", r["tiny_stream"], "ferry", "≥ 0.85"))
    lines.append(pair_row("tiny, cache (100% hits), c16", r["cache"], "ferry-cache", "≥ 0.9"))
    for key in ("mlp_b1", "mlp_b16", "mlp_b16_2inst"):
        if key not in r:  # results saved before the two-instance case existed
            continue
        c = r[key]
        tuned = ", `instance_group` count 2" if key.endswith("2inst") else ""
        lines.append(
            f"| mlp, {c['rows']} row(s)/request, c64{tuned} | B (E {_n(c['echo_rows_per_s'])} rows/s, R at batch "
            f"{c['formed_batch']} {_n(c['raw_rows_per_s'])} rows/s) | {_n(c['ceiling'])} rows/s | "
            f"{_n(c[c.get('ferry_name', 'ferry')]['infer_per_s'])} rows/s | **{c['ferry_over_ceiling']:.2f}** | "
            "≥ 0.8 |"
        )
    lines += [
        "",
        "Batching on (`dynamic_batching { }`) vs off, unary, 1 row per request:",
        "",
        "| model | conc. | off req/s | on req/s | on ÷ off | off p50 / p99 µs | on p50 / p99 µs | rows/exec (on) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for model, cases in r["sweep"].items():
        for c, case in cases.items():
            off, on = case["ferry-off"], case["ferry"]
            lines.append(
                f"| {model} | {c} | {_n(off['infer_per_s'])} | {_n(on['infer_per_s'])} | **{case['ratio']:.2f}** | "
                f"{_n(off['p50_us'])} / {_n(off['p99_us'])} | {_n(on['p50_us'])} / {_n(on['p99_us'])} | "
                f"{on['rows_per_execution']:.1f} |"
            )
    configs = results["runs"]["configs"]
    lines += ["", "Ferry's configs (`config.pbtxt` of both models):", ""]
    lines += [f"- {name}: `{text.strip().replace(chr(10), ' ')}`" for name, text in configs.items()]
    return "\n".join(lines)


Measure = Callable[[Path, Path, Settings, IO[str]], dict[str, Any]]


def bench_main(
    name: str,
    argv: Sequence[str] | None,
    measure: Measure,
    render_section: Callable[[dict[str, Any]], str],
    markers: tuple[str, str],
    rounds: int = 2,
) -> int:
    """The command line shared by the benchmark modules: run ``measure``, write ``<out>/results-<name>.json``, print
    the section and put it between ``markers`` in BENCHMARKS.md (a ``--quick`` run writes no document)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog=f"python -m ferry.loadtest.bench_{name}")
    parser.add_argument("--models", type=Path, default=ROOT / "examples" / "models")
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--quick", action="store_true", help="short windows, one round: a smoke run")
    parser.add_argument("--doc", type=Path, help="file whose section to rewrite (default BENCHMARKS.md)")
    parser.add_argument(
        "--rounds", type=int, default=rounds, help=f"rounds per pair, order alternating (default {rounds})"
    )
    args = parser.parse_args(argv)
    ok, why = perf_analyzer.usable()
    if not ok:
        print(f"bench: {why}", file=sys.stderr)
        return 2
    settings = Settings.quick() if args.quick else Settings(rounds=args.rounds)
    doc = args.doc or (None if args.quick else ROOT / "BENCHMARKS.md")
    args.out.mkdir(parents=True, exist_ok=True)
    started, load_start = time.perf_counter(), os.getloadavg()[0]
    results: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "command": f"python -m ferry.loadtest.bench_{name} {' '.join(argv)}".strip(),
        "settings": {"measurement_ms": settings.measurement_ms, "trials": settings.trials, "rounds": settings.rounds},
    }
    with tempfile.TemporaryDirectory() as work, (args.out / f"servers-{name}.log").open("w") as log:
        results["runs"] = measure(args.models.resolve(), Path(work), settings, log)
    results["duration_s"] = time.perf_counter() - started
    results["load_average_1m"] = {"start": load_start, "end": os.getloadavg()[0]}
    (args.out / f"results-{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    section = render_section(results)
    print(section)
    if doc is not None:
        doc.write_text(replace_section(doc.read_text() if doc.exists() else "", section, *markers))
        print(f"bench: wrote {args.out / f'results-{name}.json'} and {doc}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return bench_main("batching", argv, measure_all, render, (START, END))


if __name__ == "__main__":
    sys.exit(main())

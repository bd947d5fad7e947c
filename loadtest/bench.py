"""``make bench``: Ferry against its two ceilings, measured in one run, recorded as ratios.

- raw onnxruntime in this process (:mod:`loadtest.raw_ort`), rows/s at batch 1, 16 and 64: the compute ceiling;
- a bare ``grpc.aio`` echo server (:mod:`loadtest.echo`) under ``perf_analyzer``: the per-request ceiling E;
- Ferry (``ferry serve``) under the same ``perf_analyzer`` settings, unary at several concurrencies and streaming.

Servers run in subprocesses on 127.0.0.1 so the load generator and the server never share a GIL. Each case runs
echo and Ferry back to back (echo, Ferry, then Ferry, echo on a second round) so that drift on a shared machine
hits both alike. perf_analyzer's stability search is switched off in effect (a threshold nothing fails, a fixed
number of windows): on a noisy 2-core machine it otherwise fails more often than it converges; noise is handled by
pairing, repeating and reporting ratios instead. Writes ``OUT/results.json`` and the section of ``BENCHMARKS.md``
between ``<!-- bench:core:start -->`` and ``<!-- bench:core:end -->``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import queue
import re
import shlex
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import grpc

from client._proto import grpc_service_pb2 as pb
from client._proto import grpc_service_pb2_grpc as pb_grpc
from loadtest import perf_analyzer, raw_ort

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- bench:core:start -->", "<!-- bench:core:end -->"
MODELS = ("mlp", "tiny")
CONCURRENCY = (1, 8, 32)
STREAM_CONCURRENCY = 8
RAW_BATCHES = (1, 16, 64)
READY_TIMEOUT_S = 120
STAT_PARTS = ("queue", "compute_input", "compute_infer", "compute_output")


@dataclass(frozen=True, slots=True)
class Settings:
    measurement_ms: int = 2000
    trials: int = 3
    rounds: int = 2
    raw_seconds: float = 2.0

    @classmethod
    def quick(cls) -> Settings:
        return cls(measurement_ms=500, trials=3, rounds=1, raw_seconds=0.3)

    def perf_extra(self) -> list[str]:
        # --stability-percentage 999: every run measures exactly `trials` windows and reports their average.
        return ["--max-trials", str(self.trials), "--stability-percentage", "999"]


# --- servers in subprocesses ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Running:
    name: str
    pid: int
    address: str


@contextlib.contextmanager
def serving(name: str, cmd: Sequence[str], ready_prefix: str, log: IO[str]) -> Iterator[Running]:
    """Start ``cmd``, wait for its ready line on stdout (``... grpc=HOST:PORT ...``), stop it in ``finally``."""
    proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=log, text=True, cwd=ROOT)
    try:
        address = _await_ready(proc, ready_prefix)
        yield Running(name, proc.pid, address)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _await_ready(proc: subprocess.Popen[str], prefix: str) -> str:
    what = shlex.join(str(a) for a in proc.args) if isinstance(proc.args, list) else repr(proc.args)
    lines: queue.Queue[str | None] = queue.Queue()

    def drain() -> None:  # keeps reading, so a chatty server never blocks on a full pipe
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=drain, daemon=True).start()
    deadline = time.monotonic() + READY_TIMEOUT_S
    while (left := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=left)
        except queue.Empty:
            break
        if line is None:
            raise RuntimeError(f"{what} exited with {proc.wait()} before it was ready (see the bench log)")
        found = re.search(r"grpc=([\w.\-]+:\d+)", line)
        if line.startswith(prefix) and found:
            return found.group(1)
    raise RuntimeError(f"{what} printed no ready line within {READY_TIMEOUT_S}s")


def ferry_command(models: Path) -> list[str]:
    """``ferry serve`` (the same entry point as the console script), gRPC on a free port, HTTP off."""
    return [sys.executable, "-m", "server", "serve", "--model-repository", str(models), "--host", "127.0.0.1",
            "--grpc-port", "0", "--http-port", "-1", "--log-level", "WARNING"]  # fmt: skip


def echo_command(models: Path, model: str) -> list[str]:
    return [sys.executable, "-m", "loadtest.echo", "--model-repository", str(models), "--model", model,
            "--host", "127.0.0.1", "--port", "0"]  # fmt: skip


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process, all threads (Linux /proc), or None where unreadable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def ferry_stats(address: str, model: str) -> dict[str, int]:
    """Ferry's cumulative ModelStatistics for ``model``: request count and ns per stage."""
    with grpc.insecure_channel(address) as channel:
        reply = pb_grpc.GRPCInferenceServiceStub(channel).ModelStatistics(
            pb.ModelStatisticsRequest(name=model), timeout=10
        )
    out = {"count": 0, "success_ns": 0, **{f"{p}_ns": 0 for p in STAT_PARTS}}
    for version in reply.model_stats:
        s = version.inference_stats
        out["count"] += s.success.count
        out["success_ns"] += s.success.ns
        for part in STAT_PARTS:
            out[f"{part}_ns"] += getattr(s, part).ns
    return out


# --- measurements --------------------------------------------------------------------------------------------


def measure(
    server: Running,
    model: str,
    concurrency: int,
    streaming: bool,
    settings: Settings,
    stats: Callable[[], dict[str, int]] | None = None,
) -> dict[str, Any]:
    """One perf_analyzer run: its Step, plus the server's CPU time per inference and (Ferry) its stage times."""
    before_stats = stats() if stats else None
    cpu0, t0 = cpu_seconds(server.pid), time.perf_counter()
    steps = perf_analyzer.run(server.address, model, [concurrency], streaming=streaming,
                              measurement_ms=settings.measurement_ms, extra=settings.perf_extra())  # fmt: skip
    wall_s, cpu1 = time.perf_counter() - t0, cpu_seconds(server.pid)
    if len(steps) != 1:
        raise RuntimeError(f"perf_analyzer reported {len(steps)} steps for concurrency {concurrency}")
    result: dict[str, Any] = {"server": server.name, **asdict(steps[0]), "wall_s": round(wall_s, 3)}
    # perf_analyzer keeps the load on for its whole run, so requests ~ infer/s x wall time (checked against
    # Ferry's exact count below); the server is idle outside the run, so its CPU time belongs to those requests.
    served = steps[0].infer_per_s * wall_s
    if cpu0 is not None and cpu1 is not None and served > 0:
        result["server_cpu_s"] = round(cpu1 - cpu0, 3)
        result["server_cpu_us_per_infer"] = (cpu1 - cpu0) / served * 1e6
    if stats and before_stats is not None:
        after = stats()
        n = after["count"] - before_stats["count"]
        result["server_count"] = n
        result["served_estimate"] = round(served)
        if n > 0:
            keys = ["success_ns", *(f"{p}_ns" for p in STAT_PARTS)]
            result["server_us"] = {k[:-3]: (after[k] - before_stats[k]) / n / 1000 for k in keys}
    print(f"  {server.name:5} {model:4} {'stream' if streaming else 'unary':6} c={concurrency:<3} "
          f"{steps[0].infer_per_s:9.1f} infer/s  p50 {steps[0].p50_us:7.0f} µs  p99 {steps[0].p99_us:7.0f} µs",
          flush=True)  # fmt: skip
    return result


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The mean of repeated runs of one server in one case."""
    keys = ("infer_per_s", "p50_us", "p99_us", "avg_us", "server_cpu_us_per_infer")
    out: dict[str, Any] = {k: statistics.fmean(r[k] for r in runs) for k in keys if all(k in r for r in runs)}
    breakdowns = [r["server_us"] for r in runs if "server_us" in r]
    if breakdowns:
        out["server_us"] = {k: statistics.fmean(b[k] for b in breakdowns) for k in breakdowns[0]}
    return out


def run_case(
    echo: Running, ferry: Running, model: str, concurrency: int, streaming: bool, settings: Settings
) -> dict[str, Any]:
    """echo and Ferry back to back, ABBA over rounds: E F | F E | E F ..."""
    runs: dict[str, list[dict[str, Any]]] = {"echo": [], "ferry": []}
    for r in range(settings.rounds):
        order = (echo, ferry) if r % 2 == 0 else (ferry, echo)
        for server in order:
            stats = (lambda: ferry_stats(ferry.address, model)) if server is ferry else None
            runs[server.name].append(measure(server, model, concurrency, streaming, settings, stats))
    echo_s, ferry_s = summarize(runs["echo"]), summarize(runs["ferry"])
    per_round = [f["infer_per_s"] / e["infer_per_s"] for e, f in zip(runs["echo"], runs["ferry"], strict=True)]
    return {
        "mode": "streaming" if streaming else "unary",
        "concurrency": concurrency,
        "echo": echo_s,
        "ferry": ferry_s,
        "ferry_over_echo": ferry_s["infer_per_s"] / echo_s["infer_per_s"],
        "ferry_over_echo_per_round": per_round,
        "runs": runs,
    }


def raw_rows(model_path: Path, settings: Settings) -> dict[str, float]:
    rates = {str(b): raw_ort.rows_per_second(model_path, b, settings.raw_seconds) for b in RAW_BATCHES}
    print(f"  raw   {model_path.parent.parent.name:4} " + "  ".join(f"b{b} {r:,.0f} rows/s" for b, r in rates.items()))
    return rates


def bench_model(models: Path, model: str, ferry: Running, settings: Settings, log: IO[str]) -> dict[str, Any]:
    path = models / model / "1" / "model.onnx"
    raw_runs = [raw_rows(path, settings)]
    cases = []
    with serving("echo", echo_command(models, model), "echo ready:", log) as echo:
        for c in CONCURRENCY:
            cases.append(run_case(echo, ferry, model, c, False, settings))
        cases.append(run_case(echo, ferry, model, STREAM_CONCURRENCY, True, settings))
    if settings.rounds > 1:
        raw_runs.append(raw_rows(path, settings))  # before and after the servers' cases, averaged
    raw = {b: statistics.fmean(r[b] for r in raw_runs) for b in raw_runs[0]}
    for case in cases:
        case["ferry_over_raw_b1"] = case["ferry"]["infer_per_s"] / raw["1"]
    return {"raw_ort_rows_per_s": raw, "raw_ort_runs": raw_runs, "cases": cases}


# --- the report ----------------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    nproc = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"nproc": nproc, "cpu": cpu, "python": sys.version.split()[0]}


def replace_section(text: str, body: str, start: str = START, end: str = END) -> str:
    """``text`` with what lies between the markers replaced by ``body``; the section is appended if absent."""
    block = f"{start}\n{body.strip()}\n{end}"
    i = text.find(start)
    j = text.find(end, i + len(start)) if i >= 0 else text.find(end)
    if i < 0 and j < 0:
        return f"{text.rstrip()}\n\n{block}\n" if text.strip() else f"{block}\n"
    if i < 0 or j < 0:
        raise ValueError(f"found only one of the markers {start} and {end}: fix the file by hand")
    return text[:i] + block + text[j + len(end) :]


def _n(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def render(results: dict[str, Any]) -> str:
    s, m = results["settings"], results["machine"]
    lines = [
        f"Measured {results['date']} on {m['nproc']} CPUs ({m['cpu']}), Python {m['python']}, "
        f"perf_analyzer {results['perf_analyzer']} on the same machine, batch 1, random FP32 input.",
        "",
        f"Command: `{results['command']}` ({results['duration_s']:.0f} s). perf_analyzer: "
        f"`--measurement-interval {s['measurement_ms']} --max-trials {s['trials']} --stability-percentage 999` "
        f"(each figure is the mean of {s['trials']} windows), {s['rounds']} round(s) per case, echo and Ferry back "
        "to back (ABBA). Ratios compare figures from this run only.",
        "",
        "**Raw onnxruntime** (in-process `session.run`, rows/s; the compute ceiling):",
        "",
        "| model | " + " | ".join(f"batch {b}" for b in RAW_BATCHES) + " |",
        "|---|" + "---:|" * len(RAW_BATCHES),
    ]
    for model, r in results["models"].items():
        lines.append(f"| {model} | " + " | ".join(_n(r["raw_ort_rows_per_s"][str(b)]) for b in RAW_BATCHES) + " |")
    lines += [
        "",
        "**Ferry against the bare grpc.aio echo server E** (infer/s; latencies µs; server CPU µs per inference):",
        "",
        "| model | mode | conc. | E infer/s | Ferry infer/s | Ferry ÷ E (rounds) | Ferry ÷ raw b1 "
        "| E p50 / p99 | Ferry p50 / p99 | CPU/infer E / Ferry |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for model, r in results["models"].items():
        for c in r["cases"]:
            e, f = c["echo"], c["ferry"]
            rounds = ", ".join(f"{x:.2f}" for x in c["ferry_over_echo_per_round"])
            cpu = (f"{e['server_cpu_us_per_infer']:.0f} / {f['server_cpu_us_per_infer']:.0f}"
                   if "server_cpu_us_per_infer" in e and "server_cpu_us_per_infer" in f else "n/a")  # fmt: skip
            lines.append(
                f"| {model} | {c['mode']} | {c['concurrency']} | {_n(e['infer_per_s'])} | {_n(f['infer_per_s'])} "
                f"| **{c['ferry_over_echo']:.2f}** ({rounds}) | {c['ferry_over_raw_b1']:.2f} "
                f"| {e['p50_us']:,.0f} / {e['p99_us']:,.0f} | {f['p50_us']:,.0f} / {f['p99_us']:,.0f} | {cpu} |"
            )
    lines += [
        "",
        "**Where Ferry's time goes** (µs per request, mean; server-side stages from Ferry's `ModelStatistics`; "
        "*outside* = perf_analyzer's average latency minus Ferry's `infer()` time: gRPC, HTTP/2, the event loop, "
        "the client):",
        "",
        "| model | mode | conc. | client avg | `infer()` | decode | executor queue | onnxruntime | encode | outside "
        "| E client avg |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for model, r in results["models"].items():
        for c in r["cases"]:
            f, b = c["ferry"], c["ferry"].get("server_us")
            if not b:
                continue
            lines.append(
                f"| {model} | {c['mode']} | {c['concurrency']} | {f['avg_us']:,.0f} | {b['success']:,.0f} "
                f"| {b['compute_input']:.0f} | {b['queue']:,.0f} | {b['compute_infer']:,.0f} "
                f"| {b['compute_output']:.0f} | {f['avg_us'] - b['success']:,.0f} | {c['echo']['avg_us']:,.0f} |"
            )
    return "\n".join(lines)


def _command(argv: Sequence[str]) -> str:
    python = Path(sys.executable)
    with contextlib.suppress(ValueError):
        python = python.relative_to(Path.cwd())
    return shlex.join([str(python), "-m", "loadtest.bench", *argv])


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, default=ROOT / "examples" / "models", help="model repository")
    parser.add_argument("--out", type=Path, default=Path("bench-out"), help="folder for results.json and logs")
    parser.add_argument("--quick", action="store_true", help="short windows, one round: a smoke run")
    parser.add_argument("--doc", type=Path, help="file whose bench:core section to rewrite "
                        "(default BENCHMARKS.md; a --quick run writes none unless given)")  # fmt: skip
    args = parser.parse_args(argv)
    ok, why = perf_analyzer.usable()
    if not ok:
        print(f"bench: {why}", file=sys.stderr)
        return 2
    settings = Settings.quick() if args.quick else Settings()
    doc = args.doc or (None if args.quick else ROOT / "BENCHMARKS.md")
    models = args.models.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "command": _command(argv),
        "perf_analyzer": _perf_analyzer_version(),
        "settings": asdict(settings),
        "models": {},
    }
    with (args.out / "servers.log").open("w") as log, serving("ferry", ferry_command(models), "ferry ready:", log) as f:
        for model in MODELS:
            print(f"{model}:", flush=True)
            results["models"][model] = bench_model(models, model, f, settings, log)
    results["duration_s"] = time.perf_counter() - started
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    section = render(results)
    print(section)
    if doc is not None:
        doc.write_text(replace_section(doc.read_text() if doc.exists() else "", section))
        print(f"bench: wrote {args.out / 'results.json'} and {doc}")
    return 0


def _perf_analyzer_version() -> str:
    path = perf_analyzer.binary()
    if path is None:
        return "unknown"
    proc = subprocess.run([str(path), "--version"], capture_output=True, text=True, env=perf_analyzer.environment())
    found = re.search(r"Version (\S+)", proc.stdout)
    return found.group(1) if found else "unknown"


if __name__ == "__main__":
    sys.exit(main())

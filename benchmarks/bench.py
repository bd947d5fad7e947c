"""``make bench``: Ferry against its two ceilings, measured in one run, recorded as ratios.

- raw onnxruntime in this process (:mod:`benchmarks.raw_ort`), rows/s at batch 1, 16 and 64: the compute ceiling;
- a bare ``grpc.aio`` echo server (:mod:`benchmarks.echo`) under ``perf_analyzer``: the per-request ceiling E;
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
import math
import os
import queue
import re
import shlex
import shutil
import signal
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

from benchmarks import perf_analyzer, raw_ort
from ferry.client._proto import grpc_service_pb2 as pb
from ferry.client._proto import grpc_service_pb2_grpc as pb_grpc
from ferry.client.tensors import DATATYPES

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- bench:core:start -->", "<!-- bench:core:end -->"
MODELS = ("mlp", "tiny")
CONCURRENCY = (1, 8, 32)
STREAM_CONCURRENCY = 8
RAW_BATCHES = (1, 16, 64)
READY_TIMEOUT_S = 120
STOP_TIMEOUT_S = 20
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

    def perf_timeout_s(self) -> float:
        """A perf_analyzer run lasts about (trials + 1) windows; a server that stops answering fails the run."""
        return 60 + 4 * self.trials * self.measurement_ms / 1000

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
def serving(
    name: str,
    cmd: Sequence[str],
    ready_prefix: str,
    log: IO[str],
    env: dict[str, str] | None = None,
    cwd: Path = ROOT,
    address: str = "grpc",
) -> Iterator[Running]:
    """Start ``cmd`` in its own process group, wait for ``READY_PREFIX ... grpc=HOST:PORT`` on its stdout (copied to
    ``log``, as its stderr is; ``address="http"``: ``http=HOST:PORT``, the address yielded), and in ``finally`` stop
    it: SIGTERM, wait, then SIGKILL to whatever is left of its group."""
    log.write(f"=== {name}: {shlex.join(cmd)}\n")
    log.flush()
    proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd, env=env,
                            start_new_session=True)  # fmt: skip
    assert proc.stdout is not None
    lines: queue.Queue[str | None] = queue.Queue()
    drain = threading.Thread(target=_drain, args=(proc.stdout, lines, log), name=f"{name}-stdout", daemon=True)
    drain.start()
    try:
        yield Running(name, proc.pid, _await_ready(name, lines, ready_prefix, address))
    finally:
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # its workers, if any outlived it (the group is the one it leads)
        drain.join(5)
        proc.stdout.close()


def _drain(stdout: IO[str], lines: queue.Queue[str | None], log: IO[str]) -> None:
    """Keep reading, so that a chatty server never blocks on a full pipe; None marks the end."""
    for line in stdout:
        log.write(line)
        lines.put(line)
    log.flush()
    lines.put(None)


def _await_ready(name: str, lines: queue.Queue[str | None], prefix: str, address: str = "grpc") -> str:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while (left := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=left)
        except queue.Empty:
            break
        if line is None:
            raise RuntimeError(f"{name} exited before it was ready (its output is in the servers log)")
        found = re.search(rf"\b{address}=([\w.\-]+:\d+)", line)
        if line.startswith(prefix) and found:
            return found.group(1)
    raise RuntimeError(f"{name} printed no ready line within {READY_TIMEOUT_S}s")


def batched_copy(models: Path, into: Path, names: Sequence[str]) -> Path:
    """A repository at ``into`` holding copies of the ``names`` models of ``models``, each with ``dynamic_batching
    { }`` added to its config.pbtxt unless it has the block already (Ferry's batching with its defaults)."""
    for name in names:
        shutil.copytree(models / name, into / name)
        pbtxt = into / name / "config.pbtxt"
        text = pbtxt.read_text() if pbtxt.exists() else ""
        if "dynamic_batching" not in text:
            pbtxt.write_text(text.rstrip("\n") + "\ndynamic_batching { }\n")
    return into


def ferry_command(models: Path) -> list[str]:
    """``ferry serve`` (the same entry point as the console script), gRPC on a free port, HTTP off."""
    return [sys.executable, "-m", "ferry.server", "serve", "--model-repository", str(models), "--host", "127.0.0.1",
            "--grpc-port", "0", "--http-port", "-1", "--log-level", "WARNING"]  # fmt: skip


def echo_command(models: Path, model: str) -> list[str]:
    return [sys.executable, "-m", "benchmarks.echo", "--model-repository", str(models), "--model", model,
            "--host", "127.0.0.1", "--port", "0"]  # fmt: skip


def h2echo_command(models: Path, model: str) -> list[str]:
    """The echo server's answers over HTTP/2 written by hand (``benchmarks/h2echo.py``): what grpcio costs."""
    return [sys.executable, "-m", "benchmarks.h2echo", "--model-repository", str(models), "--model", model,
            "--host", "127.0.0.1", "--port", "0"]  # fmt: skip


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process, all threads (Linux /proc), or None where unreadable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def ferry_stats(address: str, model: str) -> dict[str, int]:
    """Ferry's cumulative ModelStatistics for ``model``: requests, executions, rows, and ns per stage."""
    with grpc.insecure_channel(address) as channel:
        reply = pb_grpc.GRPCInferenceServiceStub(channel).ModelStatistics(
            pb.ModelStatisticsRequest(name=model), timeout=10
        )
    out = {"count": 0, "executions": 0, "rows": 0, "success_ns": 0, **{f"{p}_ns": 0 for p in STAT_PARTS}}
    for version in reply.model_stats:
        s = version.inference_stats
        out["count"] += s.success.count
        out["executions"] += version.execution_count
        out["rows"] += version.inference_count
        out["success_ns"] += s.success.ns
        for part in STAT_PARTS:
            out[f"{part}_ns"] += getattr(s, part).ns
    return out


def stage_times(before: dict[str, int], after: dict[str, int]) -> dict[str, float] | None:
    """Triton's statistics semantics: ``success`` and ``queue`` are per request, ``compute_*`` per model
    execution (one batch). ``loop_rest`` is what a request spends in Ferry's infer() besides waiting in the queue
    and its batch's execution: decoding, encoding, handing the batch to the worker thread and back."""
    d = {k: after[k] - before[k] for k in after}
    if d["count"] <= 0 or d["executions"] <= 0:
        return None
    us = {"success": d["success_ns"] / d["count"] / 1e3, "queue": d["queue_ns"] / d["count"] / 1e3}
    for part in STAT_PARTS[1:]:
        us[part] = d[f"{part}_ns"] / d["executions"] / 1e3
    us["rows_per_execution"] = d["rows"] / d["executions"]
    us["loop_rest"] = us["success"] - us["queue"] - sum(us[p] for p in STAT_PARTS[1:])
    return us


def check_answers(server: Running, model: str, timeout_s: float = 20) -> None:
    """One ModelInfer of one row of zeros, so that a server that does not answer fails fast and says so."""
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        try:
            meta = stub.ModelMetadata(pb.ModelMetadataRequest(name=model), timeout=timeout_s, wait_for_ready=True)
            request = pb.ModelInferRequest(model_name=model, id="bench-check")
            for t in meta.inputs:
                shape = [1 if d < 0 else d for d in t.shape]
                request.inputs.add(name=t.name, datatype=t.datatype, shape=shape)
                request.raw_input_contents.append(bytes(math.prod(shape) * DATATYPES[t.datatype].itemsize))
            reply = stub.ModelInfer(request, timeout=timeout_s)
        except grpc.RpcError as err:
            raise RuntimeError(f"{server.name} at {server.address} did not answer {model}: {err}") from None
    if reply.id != "bench-check" or len(reply.raw_output_contents) != len(meta.outputs):
        raise RuntimeError(f"{server.name} at {server.address} answered {model} wrongly: {reply}")


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
                              measurement_ms=settings.measurement_ms, extra=settings.perf_extra(),
                              timeout_s=settings.perf_timeout_s())  # fmt: skip
    wall_s, cpu1 = time.perf_counter() - t0, cpu_seconds(server.pid)
    if len(steps) != 1:
        raise RuntimeError(f"perf_analyzer reported {len(steps)} steps for concurrency {concurrency}")
    step = steps[0]
    result: dict[str, Any] = {"server": server.name, **asdict(step), "wall_s": round(wall_s, 3)}
    # Closed loop: mean latency = concurrency / throughput (Little's law). perf_analyzer's own average is a sum of
    # parts that needs server statistics, which the echo server does not offer.
    result["mean_latency_us"] = concurrency / step.infer_per_s * 1e6 if step.infer_per_s > 0 else float("nan")
    # perf_analyzer keeps the load on for its whole run, so requests ~ infer/s x wall time (within a few % of
    # Ferry's exact count); the server is idle outside the run, so its CPU time belongs to those requests.
    served = step.infer_per_s * wall_s
    result["served_estimate"] = round(served)
    if stats and before_stats is not None:
        after = stats()
        served = result["server_count"] = after["count"] - before_stats["count"]
        stages = stage_times(before_stats, after)
        if stages is not None:
            result["server_us"] = stages
    if cpu0 is not None and cpu1 is not None and served > 0:
        result["server_cpu_s"] = round(cpu1 - cpu0, 3)
        result["server_cpu_us_per_infer"] = (cpu1 - cpu0) / served * 1e6
    print(f"  {server.name:5} {model:4} {'stream' if streaming else 'unary':6} c={concurrency:<3} "
          f"{step.infer_per_s:9.1f} infer/s  p50 {step.p50_us:7.0f} µs  p99 {step.p99_us:7.0f} µs",
          flush=True)  # fmt: skip
    return result


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The mean of repeated runs of one server in one case."""
    keys = ("infer_per_s", "p50_us", "p99_us", "mean_latency_us", "server_cpu_us_per_infer")
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
        check_answers(echo, model)
        check_answers(ferry, model)
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
    load = results.get("load_average_1m", {"start": float("nan"), "end": float("nan")})
    lines = [
        f"Measured {results['date']} on {m['nproc']} CPUs ({m['cpu']}), Python {m['python']}, "
        f"perf_analyzer {results['perf_analyzer']} on the same machine, batch 1, random FP32 input.",
        "",
        f"Command: `{results['command']}` ({results['duration_s']:.0f} s; 1-minute load average "
        f"{load['start']:.1f} at the start, {load['end']:.1f} at the end). perf_analyzer: "
        f"`--measurement-interval {s['measurement_ms']} --max-trials {s['trials']} --stability-percentage 999` "
        f"(each figure is the mean of {s['trials']} windows), {s['rounds']} round(s) per case, echo and Ferry back "
        "to back, their order alternating by round (E F, F E); figures are means over rounds. Both servers run "
        "with their defaults on uvloop, in their own process. Ratios compare figures from this run only; "
        "*raw b1* is raw onnxruntime's batch-1 rows/s.",
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
        "**Ferry against the bare grpc.aio echo server E** (perf_analyzer, infer/s; latencies in µs):",
        "",
        "| model | mode | conc. | E infer/s | Ferry infer/s | Ferry ÷ E (per round) | Ferry ÷ raw b1 "
        "| E p50 / p99 | Ferry p50 / p99 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for model, r in results["models"].items():
        for c in r["cases"]:
            e, f = c["echo"], c["ferry"]
            rounds = ", ".join(f"{x:.2f}" for x in c["ferry_over_echo_per_round"])
            lines.append(
                f"| {model} | {c['mode']} | {c['concurrency']} | {_n(e['infer_per_s'])} | {_n(f['infer_per_s'])} "
                f"| **{c['ferry_over_echo']:.2f}** ({rounds}) | {c['ferry_over_raw_b1']:.2f} "
                f"| {e['p50_us']:,.0f} / {e['p99_us']:,.0f} | {f['p50_us']:,.0f} / {f['p99_us']:,.0f} |"
            )
    lines += [
        "",
        "**Where the time goes** (µs, means). *Mean latency* is concurrency ÷ throughput (closed loop). The "
        "Ferry columns come from its `ModelStatistics` (Triton's semantics): `infer()` is a request's whole time in "
        "Ferry's `infer()`, *queue* its wait for a batch to start; *input*, *run* and *output* are per model "
        "execution (gather, onnxruntime, split, in the worker thread; rows/exec. is the mean batch); *loop rest* "
        "is `infer()` minus queue and execution: decode, encode, the hand-off to the worker thread and back. "
        "*Outside* is Ferry's mean latency minus `infer()`: gRPC and HTTP/2 in both processes, waiting for the "
        "event loop, the client. *Server CPU* is the server process's CPU time (all threads, /proc) per request "
        "(Ferry's exact count; E's estimated as throughput times run time).",
        "",
        "| model | mode | conc. | mean latency E / Ferry | Ferry `infer()` | queue | input | run | output "
        "| rows/exec. | loop rest | outside | server CPU E / Ferry |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for model, r in results["models"].items():
        for c in r["cases"]:
            e, f, b = c["echo"], c["ferry"], c["ferry"].get("server_us")
            if not b:
                continue
            cpu = (f"{e['server_cpu_us_per_infer']:,.0f} / {f['server_cpu_us_per_infer']:,.0f}"
                   if "server_cpu_us_per_infer" in e and "server_cpu_us_per_infer" in f else "n/a")  # fmt: skip
            lines.append(
                f"| {model} | {c['mode']} | {c['concurrency']} | {e['mean_latency_us']:,.0f} / "
                f"{f['mean_latency_us']:,.0f} | {b['success']:,.0f} | {b['queue']:,.0f} | {b['compute_input']:.0f} "
                f"| {b['compute_infer']:,.0f} | {b['compute_output']:.0f} | {b['rows_per_execution']:.2f} "
                f"| {b['loop_rest']:,.0f} | {f['mean_latency_us'] - b['success']:,.0f} | {cpu} |"
            )
    return "\n".join(lines)


def _command(argv: Sequence[str]) -> str:
    python = Path(sys.executable)
    with contextlib.suppress(ValueError):
        python = python.relative_to(Path.cwd())
    return shlex.join([str(python), "-m", "benchmarks.bench", *argv])


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__.split("\n\n")[0])
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
    started, load_start = time.perf_counter(), os.getloadavg()[0]
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
    results["load_average_1m"] = {"start": load_start, "end": os.getloadavg()[0]}
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
    found = re.search(r"Version (\S+)", proc.stdout + proc.stderr)
    return found.group(1) if found else "unknown"


if __name__ == "__main__":
    sys.exit(main())

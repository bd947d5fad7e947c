"""``ferry serve --workers N``: throughput and server CPU per request against ``--workers 1``, in one run.

    python -m benchmarks.bench_workers --models examples/models --out bench-out/workers [--workers 1,2]
        [--rounds 4] [--concurrency 16] [--processes 2] [--duration 5] [--model tiny]

Each round serves the model with every ``--workers`` count in turn (the order rotates by round, so no count is
always first), and drives it with ``ferry loadtest`` (closed loop, ``--concurrency`` calls in flight spread over
``--processes`` generator processes, each with its own connections, so the kernel can spread them over workers).
Per run: requests per second, and the CPU seconds the server's processes (supervisor and workers: /proc) spent per
request. Ratios are taken per round against the first count, then the median over rounds. The load generator runs
on the same machine: on a machine with C cores, N workers and the generator share them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.bench import cpu_seconds, ferry_command, machine, serving


def process_tree(pid: int) -> list[int]:
    """``pid`` and its children (the workers; Linux /proc)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    return [pid, *(int(child) for child in children)]


def tree_cpu(pids: Sequence[int]) -> float:
    return sum(cpu_seconds(pid) or 0.0 for pid in pids)


def run_once(models: Path, workers: int, args: argparse.Namespace, out: Path, log: Any) -> dict[str, Any]:
    command = [*ferry_command(models), "--workers", str(workers), "--drain-delay-s", "0"]
    with serving(f"ferry-w{workers}", command, "ferry ready:", log) as server:
        time.sleep(0.5)  # the workers' first connections and numba's first calls are not the measure
        pids = process_tree(server.pid)
        report_dir = out / f"w{workers}-{time.time_ns()}"
        load = [sys.executable, "-m", "ferry.server", "loadtest", "--target", server.address, "--model", args.model]
        load += ["--concurrency", str(args.concurrency), "--processes", str(args.processes)]
        load += ["--duration", str(args.duration), "--warmup", "1", "--out", str(report_dir), "--progress", "plain"]
        cpu_before = tree_cpu(pids)
        done = subprocess.run(load, capture_output=True, text=True, timeout=args.duration * 4 + 120)
        cpu_after = tree_cpu(pids)
        log.write(done.stdout + done.stderr)
        if done.returncode != 0:
            raise RuntimeError(f"loadtest failed: {done.stderr[-2000:]}")
        step = json.loads((report_dir / "report.json").read_text())["steps"][0]
        sent = int(step["sent"])
        return {
            "workers": workers,
            "rps": float(step["throughput_rps"]),
            "errors": int(step["requests"]) - int(step["ok"]),
            "cpu_us_per_request": (cpu_after - cpu_before) / sent * 1e6 if sent else None,
            "sent": sent,
        }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--workers", default="1,2", help="worker counts, the first the baseline")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--model", default="tiny")
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.workers.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []
    with (args.out / "servers.log").open("w") as log:
        for round_ in range(args.rounds):
            order = counts[round_ % len(counts) :] + counts[: round_ % len(counts)]
            for workers in order:
                result = run_once(args.models, workers, args, args.out, log) | {"round": round_}
                runs.append(result)
                print(json.dumps(result), flush=True)
    base = counts[0]
    summary: dict[str, Any] = {
        "machine": machine(),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "runs": runs,
    }
    table = []
    for workers in counts:
        mine = [r for r in runs if r["workers"] == workers]
        ratios = [
            r["rps"] / b["rps"]
            for r in mine
            for b in runs
            if b["workers"] == base and b["round"] == r["round"] and b["rps"]
        ]
        cpu = [r["cpu_us_per_request"] for r in mine if r["cpu_us_per_request"]]
        row = {
            "workers": workers,
            "rps_median": statistics.median(r["rps"] for r in mine),
            "ratio_median": statistics.median(ratios),
            "ratio_range": [min(ratios), max(ratios)],
            "cpu_us_per_request_median": statistics.median(cpu) if cpu else None,
            "errors": sum(r["errors"] for r in mine),
        }
        table.append(row)
        print(
            f"workers={workers}: {row['rps_median']:,.0f} req/s, ÷ workers={base} {row['ratio_median']:.2f} "
            f"({row['ratio_range'][0]:.2f}-{row['ratio_range'][1]:.2f}), server CPU "
            f"{row['cpu_us_per_request_median']:.0f} µs/request, errors {row['errors']}"
        )
    summary["table"] = table
    (args.out / "results.json").write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

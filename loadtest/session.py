"""One ``ferry loadtest`` run: describe the model, build the workload, run the sweep and the capacity search,
plan replicas, and write every report (also after Ctrl-C, with the steps measured so far)."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import shlex
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import grpc

from ferry.loadtest import capacity, plots, report, serverview, workload
from ferry.loadtest.progress import Progress, make_progress
from ferry.loadtest.rest import RestStub
from ferry.loadtest.runner import LoadTest, RunConfig
from ferry.loadtest.steps import StepResult, StepSpec

PROBE_CONCURRENCY = 8
START_FRACTION = 0.8  # the search starts at this share of the best throughput seen: usually one step from the knee


def machine() -> str:
    cpu = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs ({cpu}), Python {platform.python_version()}"


def command_line() -> str:
    if Path(sys.argv[0]).name == "ferry":
        return "ferry " + shlex.join(sys.argv[1:])
    return shlex.join(sys.argv)


def parse_metadata(items: list[str]) -> tuple[tuple[str, str], ...]:
    """``--metadata KEY=VALUE`` values as gRPC metadata pairs (keys lowercased, as HTTP/2 requires)."""
    pairs = []
    for item in items:
        key, equals, value = item.partition("=")
        if not equals or not key.strip():
            raise ValueError(f"--metadata {item!r}: expected KEY=VALUE")
        pairs.append((key.strip().lower(), value))
    return tuple(pairs)


class Session:
    def __init__(self, args: argparse.Namespace, model: workload.ModelSpec, load: workload.Workload) -> None:
        self.args = args
        self.model = model
        self.workload = load
        self.out = Path(args.out)
        self.steps: list[StepResult] = []
        self.notes: list[str] = list(load.notes)
        self.search: capacity.Search | None = None
        self.started = datetime.datetime.now(datetime.UTC)
        warmup = args.warmup if args.warmup is not None else min(1.0, 0.2 * args.duration)
        self.config = RunConfig(
            target=args.target, model=args.model, version=args.version, mode=args.mode, processes=args.processes,
            warmup_s=warmup, duration_s=args.duration, timeout_s=args.timeout, max_requests=args.max_requests,
            seed=args.seed, client=args.client if args.protocol == "grpc" else f"http-{args.http_data}",
            metadata=parse_metadata(getattr(args, "metadata", None) or []),
        )  # fmt: skip

    @classmethod
    def open(cls, args: argparse.Namespace) -> Session:
        """Ask the server about the model and prepare every request (raises ValueError, ConnectionError)."""
        metadata = parse_metadata(getattr(args, "metadata", None) or [])
        with contextlib.ExitStack() as stack:
            channel: grpc.Channel | RestStub
            if args.protocol == "http":
                channel = RestStub(args.target)
            else:
                channel = serverview.with_metadata(stack.enter_context(grpc.insecure_channel(args.target)), metadata)
            try:
                spec = serverview.describe_model(channel, args.model, args.version)
            except grpc.RpcError as err:
                raise ConnectionError(f"{args.target}: cannot describe model {args.model!r}: "
                                      f"{err.code().name} {err.details()}") from None  # fmt: skip
        rows = workload.parse_rows(args.rows, spec.max_batch_size)
        load = workload.build(spec, rows, args.inputs, duplicate_fraction=args.duplicate_fraction, seed=args.seed)
        return cls(args, spec, load)

    def run(self, levels: list[float] | None, rates: list[float] | None) -> int:
        progress = make_progress(self.args.progress)
        status = 0
        try:
            with LoadTest(self.config, self.workload) as lt:
                for c in levels or []:
                    self._step(lt, StepSpec("closed", concurrency=int(c)), progress)
                for r in rates or []:
                    self._step(lt, StepSpec("open", rate=r, poisson=self.args.poisson), progress)
                if self.args.capacity:
                    self._capacity(lt, progress)
        except KeyboardInterrupt:
            self.notes.append("Interrupted: the report holds the steps measured before Ctrl-C.")
            status = 130
        except (RuntimeError, TimeoutError) as err:
            self.notes.append(f"Stopped early: {err}")
            progress.message(f"ferry loadtest: {err}")
            status = 1
        finally:
            progress.close()
        paths = self.write()
        print(f"ferry loadtest: wrote {', '.join(str(p) for p in paths)}", file=sys.stderr)
        return status

    def _step(self, lt: LoadTest, spec: StepSpec, progress: Progress) -> StepResult:
        progress.start_step(
            f"[{len(self.steps)}] {spec.phase} {spec.label()}", self.config.warmup_s + self.config.duration_s
        )
        result = lt.run_step(spec, progress.update)
        if self.args.slo_p99_ms is not None or spec.loop == "open":
            result.stable, result.unstable_because = capacity.judge(result, self.args.slo_p99_ms,
                                                                    self.args.max_error_rate)  # fmt: skip
        self.steps.append(result)
        progress.end_step(result)
        return result

    def _capacity(self, lt: LoadTest, progress: Progress) -> None:
        a = self.args
        start = a.capacity_start_rps
        if start is None:
            seen = [s.throughput_rps for s in self.steps if s.ok]
            if not seen:
                seen = [self._step(lt, StepSpec("closed", concurrency=PROBE_CONCURRENCY, phase="probe"), progress)
                        .throughput_rps]  # fmt: skip
            start = max(max(seen) * START_FRACTION, 1.0)
        progress.message(f"capacity search from {start:,.0f}/s: p99 <= {a.slo_p99_ms:g} ms, errors <= "
                         f"{a.max_error_rate:.2%}")  # fmt: skip

        def measure(rate: float) -> StepResult:
            return self._step(lt, StepSpec("open", rate=round(rate, 1), poisson=a.poisson, phase="capacity"), progress)

        self.search = capacity.search(measure, start, a.slo_p99_ms, a.max_error_rate, tolerance=a.tolerance,
                                      max_steps=a.max_steps, max_rps=a.max_rps)  # fmt: skip

    # --- reports ---------------------------------------------------------------------------------------------

    def settings(self) -> dict[str, Any]:
        a, c = self.args, self.config
        return {
            "mode": c.mode, "processes": c.processes, "duration_s": c.duration_s, "warmup_s": c.warmup_s,
            "timeout_s": c.timeout_s, "max_requests": c.max_requests, "rows": a.rows, "inputs": a.inputs,
            "duplicate_fraction": a.duplicate_fraction, "poisson": a.poisson, "slo_p99_ms": a.slo_p99_ms,
            "max_error_rate": a.max_error_rate, "seed": a.seed, "client": c.client,
        }  # fmt: skip

    def knee(self) -> tuple[float, float] | None:
        """Over the open-loop steps the server kept up with: where it fell behind, the queue grew for the whole
        window, so the latency measured there says how long the window was, not where the curve bends."""
        opened = [s for s in self.steps if s.loop == "open" and s.ok and capacity.keeps_up(s)]
        chosen = opened or [s for s in self.steps if s.ok]
        return capacity.knee([(s.x_rate, s.p99_ms) for s in chosen])

    def write(self) -> list[Path]:
        self.out.mkdir(parents=True, exist_ok=True)
        knee = self.knee()
        cap = self.search.capacity_rps if self.search else None
        self._lag_notes()
        title = f"{self.model.name} · {self.config.mode} · {self.config.processes} generator process(es)"
        plot_paths = plots.write_plots(self.out, self.steps, title=title, slo_p99_ms=self.args.slo_p99_ms,
                                       capacity_rps=cap, knee=knee)  # fmt: skip
        data: dict[str, Any] = {
            "format": "ferry-loadtest/1",
            "started_at": self.started.strftime("%Y-%m-%d %H:%M UTC"),
            "finished_at": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "command": command_line(),
            "target": self.args.target,
            "machine": machine(),
            "model": asdict(self.model),
            "settings": self.settings(),
            "latency_note": report.LATENCY_NOTE,
            "steps": [s.to_dict() for s in self.steps],
            "capacity": None,
            "plan": None,
            "plots": [p.name for p in plot_paths],
            "notes": self.notes,
        }
        if self.search is not None:
            data["capacity"] = self.search.to_dict()
            data["capacity"]["knee"] = {"rate_rps": knee[0], "p99_ms": knee[1]} if knee else None
            if cap and self.args.target_peak_rps is not None:
                data["plan"] = capacity.plan(cap, self.args.target_peak_rps, self.args.headroom,
                                             self.model.instance_count)  # fmt: skip
                data["plan"]["assumptions"] = capacity.assumptions(data["model"], data["settings"], data["machine"])
        return report.write_all(self.out, data, self.steps) + plot_paths

    def _lag_notes(self) -> None:
        behind = [s for s in self.steps if s.loop == "open" and s.ok and s.send_lag_ms["p99"] > max(1.0, s.p99_ms / 4)]
        if behind:
            worst = max(behind, key=lambda s: s.send_lag_ms["p99"])
            self.notes.append(
                f"The generator sent late in step(s) {', '.join(str(s.index) for s in behind)} (worst send lag p99 "
                f"{worst.send_lag_ms['p99']:.3g} ms, step {worst.index}); those latencies include the lag. More "
                "--processes, or a machine with idle cores, measures the server rather than the generator."
            )
        capped = [s.index for s in self.steps if s.capped]
        if capped:
            self.notes.append(f"The request cap (--max-requests) stopped step(s) {capped} before the window ended.")

"""Runs steps on a pool of load-generator processes and takes the server's statistics around each window.

The parent process never sends load: it starts ``processes`` workers (``multiprocessing`` with ``spawn``, each
with its own GIL and event loop; :mod:`ferry.loadtest.generator`), hands each its share of a step (concurrency split
evenly, or rate / workers), and while they run it reads their progress, snapshots ``ModelStatistics`` at the start
and end of the measurement window, and finally merges their tallies (:func:`ferry.loadtest.steps.summarize`).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import queue
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from ferry.loadtest import serverview
from ferry.loadtest.generator import CLIENTS, StepPlan, worker_main
from ferry.loadtest.histogram import Histogram
from ferry.loadtest.rest import RestStub
from ferry.loadtest.schedule import split_evenly
from ferry.loadtest.steps import StepResult, StepSpec, summarize
from ferry.loadtest.workload import Workload

START_LEAD_S = 0.25  # between handing out a step and its first request: time for every worker to receive it
READY_TIMEOUT_S = 60


@dataclass(frozen=True, slots=True)
class RunConfig:
    target: str
    model: str
    version: str = ""
    mode: str = "unary"  # "unary" | "stream"
    processes: int = 2
    warmup_s: float = 0.5
    duration_s: float = 5.0
    timeout_s: float = 10.0  # per request; also bounds the drain after each window
    max_requests: int = 1_000_000  # per step, over all workers
    seed: int = 0
    client: str = "wire"  # "wire" (ferry.loadtest.wire) | "grpcio" | "http-binary" | "http-json" (REST)
    metadata: tuple[tuple[str, str], ...] = ()  # sent with every call (e.g. authorization: Bearer ...)

    def __post_init__(self) -> None:
        if self.mode not in ("unary", "stream"):
            raise ValueError(f"mode must be unary or stream, got {self.mode!r}")
        if self.mode == "stream" and self.client.startswith("http-"):
            raise ValueError("REST has no streaming inference: stream mode needs gRPC")
        if self.client not in CLIENTS:
            raise ValueError(f"client must be one of {CLIENTS}, got {self.client!r}")
        if self.processes < 1 or self.duration_s <= 0 or self.warmup_s < 0 or self.timeout_s <= 0:
            raise ValueError("processes >= 1, duration > 0, warmup >= 0 and timeout > 0 are required")
        if self.max_requests < 1:
            raise ValueError("max_requests must be >= 1")


ProgressFn = Callable[[float, float, float, int], None]
"""Called about twice a second during a step: (seconds into the step, answers/s, recent p99 ms, errors so far)."""


class LoadTest:
    """A pool of worker processes connected to the target. Use as a context manager; run steps one at a time."""

    def __init__(self, config: RunConfig, workload: Workload) -> None:
        self.config = config
        self._ctx = mp.get_context("spawn")
        self._messages: Any = self._ctx.Queue()
        self._conns: list[Any] = []
        self._procs: list[Any] = []
        self._channel = (
            RestStub(config.target)
            if config.client.startswith("http-")
            else serverview.with_metadata(grpc.insecure_channel(config.target), config.metadata)
        )
        self._index = 0
        nonce = random.SystemRandom().randrange(1 << 30)  # distinct requests in every run, so caches miss
        for w in range(config.processes):
            parent, child = self._ctx.Pipe()
            proc = self._ctx.Process(
                target=worker_main,
                args=(
                    child,
                    self._messages,
                    config.target,
                    workload,
                    w,
                    nonce,
                    config.seed,
                    config.client,
                    config.metadata,
                ),
                name=f"ferry-loadtest-{w}",
                daemon=True,
            )
            proc.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(proc)
        ready = 0
        deadline = time.monotonic() + READY_TIMEOUT_S
        while ready < config.processes:
            kind, worker, _, data = self._get(deadline)
            if kind == "ready":
                ready += 1
            elif kind == "error":
                self.close()
                raise RuntimeError(f"load generator {worker} could not start: {data}")

    def __enter__(self) -> LoadTest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.send(None)
        for proc in self._procs:
            proc.join(10)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
        self._conns, self._procs = [], []
        self._channel.close()

    def cpu_seconds(self) -> float | None:
        """CPU time (user + system) the worker processes have used so far; None where /proc is missing."""
        total = 0.0
        tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        for proc in self._procs:
            try:
                fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                return None
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime (fields 14 and 15 of stat)
        return total

    def _get(self, deadline: float) -> tuple[str, int, int, Any]:
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError("load generator processes stopped answering")
            try:
                item: tuple[str, int, int, Any] = self._messages.get(timeout=0.1)
                return item
            except queue.Empty:
                if any(not p.is_alive() for p in self._procs):
                    raise RuntimeError("a load generator process died") from None

    def run_step(self, spec: StepSpec, progress: ProgressFn | None = None) -> StepResult:
        """Run one step on every worker and return its merged result (with the server's view)."""
        cfg = self.config
        n = cfg.processes
        start_wall = time.time() + START_LEAD_S
        slots = split_evenly(spec.concurrency, n) if spec.loop == "closed" else [0] * n
        caps = split_evenly(cfg.max_requests, n)
        for w, conn in enumerate(self._conns):
            conn.send(StepPlan(
                index=self._index, loop=spec.loop, mode=cfg.mode, start_wall=start_wall, warmup_s=cfg.warmup_s,
                duration_s=cfg.duration_s, timeout_s=cfg.timeout_s, max_requests=max(caps[w], 1),
                concurrency=slots[w], rate=spec.rate, poisson=spec.poisson, worker=w, workers=n,
                seed=cfg.seed + 7919 * self._index,
            ))  # fmt: skip
        window_start = start_wall + cfg.warmup_s
        window_end = window_start + cfg.duration_s
        deadline = time.monotonic() + (window_end - time.time()) + cfg.timeout_s + 30
        before = after = None
        results: dict[int, dict[str, Any]] = {}
        done = [0] * n
        errors = [0] * n
        recent: list[Histogram] = []
        last_tick, last_done = time.time(), 0
        while len(results) < n:
            now = time.time()
            if before is None and now >= window_start:
                before = serverview.snapshot(self._channel, cfg.model, cfg.version)
            if after is None and now >= window_end:
                after = serverview.snapshot(self._channel, cfg.model, cfg.version)
            try:
                kind, worker, step, data = self._messages.get(timeout=0.05)
            except queue.Empty:
                if any(not p.is_alive() for p in self._procs):
                    raise RuntimeError("a load generator process died") from None
                if time.monotonic() > deadline:
                    raise TimeoutError(f"step {self._index} did not finish") from None
                continue
            if kind == "error":
                raise RuntimeError(f"load generator {worker} failed: {data}")
            if step != self._index:
                continue  # a late progress message of an earlier step
            if kind == "result":
                results[worker] = data
            elif kind == "progress":
                done[worker], errors[worker] = data[0], data[1]
                recent.append(Histogram.from_dict(data[2]))
                if progress is not None and now - last_tick >= 0.45:
                    total = sum(done)
                    p99 = Histogram.merged(recent).percentile(99) / 1e6
                    progress(now - start_wall, (total - last_done) / (now - last_tick), p99, sum(errors))
                    last_tick, last_done, recent = now, total, []
        if after is None:  # the results beat the clock by a hair
            after = serverview.snapshot(self._channel, cfg.model, cfg.version)
        server = serverview.view(after.minus(before)) if before is not None and after is not None else None
        result = summarize(self._index, spec, cfg.mode, [results[w] for w in range(n)], cfg.duration_s, server)
        self._index += 1
        return result

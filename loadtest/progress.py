"""Live progress: a rich progress bar with the current rate, p99 and errors on a terminal, plain lines otherwise."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from ferry.loadtest.steps import StepResult

PLAIN_EVERY_S = 1.0


class PlainProgress:
    """One line a second while a step runs and one when it ends: readable in CI logs and pipes."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self._label = ""
        self._last = 0.0

    def start_step(self, label: str, total_s: float) -> None:
        self._label, self._last = label, 0.0
        self._print(f"step {label}: {total_s:.1f} s")

    def update(self, elapsed_s: float, rate: float, p99_ms: float, errors: int) -> None:
        now = time.monotonic()
        if now - self._last >= PLAIN_EVERY_S:
            self._last = now
            self._print(f"  {self._label}: {elapsed_s:5.1f} s  {rate:8.1f}/s  p99 {p99_ms:8.2f} ms  errors {errors}")

    def end_step(self, result: StepResult) -> None:
        self._print(f"  {self._label}: {end_line(result)}")

    def message(self, text: str) -> None:
        self._print(text)

    def close(self) -> None:
        pass

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)


class RichProgress:
    """A rich progress bar per step, its description showing live rate, p99 and errors."""

    def __init__(self, stream: TextIO | None = None) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = Console(file=stream or sys.stderr)
        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                                  console=self.console, transient=True)  # fmt: skip
        self._progress.start()
        self._task: Any = None
        self._label = ""

    def start_step(self, label: str, total_s: float) -> None:
        self._label = label
        self._task = self._progress.add_task(label, total=total_s)

    def update(self, elapsed_s: float, rate: float, p99_ms: float, errors: int) -> None:
        if self._task is not None:
            text = f"{self._label}  [bold]{rate:,.0f}/s[/]  p99 {p99_ms:.2f} ms  errors {errors}"
            self._progress.update(self._task, completed=elapsed_s, description=text)

    def end_step(self, result: StepResult) -> None:
        if self._task is not None:
            self._progress.remove_task(self._task)
            self._task = None
        self.console.print(f"{self._label}: {end_line(result)}", highlight=False)

    def message(self, text: str) -> None:
        self.console.print(text, highlight=False)

    def close(self) -> None:
        self._progress.stop()


Progress = PlainProgress | RichProgress


def end_line(r: StepResult) -> str:
    verdict = "" if r.stable is None else (" stable" if r.stable else f" UNSTABLE ({'; '.join(r.unstable_because)})")
    errors = f" errors {r.errors}" if r.errors else ""
    return (f"{r.throughput_rps:,.1f}/s, p50 {r.latency_ms['p50']:.2f} ms, p99 {r.p99_ms:.2f} ms"
            f"{errors}{verdict}")  # fmt: skip


def make_progress(kind: str = "auto", stream: TextIO | None = None) -> Progress:
    """``auto``: rich on a terminal, plain lines otherwise; ``rich`` or ``plain`` to choose."""
    stream = stream or sys.stderr
    if kind == "rich" or (kind == "auto" and stream.isatty()):
        try:
            return RichProgress(stream)
        except ImportError:  # pragma: no cover - rich is a dependency
            pass
    return PlainProgress(stream)

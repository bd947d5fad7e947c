"""PNG plots of a run (matplotlib, Agg backend: no display needed).

- ``throughput.png``: achieved requests/s against concurrency for closed-loop steps (with p99 on a second axis), or
  achieved against offered rate for open-loop steps (with the ideal y = x line).
- ``latency.png``: p50/p90/p99/p99.9 against offered rate (open-loop steps; achieved throughput for a closed-loop
  run), with the SLO as a horizontal line and the capacity and knee marked.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ferry.loadtest.steps import StepResult

DPI = 100
SIZE = (7.0, 4.2)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_plots(
    out: Path,
    steps: Sequence[StepResult],
    *,
    title: str,
    slo_p99_ms: float | None = None,
    capacity_rps: float | None = None,
    knee: tuple[float, float] | None = None,
) -> list[Path]:
    """Write both plots into ``out``; returns their paths (none when there are no steps)."""
    if not steps:
        return []
    plt = _pyplot()
    paths = [out / "throughput.png", out / "latency.png"]
    for path, draw in ((paths[0], _throughput), (paths[1], _latency)):
        fig, ax = plt.subplots(figsize=SIZE, dpi=DPI)
        try:
            draw(ax, steps, slo_p99_ms=slo_p99_ms, capacity_rps=capacity_rps, knee=knee)
            ax.set_title(title, fontsize=10)
            fig.tight_layout()
            fig.savefig(path, dpi=DPI)
        finally:
            plt.close(fig)
    return paths


def _throughput(ax: Any, steps: Sequence[StepResult], **_: Any) -> None:
    closed = sorted((s for s in steps if s.loop == "closed"), key=lambda s: s.concurrency or 0)
    if closed:
        levels = [s.concurrency or 0 for s in closed]
        ax.plot(levels, [s.throughput_rps for s in closed], "o-", color="tab:blue", label="requests/s")
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(x) for x in levels])
        ax.set_xlabel("concurrency (requests in flight)")
        ax.set_ylabel("achieved requests/s", color="tab:blue")
        ax.set_ylim(bottom=0)
        twin = ax.twinx()
        twin.plot(levels, [s.p99_ms for s in closed], "s--", color="tab:red", label="p99 latency")
        twin.set_ylabel("p99 latency (ms)", color="tab:red")
        twin.set_ylim(bottom=0)
        for s in closed:  # the batch size the server formed, where it batched
            batch = (s.server or {}).get("mean_batch_size")
            if batch and batch > 1.05:
                ax.annotate(f"batch {batch:.1f}", (s.concurrency, s.throughput_rps), textcoords="offset points",
                            xytext=(0, 7), ha="center", fontsize=7)  # fmt: skip
        handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
        ax.legend(handles, [str(h.get_label()) for h in handles], loc="lower right", fontsize=8)
        ax.grid(alpha=0.3)
        return
    opened = sorted((s for s in steps if s.loop == "open"), key=lambda s: s.offered_rps or 0)
    xs = [s.offered_rps or 0.0 for s in opened]
    ax.plot(xs, [s.throughput_rps for s in opened], "o", color="tab:blue", label="achieved")
    if xs:
        ax.plot([0, max(xs)], [0, max(xs)], ":", color="grey", label="achieved = offered")
    ax.set_xlabel("offered requests/s (open loop)")
    ax.set_ylabel("achieved requests/s")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)


def _latency(
    ax: Any,
    steps: Sequence[StepResult],
    *,
    slo_p99_ms: float | None,
    capacity_rps: float | None,
    knee: tuple[float, float] | None,
) -> None:
    opened = [s for s in steps if s.loop == "open"]
    chosen = sorted(opened or steps, key=lambda s: s.x_rate)
    by_rate: dict[float, list[StepResult]] = {}
    for s in chosen:  # a capacity search measures some rates twice: a line through medians, every point marked
        by_rate.setdefault(round(s.x_rate, 3), []).append(s)
    xs = sorted(by_rate)
    for key, style in (("p50", "o-"), ("p90", "^-"), ("p99", "s-"), ("p99.9", "d-")):
        line = ax.plot(xs, [max(statistics.median(s.latency_ms[key] for s in by_rate[x]), 1e-3) for x in xs], style,
                       markersize=4, label=key)  # fmt: skip
        repeats = [(x, s.latency_ms[key]) for x in xs if len(by_rate[x]) > 1 for s in by_rate[x]]
        if repeats:
            ax.plot(*zip(*repeats, strict=True), style[0], markersize=4, alpha=0.4, color=line[0].get_color())
    ax.set_yscale("log")
    ax.set_xlabel("offered requests/s (open loop)" if opened else "achieved requests/s (closed loop)")
    ax.set_ylabel("latency from intended send (ms)")
    if slo_p99_ms is not None:
        ax.axhline(slo_p99_ms, color="red", linestyle="--", linewidth=1, label=f"SLO p99 {slo_p99_ms:g} ms")
    if capacity_rps is not None:
        ax.axvline(capacity_rps, color="green", linestyle=":", linewidth=1.2, label=f"capacity {capacity_rps:,.0f}/s")
    if knee is not None:
        ax.plot([knee[0]], [knee[1]], "*", color="black", markersize=12, label=f"knee {knee[0]:,.0f}/s")
    ax.legend(loc="best", fontsize=8, framealpha=0.8)
    ax.grid(alpha=0.3, which="both")

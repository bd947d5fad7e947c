"""Writes a run's reports: ``report.json`` (everything), ``steps.csv`` (one row a step), ``summary.md``."""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ferry.loadtest.steps import PERCENTILES, StepResult, pct_key

LATENCY_NOTE = (
    "Latency is measured from each request's *intended* send time. In open-loop steps requests are sent on a fixed "
    "schedule whatever the server does, so time a request waited because the server (or the generator) fell behind "
    "counts against it: coordinated omission does not hide queueing. `service` latency (from the actual send) and "
    "`send lag` (actual - intended) are reported beside it; in closed-loop steps intended = actual send."
)

CSV_COLUMNS = [
    "index", "phase", "loop", "mode", "concurrency", "offered_rps", "poisson", "window_s", "requests", "ok",
    "throughput_rps", "rows_per_s", *(f"{pct_key(q)}_ms" for q in PERCENTILES), "max_ms", "mean_ms",
    "service_p50_ms", "service_p99_ms", "send_lag_p99_ms", "error_rate", "errors", "drift", "capped", "stable",
    "server_request_ms", "server_queue_ms", "server_compute_infer_ms", "server_mean_batch_size",
    "server_cache_hit_rate",
]  # fmt: skip


def write_all(out: Path, report: Mapping[str, Any], steps: Sequence[StepResult]) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "report.json", out / "steps.csv", out / "summary.md"]
    paths[0].write_text(json.dumps(report, indent=2, default=str) + "\n")
    write_csv(paths[1], steps)
    paths[2].write_text(summary(report, steps))
    return paths


def csv_row(s: StepResult) -> dict[str, Any]:
    server = s.server or {}
    row: dict[str, Any] = {
        "index": s.index, "phase": s.phase, "loop": s.loop, "mode": s.mode, "concurrency": s.concurrency,
        "offered_rps": s.offered_rps, "poisson": s.poisson, "window_s": s.window_s, "requests": s.requests,
        "ok": s.ok, "throughput_rps": s.throughput_rps, "rows_per_s": s.rows_per_s,
        "max_ms": s.latency_ms["max"], "mean_ms": s.latency_ms["mean"],
        "service_p50_ms": s.service_ms["p50"], "service_p99_ms": s.service_ms["p99"],
        "send_lag_p99_ms": s.send_lag_ms["p99"], "error_rate": s.error_rate,
        "errors": ";".join(f"{k}={v}" for k, v in s.errors.items()), "drift": s.drift, "capped": s.capped,
        "stable": s.stable,
    }  # fmt: skip
    for q in PERCENTILES:
        row[f"{pct_key(q)}_ms"] = s.latency_ms[pct_key(q)]
    for key in ("request_ms", "queue_ms", "compute_infer_ms", "mean_batch_size", "cache_hit_rate"):
        row[f"server_{key}"] = server.get(key)
    return row


def write_csv(path: Path, steps: Sequence[StepResult]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for s in steps:
            writer.writerow(csv_row(s))


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def steps_table(steps: Sequence[StepResult]) -> list[str]:
    lines = [
        "| # | phase | load | req/s | rows/s | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | send lag p99 ms "
        "| errors | server ms | server queue ms | server compute ms | batch | cache hits | verdict |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for s in steps:
        load = f"c={s.concurrency}" if s.loop == "closed" else f"{s.offered_rps:g}/s{' poisson' if s.poisson else ''}"
        server = s.server or {}
        errors = ", ".join(f"{k} {v}" for k, v in s.errors.items()) or "0"
        verdict = "" if s.stable is None else ("stable" if s.stable else "unstable: " + "; ".join(s.unstable_because))
        hit = server.get("cache_hit_rate")
        lat = s.latency_ms
        lines.append(
            f"| {s.index} | {s.phase} | {load} | {_fmt(s.throughput_rps)} | {_fmt(s.rows_per_s)} | {_fmt(lat['p50'])} "
            f"| {_fmt(lat['p90'])} | {_fmt(lat['p99'])} | {_fmt(lat['p99.9'])} | {_fmt(lat['max'])} "
            f"| {_fmt(s.send_lag_ms['p99'])} | {errors} | {_fmt(server.get('request_ms'))} "
            f"| {_fmt(server.get('queue_ms'))} | {_fmt(server.get('compute_infer_ms'))} "
            f"| {_fmt(server.get('mean_batch_size'))} | {'-' if hit is None else f'{hit:.0%}'} | {verdict} |"
        )
    return lines


def summary(report: Mapping[str, Any], steps: Sequence[StepResult]) -> str:
    settings, model = report["settings"], report["model"]
    lines = [
        f"# Load test: `{model['name']}` at {report['target']}",
        "",
        f"{report['started_at']}, {report['machine']}. Command: `{report['command']}`",
        "",
        f"- Model: `{model['name']}` version {model['version'] or 'latest'}, max_batch_size {model['max_batch_size']}, "
        f"dynamic batching {'on' if model['dynamic_batching'] else 'off'}, response cache "
        f"{'on' if model['response_cache'] else 'off'}, {model['instance_count']} instance(s).",
        f"- Load: {settings['mode']} gRPC from {settings['processes']} process(es); {settings['warmup_s']:g} s warm-up "
        f"+ {settings['duration_s']:g} s measured per step; rows per request {settings['rows']}; inputs "
        f"{settings['inputs']}; duplicate fraction {settings['duplicate_fraction']:g}; request timeout "
        f"{settings['timeout_s']:g} s; at most {settings['max_requests']:,} requests a step.",
        f"- {LATENCY_NOTE}",
        "- Server columns come from `ModelStatistics` deltas over each window: mean time in the server, in its "
        "queue and in compute (per execution), mean batch size (Δinference_count / Δexecution_count), cache hit "
        "rate. A client p99 far above the server's times, with a large send lag, means the machine (or the "
        "generator) stalled, not the model.",
        "",
        "## Steps",
        "",
        *steps_table(steps),
        "",
    ]
    capacity = report.get("capacity")
    if capacity:
        lines += ["## Capacity", "", *capacity_lines(capacity, settings), ""]
    plan = report.get("plan")
    if plan:
        lines += ["## Capacity plan", "", *plan_lines(plan), ""]
    if report.get("plots"):
        lines += ["## Plots", "", *(f"![{Path(p).stem}]({Path(p).name})" for p in report["plots"]), ""]
    if report.get("notes"):
        lines += ["## Notes", "", *(f"- {n}" for n in report["notes"]), ""]
    return "\n".join(lines)


def capacity_lines(c: Mapping[str, Any], settings: Mapping[str, Any]) -> list[str]:
    slo = f"p99 ≤ {settings['slo_p99_ms']:g} ms" if settings.get("slo_p99_ms") is not None else "no latency SLO"
    rule = f"{slo}, error rate ≤ {settings['max_error_rate']:.2%}, answers keeping up with ≥ 95% of the sent rate"
    arrivals = "Poisson" if settings.get("poisson") else "constant-rate"
    out = []
    if c.get("capacity_rps") is None:
        out.append(f"**No sustainable rate found** ({rule}). {c.get('note', '')}")
    else:
        out.append(
            f"**Sustainable rate: {c['capacity_rps']:,.0f} requests/s** ({arrivals} open-loop arrivals; stable means "
            f"{rule}). Bracket: stable at {c['lower_rps']:,.0f}/s"
            + (f", unstable at {c['upper_rps']:,.0f}/s" if c.get("upper_rps") else "")
            + f"; {len(c['steps'])} search steps{', converged' if c['converged'] else ', not converged'}."
            + (f" {c['note']}" if c.get("note") else "")
        )
    k = c.get("knee")
    if k:
        out.append("")
        out.append(
            "Knee of the latency curve (where a two-segment fit of p99 against offered rate turns from flat to "
            f"steep): **{k['rate_rps']:,.0f}/s at p99 {k['p99_ms']:.3g} ms**. Beyond it p99 grows much faster "
            "than load."
        )
    return out


def plan_lines(p: Mapping[str, Any]) -> list[str]:
    return [
        f"For a peak of **{p['target_peak_rps']:,.0f} requests/s** with {p['headroom']:.0%} headroom: "
        f"**{p['replicas']} replica(s)** ({p['replicas_n_plus_1']} to survive losing one), each running at most "
        f"{p['usable_per_replica_rps']:,.0f}/s of its measured {p['capacity_per_replica_rps']:,.0f}/s; "
        f"utilisation at peak {p['utilisation_at_peak']:.0%}.",
        "",
        "Assumptions:",
        "",
        *(f"- {a}" for a in p["assumptions"]),
    ]

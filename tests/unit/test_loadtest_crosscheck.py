"""The perf_analyzer cross-check's arithmetic and its BENCHMARKS.md section (no servers, no binaries)."""

from __future__ import annotations

from typing import Any

import pytest

from benchmarks import bench, crosscheck


def pair(perf_rps: float, ours_rps: float) -> dict[str, Any]:
    return {
        "perf_analyzer": {"rps": perf_rps, "p50_ms": 1.0, "p99_ms": 2.0, "cpu_us_per_request": 150.0},
        "loadtest": {"rps": ours_rps, "p50_ms": 1.1, "p99_ms": 2.5, "errors": {}, "cpu_us_per_request": 400.0},
        "ratio": ours_rps / perf_rps,
    }


def test_summarize_takes_medians_so_one_noisy_round_does_not_decide() -> None:
    runs = [pair(1000, 1000), pair(1000, 980), pair(400, 900), pair(1100, 1050)]
    case = crosscheck.summarize(runs)
    assert case["perf_rps"] == 1000
    assert case["ratio"] == pytest.approx(statistics_median([1.0, 0.98, 2.25, 1050 / 1100]))
    assert case["ratio_range"] == [pytest.approx(1050 / 1100), 2.25]
    assert case["perf_spread"] == pytest.approx(0.7)
    assert case["loadtest_cpu_us"] == 400.0


def statistics_median(xs: list[float]) -> float:
    s = sorted(xs)
    return (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2


def test_render_marks_each_case_and_the_section_replaces_only_its_markers() -> None:
    data = {
        "measured_at": "2026-01-01 00:00 UTC", "machine": "2 CPUs", "load_average": [1.0, 1.5], "seconds": 60,
        "settings": {"rounds": 2, "window_ms": 1000, "trials": 3, "processes": 2}, "concurrency": [4, 16],
        "models": {"tiny": {"4": crosscheck.summarize([pair(1000, 700), pair(1000, 750)]),
                            "16": crosscheck.summarize([pair(1000, 950), pair(1000, 1020)])}},
    }  # fmt: skip
    body = crosscheck.render(data, "python -m benchmarks.crosscheck")
    assert "| tiny | 4 |" in body and "| no |" in body and "| yes |" in body
    assert "1 of 2 cases within ±10%." in body
    doc = "# Benchmarks\n\nprose\n\n<!-- bench:core:start -->\ncore\n<!-- bench:core:end -->\n\nmore prose\n"
    once = bench.replace_section(doc, body, crosscheck.START, crosscheck.END)
    assert once.startswith(doc.rstrip()) and once.rstrip().endswith(crosscheck.END)
    twice = bench.replace_section(once, "new body", crosscheck.START, crosscheck.END)
    assert twice.startswith(doc.rstrip()) and "new body" in twice and body not in twice

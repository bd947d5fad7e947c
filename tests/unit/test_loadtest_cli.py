"""``ferry loadtest`` argument checks (no server needed) and the reports written from known steps."""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ferry.loadtest import cli, report
from ferry.loadtest.histogram import Histogram
from ferry.loadtest.steps import StepSpec, summarize


def args(*extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(["--target", "127.0.0.1:8001", "--model", "tiny", "--out", "/tmp/x", *extra])


@pytest.mark.parametrize("target", ["127.0.0.1:8001", "localhost:8001", "[::1]:8001", "127.0.0.2:1"])
def test_loopback_targets_are_accepted(target: str) -> None:
    cli.check_target(target, allow_remote=False)


@pytest.mark.parametrize("target", ["10.1.2.3:8001", "8.8.8.8:8001", "[2001:db8::1]:8001"])
def test_other_targets_need_allow_remote(target: str) -> None:
    with pytest.raises(ValueError, match="allow-remote"):
        cli.check_target(target, allow_remote=False)
    cli.check_target(target, allow_remote=True)


def test_validation_messages() -> None:
    with pytest.raises(ValueError, match="--concurrency, --rate or --capacity"):
        cli.validate(args())
    with pytest.raises(ValueError, match="--slo-p99-ms"):
        cli.validate(args("--capacity"))
    with pytest.raises(ValueError, match="needs --capacity"):
        cli.validate(args("--rate", "10", "--target-peak-rps", "100"))
    with pytest.raises(ValueError, match="headroom"):
        cli.validate(args("--rate", "10", "--headroom", "1.5"))
    cli.validate(args("--capacity", "--slo-p99-ms", "20", "--target-peak-rps", "100"))
    with pytest.raises(SystemExit):  # argparse: a sweep is either closed or open loop
        args("--rate", "10", "--concurrency", "2")


def test_levels() -> None:
    assert cli.parse_levels("1,4,16", "concurrency") == [1, 4, 16]
    assert cli.parse_levels("1:64", "concurrency") == [1, 2, 4, 8, 16, 32, 64]
    assert cli.parse_levels("150.5", "rate") == [150.5]
    for bad in ("", "0", "a,b", "-1"):
        with pytest.raises(ValueError):
            cli.parse_levels(bad, "rate")


def test_run_exits_2_with_a_message_for_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--target", "10.0.0.1:1", "--model", "m", "--out", "/tmp/x", "--rate", "5"]) == 2
    assert "allow-remote" in capsys.readouterr().err


def test_ferry_serve_does_not_import_the_load_generator() -> None:
    code = ("import sys, ferry.server.__main__ as m; m._parser().parse_args(['serve', '--model-repository', 'x']); "
            "print(sorted(k for k in sys.modules if k.split('.')[0] in ('matplotlib', 'rich') "
            "or k in ('ferry.loadtest.runner', 'ferry.loadtest.generator', 'ferry.loadtest.session')))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def tally(latencies_ms: list[float], errors: dict[str, int] | None = None) -> dict[str, object]:
    h = Histogram()
    h.record_many(int(v * 1e6) for v in latencies_ms)
    n = len(latencies_ms) + sum((errors or {}).values())
    return {"latency": h.to_dict(), "service": h.to_dict(), "lag": Histogram().to_dict(), "errors": errors or {},
            "in_window": n, "ok_arrived": len(latencies_ms), "rows_arrived": 2 * len(latencies_ms), "sent": n,
            "capped_at_s": None, "half_ns": [1, 1, 1, 1]}  # fmt: skip


def test_summarize_merges_workers_and_reports_round_trip(tmp_path: Path) -> None:
    a = tally([1.0] * 90 + [10.0] * 10)
    b = tally([2.0] * 100, {"UNAVAILABLE": 2})
    step = summarize(3, StepSpec("closed", concurrency=4), "unary", [a, b], 2.0, {"queue_ms": 0.5})
    assert step.requests == 202 and step.ok == 200
    assert step.throughput_rps == 100.0 and step.rows_per_s == 200.0
    assert step.errors == {"UNAVAILABLE": 2} and step.error_rate == pytest.approx(2 / 202, abs=1e-6)
    assert step.latency_ms["p50"] == pytest.approx(2.0, rel=0.01)
    assert step.latency_ms["p99"] == pytest.approx(10.0, rel=0.01)
    assert step.latency_ms["max"] == pytest.approx(10.0, rel=1e-6)
    data = {"target": "t", "started_at": "now", "machine": "m", "command": "ferry loadtest", "steps": [],
            "model": {"name": "tiny", "version": "", "max_batch_size": 8, "dynamic_batching": True,
                      "response_cache": False, "instance_count": 1},
            "settings": {"mode": "unary", "processes": 2, "warmup_s": 1, "duration_s": 2, "rows": "1",
                         "inputs": "random", "duplicate_fraction": 0.0, "timeout_s": 10, "max_requests": 10},
            }  # fmt: skip
    paths = report.write_all(tmp_path, data, [step])
    assert [p.name for p in paths] == ["report.json", "steps.csv", "summary.md"]
    with (tmp_path / "steps.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["throughput_rps"] == "100.0" and rows[0]["errors"] == "UNAVAILABLE=2"
    assert json.loads((tmp_path / "report.json").read_text())["model"]["name"] == "tiny"
    summary = (tmp_path / "summary.md").read_text()
    assert "intended* send time" in summary and "| c=4 |" in summary

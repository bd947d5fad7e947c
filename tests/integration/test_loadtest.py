"""``ferry loadtest`` against a real Ferry server: short, bounded runs (a few seconds each) that must produce every
report file, valid PNG plots, the server's view of each step, and behave as their flags say. Never asserts speed."""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ferry.loadtest import cli
from tests.serving import running_server

TINY = """name: "tiny"
max_batch_size: 64
dynamic_batching { max_queue_delay_microseconds: 500 }
response_cache { enable: true }
"""
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SHORT = ("--duration", "0.5", "--warmup", "0.2", "--timeout", "10", "--progress", "plain")


@pytest.fixture(scope="module")
def address(example_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("loadtest-repo")
    shutil.copytree(example_repo / "tiny" / "1", root / "tiny" / "1")
    (root / "tiny" / "config.pbtxt").write_text(TINY)
    with running_server(root, http_port=None) as address:
        yield address


def loadtest(address: str, out: Path, *extra: str) -> tuple[int, dict[str, Any]]:
    status = cli.main(["--target", address, "--model", "tiny", "--out", str(out), *SHORT, *extra])
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").exists() else {}
    return status, report


def test_sweep_capacity_and_plan_write_every_report(address: str, tmp_path: Path) -> None:
    status, report = loadtest(
        address, tmp_path, "--concurrency", "1,4", "--processes", "2", "--capacity", "--slo-p99-ms", "500",
        "--max-steps", "2", "--target-peak-rps", "1000", "--headroom", "0.25", "--rows", "mixed",
    )  # fmt: skip
    assert status == 0
    for name in ("report.json", "steps.csv", "summary.md", "throughput.png", "latency.png"):
        assert (tmp_path / name).stat().st_size > 0, name

    steps = report["steps"]
    assert [s["loop"] for s in steps[:2]] == ["closed", "closed"] and [s["concurrency"] for s in steps[:2]] == [1, 4]
    assert 1 <= len(steps) - 2 <= 2 and all(s["phase"] == "capacity" and s["loop"] == "open" for s in steps[2:])
    for s in steps:
        lat = s["latency_ms"]
        assert s["ok"] > 0 and s["throughput_rps"] > 0
        # the capacity search offers more than the server takes on purpose: there only Ferry's retryable
        # backpressure may answer instead; the sweep's closed-loop steps must all succeed
        allowed = {"UNAVAILABLE"} if s["phase"] == "capacity" else set()
        assert set(s["errors"]) <= allowed, s["errors"]
        assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["p99.9"] <= lat["max"] * 1.01
        assert s["rows_per_s"] >= s["throughput_rps"]  # mixed rows: 1..16 rows a request
        server = s["server"]
        assert server["requests"] > 0 and server["mean_batch_size"] >= 1
        assert server["queue_ms"] is not None and server["compute_infer_ms"] is not None
        assert server["cache_hit_rate"] == 0  # every request is unique (stamped): the cache never answers

    capacity = report["capacity"]
    assert capacity["steps"] == [s["index"] for s in steps[2:]]
    plan = report["plan"]
    if capacity["capacity_rps"] is not None:
        assert plan["replicas"] >= 1 and plan["headroom"] == 0.25 and len(plan["assumptions"]) >= 4

    with (tmp_path / "steps.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(steps) and float(rows[1]["throughput_rps"]) == steps[1]["throughput_rps"]
    summary = (tmp_path / "summary.md").read_text()
    assert "*intended* send time" in summary and "## Capacity" in summary and "![latency](latency.png)" in summary

    import matplotlib.image

    for name in ("throughput.png", "latency.png"):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE)
        image = matplotlib.image.imread(tmp_path / name)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_open_loop_stream_mode_and_the_duplicate_fraction(address: str, tmp_path: Path) -> None:
    status, unique = loadtest(address, tmp_path / "unique", "--mode", "stream", "--rate", "80", "--poisson",
                              "--processes", "1")  # fmt: skip
    assert status == 0
    status, repeated = loadtest(address, tmp_path / "repeated", "--mode", "stream", "--rate", "80", "--poisson",
                                "--processes", "1", "--duplicate-fraction", "0.5")  # fmt: skip
    assert status == 0
    for report in (unique, repeated):
        (step,) = report["steps"]
        assert step["mode"] == "stream" and step["offered_rps"] == 80 and step["poisson"]
        assert step["ok"] > 0 and step["errors"] == {}
    assert unique["steps"][0]["server"]["cache_hit_rate"] == 0
    assert repeated["steps"][0]["server"]["cache_hit_rate"] > 0.2  # ~half the requests repeat four fixed ones


def test_the_request_cap_bounds_a_step(address: str, tmp_path: Path) -> None:
    status, report = loadtest(address, tmp_path, "--concurrency", "2", "--processes", "1", "--max-requests", "15")
    assert status == 0
    (step,) = report["steps"]
    assert step["sent"] <= 15 and step["capped"]
    assert any("request cap" in note for note in report["notes"])


def test_an_unknown_model_is_refused_before_any_load(address: str, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    status = cli.main(["--target", address, "--model", "nope", "--out", str(tmp_path), "--rate", "5", *SHORT])
    assert status == 2
    assert "NOT_FOUND" in capsys.readouterr().err
    assert not (tmp_path / "report.json").exists()


@pytest.mark.parametrize("client", ["wire", "grpcio"])
def test_both_clients_answer_and_count_refusals_by_status(address: str, tmp_path: Path, client: str) -> None:
    """Unary and stream mode through each client; then requests of the wrong shape, which the server refuses with
    INVALID_ARGUMENT: counted as such, not lost."""
    for mode in ("unary", "stream"):
        status, report = loadtest(address, tmp_path / mode, "--client", client, "--mode", mode, "--concurrency", "2",
                                  "--processes", "1")  # fmt: skip
        assert status == 0
        (step,) = report["steps"]
        assert step["ok"] > 0 and step["errors"] == {} and report["settings"]["client"] == client
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"data": [{"input": {"content": [1.0, 2.0, 3.0], "shape": [1, 3]}}]}))
    for mode in ("unary", "stream"):
        status, report = loadtest(address, tmp_path / f"wrong-{mode}", "--client", client, "--mode", mode,
                                  "--concurrency", "2", "--processes", "1", "--inputs", str(wrong))  # fmt: skip
        (step,) = report["steps"]
        assert step["ok"] == 0 and set(step["errors"]) == {"INVALID_ARGUMENT"}
        assert step["errors"]["INVALID_ARGUMENT"] > 0

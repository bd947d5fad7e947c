"""The parts of the REST peer comparison (``benchmarks.bench_rest_peers``) that run in Ferry's venv: the answer
check and decoder, the two REST load generators against a real Ferry server, and the report. MLServer and KServe
are not needed (they live in their own venvs); these check behaviour only, never speed."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from benchmarks import bench_rest_peers as peers
from benchmarks import rest_load
from benchmarks.mlserver import compare, drive
from tests.serving import background_server


@pytest.fixture(scope="module")
def rest_address(example_repo: Path) -> Iterator[str]:
    with background_server(example_repo) as running:
        assert running.server.http_port is not None
        yield f"127.0.0.1:{running.server.http_port}"


@pytest.mark.parametrize("data", ["json", "binary"])
def test_answers_over_rest_match_onnxruntime(rest_address: str, example_repo: Path, data: str) -> None:
    shapes = compare.shapes(example_repo)
    peers.check_answers(compare.Running("ferry", 0, rest_address), data, example_repo, shapes)
    status, body = peers.post_infer(rest_address, "tiny", 16, data)
    assert status == 200 and drive.decode_rest_output(body).shape == (1, 4)


def test_a_refused_check_call_stops_the_run(rest_address: str, example_repo: Path) -> None:
    shapes = {"mlp": compare.Shape(256, 10), "tiny": compare.Shape(256, 4)}  # tiny takes 16 features, not 256
    with pytest.raises(RuntimeError, match="ferry json tiny: HTTP 400"):
        peers.check_answers(compare.Running("ferry", 0, rest_address), "json", example_repo, shapes)


def test_decode_rest_output_finds_its_binary_part_after_others() -> None:
    first, second = np.arange(6, dtype=np.float32), np.array([[1.5, -2.0]], dtype=np.float32)
    header = {"outputs": [
        {"name": "other", "datatype": "FP32", "shape": [6], "parameters": {"binary_data_size": 24}},
        {"name": "output", "datatype": "FP32", "shape": [1, 2], "parameters": {"binary_data_size": 8}},
    ]}  # fmt: skip
    body = json.dumps(header).encode() + first.tobytes() + second.tobytes()
    np.testing.assert_array_equal(drive.decode_rest_output(body), second)
    as_json = {"outputs": [{"name": "output", "datatype": "FP32", "shape": [1, 2], "data": [1.5, -2.0]}]}
    np.testing.assert_array_equal(drive.decode_rest_output(json.dumps(as_json).encode()), second)
    with pytest.raises(ValueError, match="3 values for shape"):
        bad = {"outputs": [{"name": "output", "datatype": "FP32", "shape": [1, 2], "data": [1, 2, 3]}]}
        drive.decode_rest_output(json.dumps(bad).encode())


def test_drive_over_rest_counts_answers_from_a_real_server(rest_address: str) -> None:
    payload, _ = drive.request_bytes("tiny", 16)
    result = asyncio.run(drive.drive(rest_address, "tiny", payload, concurrency=2, duration_s=0.3, warmup_s=0.1,
                                     client="http-json", expect_shape=(1, 4)))  # fmt: skip
    assert result.completed > 0 and not result.errors and 0 < result.p50_us <= result.p99_us


@pytest.mark.skipif(shutil.which("h2load") is None, reason="h2load (nghttp2-client) is not installed")
@pytest.mark.parametrize("data", ["json", "binary"])
def test_h2load_counts_answers_from_a_real_server(rest_address: str, data: str) -> None:
    result = rest_load.run(rest_address, "tiny", 16, data, concurrency=2, duration_s=0.4, warmup_s=0.1)
    assert result.completed > 0 and not result.errors, result
    assert result.infer_per_s == result.completed / 0.4 and 0 < result.p50_us <= result.p99_us


@pytest.mark.skipif(shutil.which("h2load") is None, reason="h2load (nghttp2-client) is not installed")
def test_h2load_run_with_every_request_refused_raises(rest_address: str) -> None:
    with pytest.raises(RuntimeError, match=r"no request succeeded .*HTTP_400"):  # tiny with 256 features: 400s
        rest_load.run(rest_address, "tiny", 256, "json", concurrency=1, duration_s=0.2, warmup_s=0.05)


def test_h2load_log_parsing_counts_statuses() -> None:
    summary = "requests: 5 total, 5 started, 4 done, 3 succeeded, 1 failed, 0 errored, 0 timeout\n"
    log = "1\t200\t100\n2\t200\t300\n3\t200\t200\n4\t400\t50\n5\t0\t0\n"
    result = rest_load.parse(summary, log, target="t", model="m", data="json", concurrency=1, window_s=0.5,
                             cpu_s=0.003)  # fmt: skip
    assert result.completed == 3 and result.infer_per_s == 6.0 and result.p50_us == 200.0
    assert result.errors == {"HTTP_400": 1, "failed": 1} and result.extra == {"unanswered_at_end": 1}
    assert result.client_cpu_us_per_request == pytest.approx(1000.0)
    with pytest.raises(RuntimeError, match="no request succeeded"):
        rest_load.parse(summary.replace("3 succeeded", "0 succeeded"), "1\t500\t10\n", target="t", model="m",
                        data="json", concurrency=1, window_s=0.5, cpu_s=0.0)  # fmt: skip


def _results(rates: dict[str, list[float]]) -> dict[str, Any]:
    def run(rate: float) -> dict[str, float]:
        return {"infer_per_s": rate, "p50_us": 1000.0, "p99_us": 4000.0, "server_cpu_us_per_request": 300.0,
                "client_cpu_us_per_request": 50.0}  # fmt: skip

    return {
        "date": "today",
        "machine": {"nproc": 2, "cpu": "cpu", "python": "3.11"},
        "versions": {
            "mlserver": {"mlserver": "1.7.1"},
            "kserve": {"kserve": "0.21.0", "uvicorn": "u", "fastapi": "f"},
            "ferry": {"onnxruntime": "1.32.0"},
        },
        "settings": {"duration_s": 3, "warmup_s": 0.5, "rounds": 2, "client": "h2load"},
        "command": "python -m benchmarks.bench_rest_peers",
        "duration_s": 10.0,
        "load_average_1m": {"start": 1.0, "end": 2.0},
        "mlserver_binary_probe": {"status": 500, "body": "Internal Server Error"},
        "cases": [{"model": "tiny", "concurrency": 16, "runs": {k: [run(x) for x in v] for k, v in rates.items()}}],
    }


def test_render_divides_by_the_faster_mlserver_and_says_whether_the_target_is_met() -> None:
    rates = {"ferry/json": [900, 1100], "ferry/binary": [1200, 1200], "mlserver/json": [300, 300],
             "mlserver-unbatched/json": [400, 400], "kserve/json": [250, 250], "kserve/binary": [300, 300]}  # fmt: skip
    section = peers.render(_results(rates))
    assert "| tiny | 16 | 1,000 | 1,200 | 300 | 400 | 250 | 300 | **3.33** (3.00, 3.67) | **2.50** (2.25, 2.75) " \
           "| **4.00** (3.60, 4.40) | **4.00** (4.00, 4.00) |" in section  # fmt: skip
    assert "`tiny` c16 2.50 (missed) against the faster MLServer configuration" in section
    assert "HTTP 500" in section and "h2load" in section
    rates["mlserver-unbatched/json"] = [200, 200]
    assert "`tiny` c16 3.33 (met)" in peers.render(_results(rates))

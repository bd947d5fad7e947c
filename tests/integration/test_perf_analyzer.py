"""Triton's ``perf_analyzer`` binary (shipped in the tritonclient wheel) against a real Ferry server.

perf_analyzer reads ModelMetadata, ModelConfig and ServerMetadata, then drives ModelInfer (or ModelStreamInfer with
``--streaming``) and, because Ferry advertises ``statistics``, reads ModelStatistics around every measurement window
(PROTOCOL.md §2.3). Any failed request aborts its run, so exit status 0 already says every answer was accepted.
"""

from __future__ import annotations

import csv
import os
import re
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import tritonclient.grpc as tc

from benchmarks import perf_analyzer as pa
from tests.serving import running_server

pytestmark = pytest.mark.perf_analyzer

WINDOW_MS = 500
BOUNDED = ("--max-trials", "3", "--stability-percentage", "1000")
"""Stability is not under test: exactly three windows per level (the fewest perf_analyzer merges) and any spread
between them accepted, so a run takes ~1.5 s per concurrency level even on a noisy machine."""

RUN_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def address(example_repo: Path) -> Iterator[str]:
    usable, why = pa.usable()
    if not usable:
        if os.environ.get("CI") == "true":
            pytest.fail(f"perf_analyzer must run in CI: {why}")
        pytest.skip(why)
    with running_server(example_repo) as address:
        yield address


@pytest.fixture(scope="module")
def client(address: str) -> Iterator[tc.InferenceServerClient]:
    c = tc.InferenceServerClient(address)
    try:
        yield c
    finally:
        c.close()


@dataclass(frozen=True)
class Stats:
    """One model version's cumulative ModelStatistics counters."""

    success: int
    queue: int
    inference_count: int
    execution_count: int

    def __sub__(self, other: Stats) -> Stats:
        return Stats(
            self.success - other.success,
            self.queue - other.queue,
            self.inference_count - other.inference_count,
            self.execution_count - other.execution_count,
        )


def _stats(client: tc.InferenceServerClient, model: str) -> dict[str, Stats]:
    return {
        s.version: Stats(
            s.inference_stats.success.count, s.inference_stats.queue.count, s.inference_count, s.execution_count
        )
        for s in client.get_inference_statistics(model).model_stats
    }


@dataclass(frozen=True)
class Level:
    """What perf_analyzer printed and wrote for one concurrency level."""

    infer_per_s: float
    client_requests: int  # requests completed in the merged (reported) windows
    server_requests: int  # the same windows as seen through the server's ModelStatistics


@dataclass(frozen=True)
class Report:
    stdout: str
    levels: dict[int, Level]


_BLOCK = re.compile(r"^Request concurrency: (\d+)$", re.MULTILINE)


def _perf_analyzer(address: str, model: str, concurrency_range: str, *flags: str) -> Report:
    """Run perf_analyzer and keep its console report too (``pa.run`` returns only the CSV's numbers)."""
    binary = pa.binary()
    assert binary is not None
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.csv"
        cmd = [
            str(binary), "-m", model, "-i", "grpc", "-u", address,
            "--concurrency-range", concurrency_range, "--measurement-interval", str(WINDOW_MS),
            *BOUNDED, "-f", str(report), *flags,
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, env=pa.environment(), timeout=RUN_TIMEOUT_S)
        assert proc.returncode == 0, f"perf_analyzer exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
        with report.open() as f:
            throughput = {int(r["Concurrency"]): float(r["Inferences/Second"]) for r in csv.DictReader(f)}
    parts = _BLOCK.split(proc.stdout)  # [preamble, level, text, level, text, ...]
    levels = {}
    for level, text in zip(parts[1::2], parts[2::2], strict=True):
        client_count = re.search(r"Client:\s+Request count: (\d+)", text)
        server_count = re.search(r"Successful request count: (\d+)", text)
        assert client_count and server_count, f"no client or server request count for concurrency {level}:\n{text}"
        levels[int(level)] = Level(throughput[int(level)], int(client_count[1]), int(server_count[1]))
    assert set(levels) == set(throughput), proc.stdout
    return Report(proc.stdout, levels)


@pytest.mark.parametrize("streaming", [False, True], ids=["sync", "streaming"])
def test_mlp_concurrency_range(client: tc.InferenceServerClient, address: str, streaming: bool) -> None:
    before = _stats(client, "mlp")
    report = _perf_analyzer(address, "mlp", "1:8:4", *(["--streaming"] if streaming else []))
    grew = _stats(client, "mlp")["1"] - before["1"]

    mode = "asynchronous" if streaming else "synchronous"
    assert f"Using {mode} calls for inference" in report.stdout
    assert sorted(report.levels) == [1, 5]
    for level in report.levels.values():
        assert level.infer_per_s > 0
        assert level.client_requests > 0
        # perf_analyzer found Ferry's statistics (a numeric version whose queue count grew) and read them
        assert level.server_requests > 0
    # The server saw at least what perf_analyzer counted (it also sent warm-up and unmerged windows).
    assert grew.success >= sum(level.client_requests for level in report.levels.values())
    assert grew.queue == grew.success
    assert grew.inference_count == grew.success  # batch size 1


def test_digits_batch_of_four(client: tc.InferenceServerClient, address: str) -> None:
    """``-b 4``: requests of shape [4, 64] to digits' latest version (2), through ``benchmarks.perf_analyzer.run``."""
    before = _stats(client, "digits")
    steps = pa.run(address, "digits", [1], batch_size=4, measurement_ms=WINDOW_MS, extra=BOUNDED, timeout_s=60)
    after = _stats(client, "digits")

    assert [s.concurrency for s in steps] == [1]
    assert steps[0].infer_per_s > 0
    assert steps[0].p50_us > 0
    grew = after["2"] - before["2"]
    assert grew.success > 0
    assert grew.inference_count == 4 * grew.success
    assert after["1"] == before["1"], "an unversioned request must go to the latest version only"

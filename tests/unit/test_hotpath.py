"""benchmarks.hotpath answers real requests through Ferry's request path and reports every stage."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import hotpath


def test_hotpath_times_every_stage_of_real_requests(example_repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert hotpath.main(["--model-repository", str(example_repo), "--model", "tiny", "--requests", "50",
                         "--warmup", "20"]) == 0  # fmt: skip
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("tiny, 1 row, 50 requests")
    reported = {line[:17].strip(): float(line[17:]) for line in lines[1:]}  # "  <stage:14> <µs:8.1f>"
    assert set(reported) == set(hotpath.STAGES)
    assert all(value > 0 for value in reported.values())

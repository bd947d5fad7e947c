"""``ferry loadtest --protocol http`` against a real server's REST API: binary and JSON tensors, closed and open
loop, the server's statistics read over REST too, refusals counted by status. Short, bounded runs; never asserts
speed."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ferry.loadtest import cli
from tests.serving import background_server

SHORT = ("--duration", "0.5", "--warmup", "0.2", "--timeout", "10", "--progress", "plain", "--processes", "1")


@pytest.fixture(scope="module")
def target(example_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("rest-loadtest-repo")
    shutil.copytree(example_repo / "tiny", root / "tiny")
    with background_server(root) as running:
        yield f"127.0.0.1:{running.server.http_port}"


def loadtest(target: str, out: Path, *extra: str) -> tuple[int, dict[str, Any]]:
    status = cli.main(["--target", target, "--protocol", "http", "--model", "tiny", "--out", str(out), *SHORT, *extra])
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").exists() else {}
    return status, report


@pytest.mark.parametrize("data", ["binary", "json"])
@pytest.mark.parametrize("load", [("--concurrency", "2"), ("--rate", "50")], ids=["closed", "open"])
def test_rest_load_in_both_tensor_forms(target: str, tmp_path: Path, data: str, load: tuple[str, str]) -> None:
    status, report = loadtest(target, tmp_path, "--http-data", data, *load, "--rows", "1,4")
    assert status == 0
    assert report["settings"]["client"] == f"http-{data}"
    (step,) = report["steps"]
    assert step["loop"] == ("closed" if load[0] == "--concurrency" else "open")
    assert step["ok"] > 0 and step["errors"] == {}, step
    assert step["server"]["requests"] > 0, step  # the server's statistics, read over REST


def test_refusals_are_counted_by_status(target: str, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"data": [{"input": {"content": [1.0, 2.0, 3.0], "shape": [1, 3]}}]}))
    _, report = loadtest(target, tmp_path / "out", "--concurrency", "2", "--inputs", str(wrong))
    (step,) = report["steps"]
    assert step["ok"] == 0 and set(step["errors"]) == {"INVALID_ARGUMENT"}


def test_an_unknown_model_is_refused_before_any_load(target: str, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    status = cli.main(["--target", target, "--protocol", "http", "--model", "nope", "--out", str(tmp_path),
                       "--rate", "5", *SHORT])  # fmt: skip
    assert status == 2
    assert "NOT_FOUND unknown model 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--mode", "stream"), "--protocol http has no stream mode"),
        (("--client", "grpcio"), "--client chooses the gRPC client"),
    ],
)
def test_grpc_only_flags_are_refused(target: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                     flags: tuple[str, ...], message: str) -> None:  # fmt: skip
    status, _ = loadtest(target, tmp_path, "--concurrency", "1", *flags)
    assert status == 2
    assert message in capsys.readouterr().err

"""The parts of ``make bench``: raw onnxruntime timing, the echo server, and the BENCHMARKS.md section writer.
These check behaviour only, never speed."""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from benchmarks import bench, raw_ort
from ferry.client._proto import grpc_service_pb2 as pb
from ferry.client._proto import grpc_service_pb2_grpc as pb_grpc


def test_raw_ort_measures_rows_per_second(example_repo: Path) -> None:
    rate = raw_ort.rows_per_second(example_repo / "tiny" / "1" / "model.onnx", batch=4, seconds=0.05)
    assert rate > 0 and math.isfinite(rate)


def test_raw_ort_rejects_a_bad_batch(example_repo: Path) -> None:
    with pytest.raises(ValueError, match="batch"):
        raw_ort.rows_per_second(example_repo / "tiny" / "1" / "model.onnx", batch=0, seconds=0.05)


@pytest.fixture(scope="module", params=["grpc.aio", "h2echo"])
def echo_server(
    example_repo: Path, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[bench.Running]:
    """The echo server for ``tiny``, started the way the benchmark starts it (a subprocess, its ready line): the
    grpc.aio one, and the same answers over hand-written HTTP/2 (``benchmarks/h2echo.py``), which must answer
    grpcio's client alike."""
    log_path = tmp_path_factory.mktemp("echo") / "echo.log"
    make = bench.echo_command if request.param == "grpc.aio" else bench.h2echo_command
    command = make(example_repo, "tiny")
    with log_path.open("w") as log, bench.serving("echo", command, "echo ready:", log) as server:
        assert server.address.startswith("127.0.0.1:")
        yield server


@pytest.fixture
def echo_stub(echo_server: bench.Running) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(echo_server.address) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def _request(rows: int, request_id: str) -> pb.ModelInferRequest:
    data = np.arange(rows * 16, dtype=np.float32).reshape(rows, 16)
    return pb.ModelInferRequest(
        model_name="tiny",
        id=request_id,
        inputs=[pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[rows, 16])],
        raw_input_contents=[data.tobytes()],
    )


def test_echo_answers_model_infer_with_the_id_and_one_raw_output_per_output(
    echo_stub: pb_grpc.GRPCInferenceServiceStub,
) -> None:
    for rows in (1, 3):
        reply = echo_stub.ModelInfer(_request(rows, f"req-{rows}"), timeout=10)
        assert reply.id == f"req-{rows}"
        assert reply.model_name == "tiny"
        assert [(o.name, o.datatype, list(o.shape)) for o in reply.outputs] == [("output", "FP32", [rows, 4])]
        assert [len(raw) for raw in reply.raw_output_contents] == [rows * 4 * 4]


def test_echo_answers_each_stream_message(echo_stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    replies = list(echo_stub.ModelStreamInfer(iter([_request(1, "a"), _request(2, "b")]), timeout=10))
    assert [r.error_message for r in replies] == ["", ""]
    assert [r.infer_response.id for r in replies] == ["a", "b"]
    assert [len(r.infer_response.raw_output_contents[0]) for r in replies] == [16, 32]


def test_echo_describes_the_real_model(echo_stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    meta = echo_stub.ModelMetadata(pb.ModelMetadataRequest(name="tiny"), timeout=10)
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("input", "FP32", [-1, 16])]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [("output", "FP32", [-1, 4])]
    config = echo_stub.ModelConfig(pb.ModelConfigRequest(name="tiny"), timeout=10).config
    assert (config.name, config.max_batch_size) == ("tiny", 128)
    assert list(echo_stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=10).extensions) == []
    with pytest.raises(grpc.RpcError) as err:
        echo_stub.ModelMetadata(pb.ModelMetadataRequest(name="nope"), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_the_preflight_check_passes_on_the_echo_server_and_fails_on_an_unknown_model(
    echo_server: bench.Running,
) -> None:
    bench.check_answers(echo_server, "tiny")
    with pytest.raises(RuntimeError, match="did not answer"):
        bench.check_answers(echo_server, "nope", timeout_s=5)


def test_a_server_that_exits_before_its_ready_line_is_reported(tmp_path: Path) -> None:
    never_ready = [sys.executable, "-c", "print('starting')"]
    with (
        (tmp_path / "log").open("w") as log,
        pytest.raises(RuntimeError, match="before it was ready"),
        bench.serving("bad", never_ready, "never ready:", log),
    ):
        pass


def test_replace_section_keeps_the_text_outside_the_markers() -> None:
    text = f"# Benchmarks\n\nIntro.\n\n{bench.START}\nold table\n{bench.END}\n\n## Notes\nkept\n"
    out = bench.replace_section(text, "new table\n")
    assert out == f"# Benchmarks\n\nIntro.\n\n{bench.START}\nnew table\n{bench.END}\n\n## Notes\nkept\n"
    assert bench.replace_section(out, "new table") == out  # idempotent


def test_replace_section_appends_when_there_are_no_markers() -> None:
    assert bench.replace_section("# B\n\nintro\n", "t") == f"# B\n\nintro\n\n{bench.START}\nt\n{bench.END}\n"
    assert bench.replace_section("", "t") == f"{bench.START}\nt\n{bench.END}\n"


def test_replace_section_refuses_a_lone_marker() -> None:
    with pytest.raises(ValueError, match="only one"):
        bench.replace_section(f"intro\n{bench.START}\nno end\n", "t")


def test_render_makes_one_row_per_case() -> None:
    def side(rate: float) -> dict[str, object]:
        return {"infer_per_s": rate, "p50_us": 500.0, "p99_us": 900.0, "mean_latency_us": 600.0,
                "server_cpu_us_per_infer": 300.0}  # fmt: skip

    stages = {"success": 200.0, "queue": 50.0, "compute_input": 10.0, "compute_infer": 100.0,
              "compute_output": 10.0, "rows_per_execution": 1.0, "loop_rest": 30.0}  # fmt: skip
    ferry = {**side(800.0), "server_us": stages}
    case = {"mode": "unary", "concurrency": 8, "echo": side(1000.0), "ferry": ferry, "ferry_over_echo": 0.8,
            "ferry_over_echo_per_round": [0.8], "ferry_over_raw_b1": 0.1}  # fmt: skip
    results = {
        "date": "2025-01-01 00:00 UTC",
        "machine": {"nproc": 2, "cpu": "Test CPU", "python": "3.11"},
        "command": "python -m benchmarks.bench",
        "perf_analyzer": "2.41.0",
        "duration_s": 1.0,
        "settings": {"measurement_ms": 2000, "trials": 3, "rounds": 1, "raw_seconds": 2.0},
        "models": {"tiny": {"raw_ort_rows_per_s": {"1": 10.0, "16": 100.0, "64": 1000.0}, "cases": [case]}},
    }
    text = bench.render(results)
    assert "Test CPU" in text and "python -m benchmarks.bench" in text
    assert "| tiny | unary | 8 | 1,000 | 800 | **0.80** (0.80) | 0.10 |" in text
    assert "| tiny | unary | 8 | 600 / 600 | 200 | 50 | 10 | 100 | 10 | 1.00 | 30 | 400 | 300 / 300 |" in text


def test_stage_times_are_per_request_for_the_queue_and_per_execution_for_compute() -> None:
    before = dict.fromkeys(("count", "executions", "rows", "success_ns", "queue_ns", "compute_input_ns",
                            "compute_infer_ns", "compute_output_ns"), 0)  # fmt: skip
    # 4 requests of 1 row ran as 2 executions of 2 rows
    after = {"count": 4, "executions": 2, "rows": 4, "success_ns": 4 * 500_000, "queue_ns": 4 * 100_000,
             "compute_input_ns": 2 * 10_000, "compute_infer_ns": 2 * 300_000,
             "compute_output_ns": 2 * 20_000}  # fmt: skip
    us = bench.stage_times(before, after)
    assert us == pytest.approx({"success": 500, "queue": 100, "compute_input": 10, "compute_infer": 300,
                                "compute_output": 20, "rows_per_execution": 2, "loop_rest": 70})  # fmt: skip
    assert bench.stage_times(after, after) is None


def test_the_combined_ceiling_takes_both_figures_in_rows() -> None:
    """perf_analyzer at ``-b 16`` reported 39,238 infer/s for the echo server (2,452 requests/s: rows already) and
    raw onnxruntime ran 31,808 rows/s: B is 17,567 rows/s, not the 30,274 that counting the rows twice gave."""
    from benchmarks.bench_batching import combined_ceiling

    assert combined_ceiling(39_238, 31_808) == pytest.approx(17_567, rel=1e-3)
    assert combined_ceiling(1_000, 1e12) == pytest.approx(1_000)  # a free model: the echo's own rate

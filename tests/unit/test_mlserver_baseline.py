"""The parts of the MLServer comparison that run in Ferry's venv: the settings folder, the ModelConfig answers of
the shim, Ferry's batching copy, the load generator and the report. MLServer itself is not needed (it lives in its
own venv); these check behaviour only, never speed."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path

import numpy as np

from benchmarks.mlserver import compare, drive
from benchmarks.mlserver.config import BEST, describe, model_configs, write_folder
from ferry.client._proto import grpc_service_pb2 as pb
from tests.serving import running_server


def test_settings_folder_serves_the_example_files_with_adaptive_batching(example_repo: Path, tmp_path: Path) -> None:
    folder = write_folder(example_repo, ["mlp", "tiny"], tmp_path / "s", BEST.with_(max_batch_size=32))
    server = json.loads((folder / "settings.json").read_text())
    assert server["debug"] is False and server["parallel_workers"] == BEST.parallel_workers
    assert (folder / "onnx_runtime.py").is_file()
    mlp = json.loads((folder / "mlp" / "model-settings.json").read_text())
    assert mlp["implementation"] == "onnx_runtime.OnnxRuntime"
    assert Path(mlp["parameters"]["uri"]) == (example_repo / "mlp" / "1" / "model.onnx").resolve()
    assert (mlp["max_batch_size"], mlp["max_batch_time"]) == (32, BEST.max_batch_time)
    assert mlp["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 256]}]
    assert mlp["outputs"] == [{"name": "output", "datatype": "FP32", "shape": [-1, 10]}]


def test_batching_off_writes_zero_batch_settings(example_repo: Path, tmp_path: Path) -> None:
    config = BEST.with_(max_batch_size=1, max_batch_time=0.0)
    folder = write_folder(example_repo, ["tiny"], tmp_path / "s", config)
    tiny = json.loads((folder / "tiny" / "model-settings.json").read_text())
    assert (tiny["max_batch_size"], tiny["max_batch_time"]) == (0, 0.0)
    assert "no batching" in config.label()


def test_shim_answers_are_triton_model_config_responses(example_repo: Path) -> None:
    configs = model_configs(example_repo, ["mlp", "tiny"])
    reply = pb.ModelConfigResponse.FromString(base64.b64decode(configs["tiny"]))
    assert reply.config.name == "tiny" and reply.config.max_batch_size == 128
    assert [i.name for i in reply.config.input] == ["input"] and list(reply.config.input[0].dims) == [16]


def test_ferry_copy_gets_dynamic_batching_once(example_repo: Path, tmp_path: Path) -> None:
    repo = compare.ferry_repository(example_repo, tmp_path / "repo")
    for name in compare.MODELS:
        text = (repo / name / "config.pbtxt").read_text()
        assert text.count("dynamic_batching { }") == 1
        assert (repo / name / "1" / "model.onnx").is_file()
    assert compare.shapes(example_repo) == {"mlp": compare.Shape(256, 10), "tiny": compare.Shape(16, 4)}


def test_decode_output_reads_raw_and_typed_contents() -> None:
    values = np.arange(8, dtype=np.float32).reshape(2, 4)
    out = pb.ModelInferResponse.InferOutputTensor(name="output", datatype="FP32", shape=[2, 4])
    raw = pb.ModelInferResponse(outputs=[out], raw_output_contents=[values.tobytes()]).SerializeToString()
    np.testing.assert_array_equal(drive.decode_output(raw), values)
    typed = pb.ModelInferResponse(outputs=[out])
    typed.outputs[0].contents.fp32_contents.extend(values.ravel().tolist())
    np.testing.assert_array_equal(drive.decode_output(typed.SerializeToString()), values)


def test_drive_counts_answers_from_a_real_server(example_repo: Path) -> None:
    with running_server(example_repo) as address:
        compare.check_answers(compare.Running("ferry", 0, address), example_repo, compare.shapes(example_repo))
        payload, _ = drive.request_bytes("tiny", 16)
        result = asyncio.run(
            drive.drive(address, "tiny", payload, concurrency=3, duration_s=0.3, warmup_s=0.1, expect_shape=(1, 4))
        )
    assert result.completed > 0 and not result.errors
    assert result.infer_per_s == result.completed / 0.3
    assert 0 < result.p50_us <= result.p99_us


def test_render_writes_ratios_and_its_section_only() -> None:
    def run(rate: float) -> dict[str, float]:
        return {
            "infer_per_s": rate,
            "p50_us": 1000.0,
            "p99_us": 5000.0,
            "server_cpu_us_per_request": 300.0,
            "client_cpu_us_per_request": 200.0,
        }

    results = {
        "date": "today",
        "machine": {"nproc": 2, "cpu": "cpu", "python": "3.11"},
        "versions": {"mlserver": {"mlserver": "1.7.1", "uvloop": "0.21.0"}, "ferry": {"grpcio": "1"}},
        "settings": {"warmup_s": 1, "duration_s": 5, "rounds": 1, "perf_ms": 2000, "perf_trials": 3},
        "mlserver_config": describe(BEST),
        "command": "python -m benchmarks.mlserver.compare",
        "duration_s": 10.0,
        "load_average_1m": {"start": 1.0, "end": 2.0},
        "cases": [
            {
                "model": "tiny",
                "concurrency": 8,
                "drive": {"mlserver": [run(100)], "mlserver-unbatched": [run(150)], "ferry": [run(400)]},
            },
        ],
    }
    section = compare.render(results)
    assert "| tiny | 8 | 100 | 150 | 400 | **4.00** (4.00) | 2.67 |" in section
    assert "= **4.00** (met)" in section
    assert "slower than the same server without it at 1 of 1" in section and "200 µs of CPU" in section
    core = "<!-- bench:core:start -->\nother\n<!-- bench:core:end -->"
    doc = f"intro\n\n{core}\n\n{compare.START}\nSTALE-SECTION\n{compare.END}\n"
    updated = compare.bench.replace_section(doc, section, compare.START, compare.END)
    assert "other" in updated and "STALE-SECTION" not in updated and section in updated

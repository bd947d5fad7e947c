"""config.pbtxt parsing, completion from the graph, version policy, and the server config object."""

from __future__ import annotations

from pathlib import Path

import pytest

from ferry.client._proto import model_config_pb2 as mc
from ferry.client.errors import InvalidArgument
from ferry.server.config import ServerConfig
from ferry.server.models.model import SessionSettings
from ferry.server.models.modelconfig import (
    DEFAULT_MAX_BATCH_SIZE,
    GraphTensor,
    complete_config,
    parse_config,
    select_versions,
    tensor_specs,
)

BATCHED_IN = [GraphTensor("input", "tensor(float)", (None, 16))]
BATCHED_OUT = [GraphTensor("output", "tensor(float)", (None, 4)), GraphTensor("label", "tensor(int64)", (None,))]


def test_parse_error_names_file_and_position() -> None:
    with pytest.raises(InvalidArgument, match=r"m/config.pbtxt: 2:1 .*no field named \"bogus_field\""):
        parse_config('name: "m"\nbogus_field: 3\n', "m/config.pbtxt")


def test_parses_a_triton_onnx_config_with_fields_ferry_does_not_use() -> None:
    text = """
    name: "resnet"
    platform: "onnxruntime_onnx"
    max_batch_size: 8
    input [ { name: "x" data_type: TYPE_FP32 format: FORMAT_NCHW dims: [ 3, 224, 224 ] } ]
    output [ { name: "y" data_type: TYPE_FP32 dims: [ 1000 ] label_filename: "labels.txt" } ]
    instance_group [ { count: 2 kind: KIND_CPU } ]
    dynamic_batching { preferred_batch_size: [ 4, 8 ] max_queue_delay_microseconds: 100 }
    optimization { execution_accelerators { cpu_execution_accelerator: [ { name: "openvino" } ] } }
    model_warmup [ { name: "w" batch_size: 1 inputs { key: "x" value { data_type: TYPE_FP32 dims: [3, 224, 224]
      zero_data: true } } } ]
    response_cache { enable: true }
    parameters { key: "intra_op_thread_count" value: { string_value: "1" } }
    """
    config = parse_config(text, "resnet/config.pbtxt")
    assert config.dynamic_batching.preferred_batch_size == [4, 8]
    assert config.instance_group[0].count == 2


def test_missing_config_is_completed_from_the_graph() -> None:
    done = complete_config(mc.ModelConfig(), "m", BATCHED_IN, BATCHED_OUT)
    assert done.name == "m" and done.platform == "onnxruntime_onnx"
    assert done.max_batch_size == DEFAULT_MAX_BATCH_SIZE
    assert [(t.name, mc.DataType.Name(t.data_type), list(t.dims)) for t in done.input] == [("input", "TYPE_FP32", [16])]
    assert [(t.name, list(t.dims)) for t in done.output] == [("output", [4]), ("label", [])]
    inputs, outputs = tensor_specs(done)
    assert inputs[0].wire_shape(done.max_batch_size) == [-1, 16]
    assert outputs[1].wire_shape(done.max_batch_size) == [-1]


def test_fixed_graph_gets_no_batch_dimension() -> None:
    graph = [GraphTensor("x", "tensor(float)", (2, 3))]
    done = complete_config(mc.ModelConfig(), "m", graph, [GraphTensor("y", "tensor(float)", (2, 3))])
    assert done.max_batch_size == 0 and list(done.input[0].dims) == [2, 3]


def test_declared_max_batch_size_is_kept_and_tensors_completed() -> None:
    done = complete_config(mc.ModelConfig(max_batch_size=8), "m", BATCHED_IN, BATCHED_OUT)
    assert done.max_batch_size == 8 and len(done.input) == 1 and len(done.output) == 2


def test_config_dims_left_open_take_the_graph_size() -> None:
    config = parse_config(
        'max_batch_size: 4 input [{name: "input" data_type: TYPE_FP32 dims: [-1]}] '
        'output [{name: "output" data_type: TYPE_FP32 dims: [4]}]',
        "c",
    )
    done = complete_config(config, "m", BATCHED_IN, BATCHED_OUT)
    assert list(done.input[0].dims) == [16]
    assert [t.name for t in done.output] == ["output"]  # a declared subset of outputs is served


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('name: "other"', "differs from the model directory name"),
        ('platform: "tensorrt_plan"', "ONNX models only"),
        ("max_batch_size: -1", "must be >= 0"),
        ('max_batch_size: 4 input [{name: "nope" data_type: TYPE_FP32 dims: [16]}]', "not in the ONNX graph"),
        ('max_batch_size: 4 input [{name: "input" data_type: TYPE_INT32 dims: [16]}]', "config says TYPE_INT32"),
        ('max_batch_size: 4 input [{name: "input" data_type: TYPE_FP32 dims: [15]}]', "do not fit graph dims"),
        ('max_batch_size: 0 input [{name: "input" data_type: TYPE_FP32 dims: [16]}]', "do not fit graph dims"),
        (
            'max_batch_size: 4 input [{name: "input" data_type: TYPE_FP32 dims: [16] reshape: {shape: [16]}}]',
            "reshape is not supported",
        ),
        (
            'max_batch_size: 4 input [{name: "input" data_type: TYPE_FP32 dims: [16]}, '
            '{name: "input" data_type: TYPE_FP32 dims: [16]}]',
            "declared twice",
        ),
    ],
)
def test_config_that_contradicts_the_graph_is_rejected(text: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        complete_config(parse_config(text, "c"), "m", BATCHED_IN, BATCHED_OUT)


def test_max_batch_size_needs_a_dynamic_first_dimension() -> None:
    graph = [GraphTensor("x", "tensor(float)", (2, 3))]
    with pytest.raises(InvalidArgument, match="dynamic first dimension"):
        complete_config(mc.ModelConfig(max_batch_size=4), "m", graph, graph)


def test_missing_graph_input_in_config_is_rejected() -> None:
    graph = [*BATCHED_IN, GraphTensor("mask", "tensor(bool)", (None, 16))]
    config = parse_config('max_batch_size: 4 input [{name: "input" data_type: TYPE_FP32 dims: [16]}]', "c")
    with pytest.raises(InvalidArgument, match=r"lacks graph inputs \['mask'\]"):
        complete_config(config, "m", graph, BATCHED_OUT)


@pytest.mark.parametrize(
    ("policy", "served", "missing"),
    [
        ("", [3], set()),
        ("version_policy: { latest { num_versions: 2 } }", [2, 3], set()),
        ("version_policy: { all { } }", [1, 2, 3], set()),
        ("version_policy: { specific { versions: [1, 3, 7] } }", [1, 3], {7}),
    ],
)
def test_version_policy(policy: str, served: list[int], missing: set[int]) -> None:
    chosen, absent = select_versions(parse_config(policy, "c"), [3, 1, 2])
    assert chosen == served and set(absent) == missing


def test_server_config_rejects_unknown_keys_and_bad_values(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="unknown configuration keys: \\['grpc_prot'\\]"):
        ServerConfig.build(model_repository=tmp_path, grpc_prot=1)
    with pytest.raises(InvalidArgument, match="grpc_port"):
        ServerConfig.build(model_repository=tmp_path, grpc_port=70000)
    with pytest.raises(InvalidArgument, match="not a directory"):
        ServerConfig.build(model_repository=tmp_path / "nope")
    with pytest.raises(InvalidArgument, match="graph_optimization_level"):
        ServerConfig.build(model_repository=tmp_path, graph_optimization_level="max")


def test_session_settings_from_flags_overridden_by_model_parameters(tmp_path: Path) -> None:
    server = ServerConfig.build(model_repository=tmp_path, intra_op_threads=2, graph_optimization_level="basic")
    plain = SessionSettings.resolve(server, mc.ModelConfig(name="m"))
    assert (plain.intra_op_threads, plain.graph_optimization_level) == (2, "basic")
    config = parse_config(
        'name: "m" parameters { key: "intra_op_thread_count" value: { string_value: "1" } } '
        'parameters { key: "graph_optimization_level" value: { string_value: "disable" } }',
        "c",
    )
    tuned = SessionSettings.resolve(server, config)
    assert (tuned.intra_op_threads, tuned.graph_optimization_level) == (1, "disable")
    bad = parse_config('name: "m" parameters { key: "intra_op_thread_count" value: { string_value: "x" } }', "c")
    with pytest.raises(InvalidArgument, match="intra_op_thread_count must be an integer"):
        SessionSettings.resolve(server, bad)


def test_cuda_falls_back_to_cpu_when_onnxruntime_has_no_cuda(tmp_path: Path) -> None:
    import onnxruntime as ort

    server = ServerConfig.build(model_repository=tmp_path, execution_provider="cuda")
    providers = SessionSettings.resolve(server, mc.ModelConfig(name="m")).providers()
    if "CUDAExecutionProvider" in ort.get_available_providers():
        assert providers[0] == "CUDAExecutionProvider"
    else:
        assert providers == ["CPUExecutionProvider"]

"""The generated protobuf code is up to date, and Ferry's wire types match Triton's as tritonclient has them.

tritonclient ships its own compiled copies of Triton's ``model_config.proto`` and ``grpc_service.proto`` and
registers them in protobuf's default descriptor pool. Ferry's generated modules use a private pool
(``client._proto.POOL``, see protos/generate.py), so both can live in one process and be compared directly.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import tritonclient.grpc.model_config_pb2 as triton_config_pb2
import tritonclient.grpc.service_pb2 as triton_service_pb2
from google.protobuf import descriptor_pb2, text_format
from google.protobuf.descriptor import FileDescriptor

from ferry.client._proto import POOL, ferry_pb2, grpc_service_pb2, model_config_pb2

REPO_ROOT = Path(__file__).resolve().parents[2]
GENERATE = REPO_ROOT / "protos" / "generate.py"
COMMITTED = REPO_ROOT / "client" / "_proto"

# What Ferry has beyond tritonclient 2.41 (Dec 2023): additions to Triton's published protos since then.
NEWER_THAN_TRITONCLIENT_2_41 = {
    "message inference.ModelInput field is_non_linear_format_io",
    "message inference.ModelOutput field is_non_linear_format_io",
    "message inference.ModelEnsembling field max_inflight_requests",
    "message inference.ModelMetrics",
    "message inference.ModelMetrics.MetricControl",
    "message inference.ModelMetrics.MetricControl.MetricIdentifier",
    "message inference.ModelMetrics.MetricControl.HistogramOptions",
    "message inference.ModelConfig field runtime",
    "message inference.ModelConfig field model_metrics",
    "message inference.InferResponseStatistics",
    "message inference.ModelStatistics field response_stats",
    "message inference.ModelStatistics.ResponseStatsEntry",
}


def _files(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in directory.iterdir() if path.is_file()}


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(GENERATE), "--out", str(tmp_path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr

    fresh, committed = _files(tmp_path), _files(COMMITTED)
    assert sorted(fresh) == sorted(committed), "client/_proto has missing or extra files"
    stale = sorted(name for name in fresh if fresh[name] != committed[name])
    assert not stale, f"client/_proto is out of date ({stale}): run python protos/generate.py"


def _signature(file: FileDescriptor) -> dict[str, dict[str, tuple]]:
    """Everything about a .proto file that shows on the wire or in text format, keyed by element.

    Keys look like ``message inference.ModelConfig``; values map each field, enum value or method name to
    the facts that must agree (number, label, type, type name, oneof; value number; request/response types
    and streaming flags).
    """
    proto = descriptor_pb2.FileDescriptorProto()
    file.CopyToProto(proto)
    out: dict[str, dict[str, tuple]] = {}

    def add_enum(enum: descriptor_pb2.EnumDescriptorProto, scope: str) -> None:
        out[f"enum {scope}.{enum.name}"] = {value.name: (value.number,) for value in enum.value}

    def add_message(message: descriptor_pb2.DescriptorProto, scope: str) -> None:
        name = f"{scope}.{message.name}"
        oneofs = [oneof.name for oneof in message.oneof_decl]
        out[f"message {name}"] = {
            field.name: (
                field.number,
                field.label,
                field.type,
                field.type_name,
                oneofs[field.oneof_index] if field.HasField("oneof_index") else None,
            )
            for field in message.field
        }
        out[f"message {name}"]["<map entry>"] = (message.options.map_entry,)
        for nested in message.nested_type:
            add_message(nested, name)
        for enum in message.enum_type:
            add_enum(enum, name)

    for message in proto.message_type:
        add_message(message, proto.package)
    for enum in proto.enum_type:
        add_enum(enum, proto.package)
    for service in proto.service:
        out[f"service {proto.package}.{service.name}"] = {
            method.name: (
                method.input_type,
                method.output_type,
                method.client_streaming,
                method.server_streaming,
            )
            for method in service.method
        }
    return out


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (model_config_pb2.DESCRIPTOR, triton_config_pb2.DESCRIPTOR),
        (grpc_service_pb2.DESCRIPTOR, triton_service_pb2.DESCRIPTOR),
    ],
    ids=["model_config", "grpc_service"],
)
def test_wire_compatible_with_triton_client(ours: FileDescriptor, theirs: FileDescriptor) -> None:
    assert (ours.name, ours.package) == (theirs.name, theirs.package)
    assert [dep.name for dep in ours.dependencies] == [dep.name for dep in theirs.dependencies]
    ours_sig, theirs_sig = _signature(ours), _signature(theirs)

    mismatches = []
    for element, members in theirs_sig.items():
        if element not in ours_sig:
            mismatches.append(f"{element}: missing")
            continue
        for member, facts in members.items():
            if ours_sig[element].get(member) != facts:
                mismatches.append(f"{element} {member}: ours {ours_sig[element].get(member)}, Triton {facts}")
    assert not mismatches, "\n".join(mismatches)

    extras = {element for element in ours_sig if element not in theirs_sig}
    extras |= {
        f"{element} field {member}"
        for element, members in theirs_sig.items()
        for member in ours_sig[element].keys() - members.keys()
    }
    unexpected = extras - NEWER_THAN_TRITONCLIENT_2_41
    assert not unexpected, f"not in tritonclient 2.41 nor known as newer Triton additions: {sorted(unexpected)}"


def test_rpcs_in_tritons_order() -> None:
    def methods(file: FileDescriptor) -> list[str]:
        return [method.name for method in file.services_by_name["GRPCInferenceService"].methods]

    assert methods(grpc_service_pb2.DESCRIPTOR) == methods(triton_service_pb2.DESCRIPTOR)


def test_messages_round_trip_through_tritonclient() -> None:
    """Bytes written by one side parse to the same message on the other (fields known to both)."""
    config = text_format.Parse(
        textwrap.dedent(
            """
            name: "resnet" platform: "onnxruntime_onnx" max_batch_size: 8
            input { name: "x" data_type: TYPE_FP32 format: FORMAT_NCHW dims: [3, -1, -1] }
            output { name: "y" data_type: TYPE_STRING dims: [1000] label_filename: "labels.txt" }
            dynamic_batching {
              preferred_batch_size: [4, 8] max_queue_delay_microseconds: 100
              priority_queue_policy { key: 1 value { timeout_action: DELAY max_queue_size: 16 } }
            }
            instance_group { kind: KIND_CPU count: 2 }
            parameters { key: "k" value { string_value: "v" } }
            """
        ),
        model_config_pb2.ModelConfig(),
    )
    response = grpc_service_pb2.ModelConfigResponse(config=config)
    theirs = triton_service_pb2.ModelConfigResponse.FromString(response.SerializeToString())
    assert text_format.MessageToString(theirs) == text_format.MessageToString(response)

    request = triton_service_pb2.ModelInferRequest(model_name="m", id="42", raw_input_contents=[b"\x01\x02"])
    request.parameters["priority"].uint64_param = 3
    tensor = request.inputs.add(name="x", datatype="FP32", shape=[1, 2])
    tensor.parameters["shared_memory_region"].string_param = "r"
    ours = grpc_service_pb2.ModelInferRequest.FromString(request.SerializeToString())
    assert ours.SerializeToString(deterministic=True) == request.SerializeToString(deterministic=True)


def test_parses_a_config_with_fields_newer_than_tritonclient() -> None:
    config = text_format.Parse(
        textwrap.dedent(
            """
            name: "pipeline" platform: "ensemble" runtime: "libtriton_onnxruntime.so"
            input { name: "x" data_type: TYPE_BF16 dims: [4] is_non_linear_format_io: true }
            ensemble_scheduling {
              max_inflight_requests: 4
              step { model_name: "a" model_version: -1 input_map { key: "in" value: "x" } }
            }
            model_metrics {
              metric_control {
                metric_identifier { family: "nv_inference_first_response_histogram_ms" }
                histogram_options { buckets: [1, 10, 100] }
              }
            }
            """
        ),
        model_config_pb2.ModelConfig(),
    )
    assert config.ensemble_scheduling.max_inflight_requests == 4
    assert list(config.model_metrics.metric_control[0].histogram_options.buckets) == [1, 10, 100]


def test_ferry_protos_use_a_private_descriptor_pool() -> None:
    assert grpc_service_pb2.DESCRIPTOR.pool is POOL
    assert model_config_pb2.DESCRIPTOR.pool is POOL
    assert ferry_pb2.DESCRIPTOR.pool is POOL
    assert ferry_pb2.DESCRIPTOR.package == "ferry.v1"


@pytest.mark.parametrize(
    "imports",
    [
        "import client._proto.grpc_service_pb2_grpc; import tritonclient.grpc",
        "import tritonclient.grpc; import client._proto.grpc_service_pb2_grpc",
    ],
    ids=["ferry-first", "tritonclient-first"],
)
def test_ferry_and_tritonclient_import_in_one_process(imports: str) -> None:
    # A fresh interpreter, because the order of first import is what used to matter.
    result = subprocess.run(
        [sys.executable, "-W", "error::UserWarning", "-c", imports],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_has_triton_additions_newer_than_tritonclient() -> None:
    ours = _signature(model_config_pb2.DESCRIPTOR) | _signature(grpc_service_pb2.DESCRIPTOR)
    present = set(ours) | {f"{element} field {member}" for element, members in ours.items() for member in members}
    assert sorted(NEWER_THAN_TRITONCLIENT_2_41 - present) == []

"""Builders of small test-only ONNX models, for tests that assemble temporary model repositories.

Each builder writes one ONNX file to ``path`` (usually ``<repo>/<model>/<version>/model.onnx``), creating its
folders. The first dimension is a dynamic batch dimension (``dim_param "batch"``) unless said otherwise.

- ``write_identity_all_types``: ``in_<DT>`` -> ``out_<DT>``, [N, 3], for each DT in ``IDENTITY_DATATYPES``
- ``write_add``: FP32 ``a``, ``b`` [N, dims] -> ``sum`` = a + b, ``diff`` = a - b
- ``write_fixed_shape``: FP32 ``x`` [2, 3], no batch dimension (``max_batch_size: 0``) -> ``y`` = 2 * x
- ``write_scale``: FP32 ``input`` [N, 4] -> ``output`` = factor * input (tells versions apart)
- ``write_corrupt``: bytes that are not an ONNX model, which onnxruntime refuses to load
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8  # the IR version that goes with opset 17
BATCH = "batch"

# Ferry (KServe v2) datatype name -> ONNX element type; BYTES travels as ONNX STRING.
IDENTITY_DATATYPES: dict[str, int] = {
    "BOOL": TensorProto.BOOL,
    "UINT8": TensorProto.UINT8,
    "UINT16": TensorProto.UINT16,
    "UINT32": TensorProto.UINT32,
    "UINT64": TensorProto.UINT64,
    "INT8": TensorProto.INT8,
    "INT16": TensorProto.INT16,
    "INT32": TensorProto.INT32,
    "INT64": TensorProto.INT64,
    "FP16": TensorProto.FLOAT16,
    "FP32": TensorProto.FLOAT,
    "FP64": TensorProto.DOUBLE,
    "BYTES": TensorProto.STRING,
}


def _value(name: str, shape: Sequence[int | str], elem_type: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, list(shape))


def _scalar(name: str, value: float) -> TensorProto:
    return numpy_helper.from_array(np.array(value, dtype=np.float32), name)


def _save(
    path: pathlib.Path,
    nodes: Sequence[onnx.NodeProto],
    inputs: Sequence[onnx.ValueInfoProto],
    outputs: Sequence[onnx.ValueInfoProto],
    initializers: Sequence[TensorProto] = (),
) -> None:
    graph = helper.make_graph(list(nodes), "ferry_test", list(inputs), list(outputs), list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    onnx.checker.check_model(model, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, path)


def write_identity_all_types(path: pathlib.Path) -> None:
    """One Identity per datatype: ``in_<DT>`` [N, 3] -> ``out_<DT>`` [N, 3]."""
    _save(
        path,
        [helper.make_node("Identity", [f"in_{dt}"], [f"out_{dt}"]) for dt in IDENTITY_DATATYPES],
        [_value(f"in_{dt}", [BATCH, 3], elem_type) for dt, elem_type in IDENTITY_DATATYPES.items()],
        [_value(f"out_{dt}", [BATCH, 3], elem_type) for dt, elem_type in IDENTITY_DATATYPES.items()],
    )


def write_add(path: pathlib.Path, dims: int = 4) -> None:
    """FP32 ``a``, ``b`` [N, dims] -> ``sum`` = a + b and ``diff`` = a - b, both [N, dims]."""
    shape: list[int | str] = [BATCH, dims]
    _save(
        path,
        [helper.make_node("Add", ["a", "b"], ["sum"]), helper.make_node("Sub", ["a", "b"], ["diff"])],
        [_value("a", shape), _value("b", shape)],
        [_value("sum", shape), _value("diff", shape)],
    )


def write_fixed_shape(path: pathlib.Path) -> None:
    """FP32 ``x`` of fixed shape [2, 3], with no batch dimension -> ``y`` = 2 * x."""
    _save(
        path,
        [helper.make_node("Mul", ["x", "two"], ["y"])],
        [_value("x", [2, 3])],
        [_value("y", [2, 3])],
        [_scalar("two", 2.0)],
    )


def write_scale(path: pathlib.Path, factor: float) -> None:
    """FP32 ``input`` [N, 4] -> ``output`` = factor * input; versions 1, 2, 3 use factors 1, 2, 3."""
    _save(
        path,
        [helper.make_node("Mul", ["input", "factor"], ["output"])],
        [_value("input", [BATCH, 4])],
        [_value("output", [BATCH, 4])],
        [_scalar("factor", factor)],
    )


def write_corrupt(path: pathlib.Path) -> None:
    """Bytes that do not parse as an ONNX model (a zero protobuf tag is invalid), so loading must fail."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x00 this is not an ONNX model \xff")

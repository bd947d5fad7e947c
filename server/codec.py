"""Inference requests to numpy and numpy to responses, checked against a model version's tensor specs.

The fast path is raw contents: ``np.frombuffer`` over the request's bytes, no copy. Every error names the model,
version, tensor, and what was expected versus received.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from client._proto import grpc_service_pb2 as pb
from client.errors import InvalidArgument
from client.tensors import from_contents, from_raw, to_raw
from server.model import ModelVersion
from server.modelconfig import TensorSpec


def decode_inputs(request: pb.ModelInferRequest, model: ModelVersion) -> tuple[dict[str, np.ndarray], int]:
    """The model's feeds from a request, and its row count (0 for a model without a batch dimension)."""
    where = model.describe()
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgument(
            f"{where}: {len(raw)} raw_input_contents for {len(request.inputs)} inputs; send one per input"
        )
    feeds: dict[str, np.ndarray] = {}
    rows: int | None = None
    for i, tensor in enumerate(request.inputs):
        spec = model.input_by_name.get(tensor.name)
        what = f"{where} input {tensor.name!r}"
        if spec is None:
            raise InvalidArgument(f"{where}: unexpected input {tensor.name!r}; inputs are {list(model.input_by_name)}")
        if tensor.name in feeds:
            raise InvalidArgument(f"{what}: given more than once")
        if tensor.datatype != spec.datatype.name:
            raise InvalidArgument(f"{what}: expected datatype {spec.datatype.name}, got {tensor.datatype!r}")
        shape = list(tensor.shape)
        batch = _check_shape(spec, shape, model.max_batch_size, what)
        if rows is None:
            rows = batch
        elif batch != rows:
            raise InvalidArgument(f"{what}: batch size {batch} differs from the other inputs' {rows}")
        if raw:
            if tensor.HasField("contents"):
                raise InvalidArgument(f"{what}: contents must not be set when the request uses raw_input_contents")
            array = from_raw(raw[i], spec.datatype, shape, what)
        elif tensor.HasField("contents"):
            array = from_contents(tensor.contents, spec.datatype, shape, what)
        else:
            raise InvalidArgument(f"{what}: no data (neither raw_input_contents nor contents)")
        feeds[tensor.name] = _as_strings(array, what) if spec.datatype.name == "BYTES" else array
    missing = [t.name for t in model.inputs if t.name not in feeds and not t.optional]
    if missing:
        raise InvalidArgument(f"{where}: missing inputs {missing}")
    return feeds, rows or 0


def _check_shape(spec: TensorSpec, shape: list[int], max_batch_size: int, what: str) -> int:
    expected = spec.wire_shape(max_batch_size)
    if len(shape) != len(expected):
        raise InvalidArgument(f"{what}: expected shape {expected} (rank {len(expected)}), got {shape}")
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"{what}: shape {shape} has a negative dimension")
    if any(e not in (-1, d) for e, d in zip(expected, shape, strict=True)):
        raise InvalidArgument(f"{what}: expected shape {expected}, got {shape}")
    if max_batch_size <= 0:
        return 0
    if not 1 <= shape[0] <= max_batch_size:
        raise InvalidArgument(f"{what}: batch size {shape[0]} is outside 1..{max_batch_size} (max_batch_size)")
    return shape[0]


def _as_strings(array: np.ndarray, what: str) -> np.ndarray:
    # onnxruntime string tensors take str (bytes would be fed as their repr): decode once, strictly.
    out = np.empty(array.shape, dtype=object)
    flat = out.reshape(-1)
    for i, item in enumerate(array.reshape(-1)):
        try:
            flat[i] = item.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidArgument(f"{what}: BYTES element {i} is not UTF-8, which ONNX string tensors need") from None
    return out


def requested_outputs(request: pb.ModelInferRequest, model: ModelVersion) -> list[str]:
    """Names of the outputs to compute: those the request asks for, in its order, or all of the model's."""
    if not request.outputs:
        return model.output_names
    names = [o.name for o in request.outputs]
    for name in names:
        if name not in model.output_by_name:
            raise InvalidArgument(f"{model.describe()}: unknown output {name!r}; outputs are {model.output_names}")
    if len(set(names)) != len(names):
        raise InvalidArgument(f"{model.describe()}: an output is requested more than once in {names}")
    return names


def encode_response(
    request: pb.ModelInferRequest, model: ModelVersion, names: Sequence[str], arrays: Sequence[np.ndarray]
) -> pb.ModelInferResponse:
    """A response with one raw_output_contents entry per output, in output order, echoing id and version."""
    response = pb.ModelInferResponse(model_name=model.name, model_version=model.version_str, id=request.id)
    for name, array in zip(names, arrays, strict=True):
        spec = model.output_by_name[name]
        out = response.outputs.add()
        out.name = name
        out.datatype = spec.datatype.name
        out.shape.extend(array.shape)
        response.raw_output_contents.append(to_raw(array, spec.datatype))
    return response

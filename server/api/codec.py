"""Inference requests to numpy and numpy to responses, checked against a model version's tensor specs.

The fast path is raw contents: ``np.frombuffer`` over the request's bytes, no copy. Every error names the model,
version, tensor, and what was expected versus received.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ferry.client._proto import grpc_service_pb2 as pb
from ferry.client.errors import InvalidArgument
from ferry.client.tensors import from_contents, from_raw, to_raw
from ferry.server.models.model import ModelVersion


def decode_inputs(request: pb.ModelInferRequest, model: ModelVersion) -> tuple[dict[str, np.ndarray], int]:
    """The model's feeds from a request, and its row count (0 for a model without a batch dimension)."""
    raw = request.raw_input_contents
    inputs = request.inputs
    if raw and len(raw) != len(inputs):
        raise InvalidArgument(
            f"{model.describe()}: {len(raw)} raw_input_contents for {len(inputs)} inputs; send one per input"
        )
    specs = model.input_by_name
    batching = model.max_batch_size > 0
    feeds: dict[str, np.ndarray] = {}
    rows = -1
    for i, tensor in enumerate(inputs):
        name = tensor.name
        spec = specs.get(name)
        if spec is None:
            raise InvalidArgument(f"{model.describe()}: unexpected input {name!r}; inputs are {list(specs)}")
        what = model.input_what[name]
        if name in feeds:
            raise InvalidArgument(f"{what}: given more than once")
        datatype = spec.datatype
        if tensor.datatype != datatype.name:
            raise InvalidArgument(
                f"{what}: expected datatype {datatype.name} (shape {list(spec.wire)}), got {tensor.datatype!r}"
            )
        shape = tensor.shape  # a protobuf container: slow to iterate, so the common case compares it once
        if batching:
            batch = shape[0] if shape else 0
            if batch > 0 and spec.fixed is not None and len(shape) == len(spec.wire) and shape[1:] == spec.fixed:
                dims = [batch, *spec.fixed]
            else:
                dims = _checked_shape(shape, spec.wire, what)
            if not 1 <= batch <= model.max_batch_size:
                raise InvalidArgument(
                    f"{what}: batch size {batch} is outside 1..{model.max_batch_size} (max_batch_size)"
                )
            if rows < 0:
                rows = batch
            elif batch != rows:
                raise InvalidArgument(f"{what}: batch size {batch} differs from the other inputs' {rows}")
        else:
            dims = (
                spec.fixed if spec.fixed is not None and shape == spec.fixed else _checked_shape(shape, spec.wire, what)
            )
        if raw:
            if tensor.HasField("contents"):
                raise InvalidArgument(f"{what}: contents must not be set when the request uses raw_input_contents")
            array = from_raw(raw[i], datatype, dims, what)
        elif tensor.HasField("contents"):
            array = from_contents(tensor.contents, datatype, dims, what)
        else:
            raise InvalidArgument(f"{what}: no data (neither raw_input_contents nor contents)")
        feeds[name] = _as_strings(array, what) if datatype.name == "BYTES" else array
    if len(feeds) != len(model.inputs):
        missing = [t.name for t in model.inputs if t.name not in feeds and not t.optional]
        if missing:
            raise InvalidArgument(f"{model.describe()}: missing inputs {missing}")
    return feeds, max(rows, 0)


def _checked_shape(wire: Sequence[int], expected: tuple[int, ...], what: str) -> list[int]:
    """The general shape check (-1 matches any size), for shapes the fixed-dims fast check did not accept."""
    shape = list(wire)
    if len(shape) != len(expected) or any(d < 0 or e not in (-1, d) for e, d in zip(expected, shape)):  # noqa: B905
        raise _shape_error(shape, expected, what)
    return shape


def _shape_error(shape: list[int], expected: tuple[int, ...], what: str) -> InvalidArgument:
    wanted = list(expected)
    if len(shape) != len(expected):
        return InvalidArgument(f"{what}: expected shape {wanted} (rank {len(expected)}), got {shape}")
    if any(d < 0 for d in shape):
        return InvalidArgument(f"{what}: shape {shape} has a negative dimension")
    return InvalidArgument(f"{what}: expected shape {wanted}, got {shape}")


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

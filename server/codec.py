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


def decode_inputs(request: pb.ModelInferRequest, model: ModelVersion) -> tuple[dict[str, np.ndarray], int]:
    """The model's feeds from a request, and its row count (0 for a model without a batch dimension)."""
    raw = request.raw_input_contents
    inputs = request.inputs
    if raw and len(raw) != len(inputs):
        raise InvalidArgument(
            f"{model.describe()}: {len(raw)} raw_input_contents for {len(inputs)} inputs; send one per input"
        )
    specs = model.input_by_name
    mbs = model.max_batch_size
    feeds: dict[str, np.ndarray] = {}
    rows = -1
    for i, tensor in enumerate(inputs):
        name = tensor.name
        spec = specs.get(name)
        if spec is None:
            raise InvalidArgument(f"{model.describe()}: unexpected input {name!r}; inputs are {list(specs)}")
        if name in feeds:
            raise InvalidArgument(f"{_what(model, name)}: given more than once")
        datatype = spec.datatype
        if tensor.datatype != datatype.name:
            raise InvalidArgument(
                f"{_what(model, name)}: expected datatype {datatype.name} (shape {list(spec.wire)}), "
                f"got {tensor.datatype!r}"
            )
        shape = list(tensor.shape)
        expected = spec.wire
        if len(shape) != len(expected) or any(d < 0 or e not in (-1, d) for e, d in zip(expected, shape)):  # noqa: B905
            raise _shape_error(shape, expected, _what(model, name))
        if mbs > 0:
            batch = shape[0]
            if not 1 <= batch <= mbs:
                raise InvalidArgument(f"{_what(model, name)}: batch size {batch} is outside 1..{mbs} (max_batch_size)")
            if rows < 0:
                rows = batch
            elif batch != rows:
                raise InvalidArgument(f"{_what(model, name)}: batch size {batch} differs from the other inputs' {rows}")
        if raw:
            if tensor.HasField("contents"):
                raise InvalidArgument(
                    f"{_what(model, name)}: contents must not be set when the request uses raw_input_contents"
                )
            array = from_raw(raw[i], datatype, shape, _what(model, name))
        elif tensor.HasField("contents"):
            array = from_contents(tensor.contents, datatype, shape, _what(model, name))
        else:
            raise InvalidArgument(f"{_what(model, name)}: no data (neither raw_input_contents nor contents)")
        feeds[name] = _as_strings(array, _what(model, name)) if datatype.name == "BYTES" else array
    if len(feeds) != len(model.inputs):
        missing = [t.name for t in model.inputs if t.name not in feeds and not t.optional]
        if missing:
            raise InvalidArgument(f"{model.describe()}: missing inputs {missing}")
    return feeds, max(rows, 0)


def _what(model: ModelVersion, name: str) -> str:
    """How an error names a tensor (built only when there is an error to report)."""
    return f"{model.describe()} input {name!r}"


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

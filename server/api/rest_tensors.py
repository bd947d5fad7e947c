"""Inference bodies over REST: the protocol's JSON tensors and Triton's binary tensor extension, to a
``ModelInferRequest`` and from a ``ModelInferResponse``.

A request body is a JSON object, optionally followed by binary tensor data: the ``Inference-Header-Content-Length``
header gives the JSON's length, and each input with a ``binary_data_size`` parameter takes that many bytes of what
follows, in input order. Every input becomes a ``raw_input_contents`` entry (a binary input's bytes as they came, a
JSON input's ``data`` packed once by numpy), so one request may mix both and the server's codec sees one form. A
binary input never passes through Python lists.

A response's outputs are JSON ``data`` (flat, row-major) or binary parts after the JSON (``binary_data_size``), as
the request's ``binary_data_output`` parameter and each requested output's ``binary_data`` parameter ask.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from ferry.client._proto import grpc_service_pb2 as pb
from ferry.client.errors import InvalidArgument
from ferry.client.tensors import DATATYPES, from_contents, from_raw

_LENGTH = struct.Struct("<I")
_INT64 = (-(2**63), 2**63 - 1)
_UINT64_MAX = 2**64 - 1

_KINDS = {  # numpy kinds a JSON array may arrive as, per target kind: no floats into integers, no numbers into BOOL
    "b": "b",
    "i": "iu",
    "u": "iu",
    "f": "iuf",
}


@dataclass(slots=True)
class Outputs:
    """Which outputs a response sends as binary parts: each named in ``binary`` as it says, the others as the
    request's ``binary_data_output`` parameter says."""

    default_binary: bool = False
    binary: dict[str, bool] = field(default_factory=dict)

    def is_binary(self, name: str) -> bool:
        return self.binary.get(name, self.default_binary)


def parse_json(data: bytes | memoryview, what: str) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as err:
        raise InvalidArgument(f"{what} is not valid JSON: {err}") from None


_REQUEST_FIELDS = frozenset({"id", "parameters", "inputs", "outputs", "model_name", "model_version"})


def infer_request(
    model: str, version: str, body: bytes, header_length: str | None
) -> tuple[pb.ModelInferRequest, Outputs]:
    """The ModelInferRequest of a REST inference body, and how its outputs are to be sent.

    The message is written in protobuf's wire format and parsed once (upb, in C): setting its fields one by one
    from Python cost twice as much. Binary tensor data goes from the body into the message in one copy."""
    view = memoryview(body)
    if header_length is None:
        json_end = len(body)
    else:
        try:
            json_end = int(header_length)
        except ValueError:
            raise InvalidArgument(
                f"Inference-Header-Content-Length must be an integer, got {header_length!r}"
            ) from None
        if not 0 <= json_end <= len(body):
            raise InvalidArgument(f"Inference-Header-Content-Length {json_end} is outside the body's {len(body)} bytes")
    doc = parse_json(body if json_end == len(body) else body[:json_end], "the inference request")
    if not isinstance(doc, dict):
        raise InvalidArgument(f"the inference request must be a JSON object, got {_kind(doc)}")
    if not doc.keys() <= _REQUEST_FIELDS:
        raise InvalidArgument(f"the inference request has unknown fields {sorted(doc.keys() - _REQUEST_FIELDS)}")
    for key, given in (("model_name", model), ("model_version", version)):  # KServe's client sends them
        value = doc.get(key, given)
        if not isinstance(value, str):
            raise InvalidArgument(f"'{key}' must be a string, got {_kind(value)}")
        if value != given and not (key == "model_version" and value == ""):
            raise InvalidArgument(f"{key} {value!r} in the body differs from {given!r} in the path")
    request_id = doc.get("id", "")
    if not isinstance(request_id, str):
        raise InvalidArgument(f"'id' must be a string, got {_kind(request_id)}")
    wire: list[bytes | memoryview] = [_text(b"\x0a", model)]  # field 1: model_name
    if version:
        wire.append(_text(b"\x12", version))  # 2: model_version
    if request_id:
        wire.append(_text(b"\x1a", request_id))  # 3: id
    outputs = Outputs()
    later: list[tuple[str, int, dict[str, Any], str]] = []  # parameters to set once the message is parsed
    if "parameters" in doc:
        params = _object(doc["parameters"], "'parameters'")
        if "binary_data_output" in params:
            outputs.default_binary = _bool(params.pop("binary_data_output"), "parameter 'binary_data_output'")
        if params:
            later.append(("request", 0, params, "request parameter"))

    inputs = doc.get("inputs")
    if not isinstance(inputs, list):
        raise InvalidArgument(f"'inputs' must be a list of tensors, got {_kind(inputs)}")
    raws: list[bytes | memoryview] = []
    offset = json_end
    for i, item in enumerate(inputs):
        offset = _add_input(wire, raws, later, item, i, view, offset)
    if offset != len(body):
        raise InvalidArgument(
            f"the body has {len(body) - offset} bytes after the JSON and the binary data its inputs declare"
        )

    if "outputs" in doc:
        for i, item in enumerate(_list(doc["outputs"], "'outputs'")):
            what = f"outputs[{i}]"
            item = _object(item, what)
            name = item.get("name")
            if not isinstance(name, str):
                raise InvalidArgument(f"{what}: 'name' must be a string, got {_kind(name)}")
            wire.append(_length(b"\x32", _text(b"\x0a", name)))  # 6: outputs, with 1: name
            if "parameters" in item:
                out_params = _object(item["parameters"], f"output {name!r} parameters")
                if "binary_data" in out_params:
                    binary = _bool(out_params.pop("binary_data"), f"output {name!r} parameter 'binary_data'")
                    outputs.binary[name] = binary
                if out_params:
                    later.append(("output", i, out_params, f"output {name!r} parameter"))
    for raw in raws:  # 7: raw_input_contents
        wire += (b"\x3a", _varint(len(raw)), raw)
    request = pb.ModelInferRequest.FromString(b"".join(wire))
    for kind, index, params, what in later:
        target = (
            request.parameters
            if kind == "request"
            else (request.inputs if kind == "input" else request.outputs)[index].parameters
        )
        set_parameters(target, params, what)
    return request, outputs


def _add_input(
    wire: list[bytes | memoryview],
    raws: list[bytes | memoryview],
    later: list[tuple[str, int, dict[str, Any], str]],
    item: Any,
    index: int,
    body: memoryview,
    offset: int,
) -> int:
    """Add one input to ``wire`` (its tensor) and ``raws`` (its raw contents); returns the offset of the next
    binary part."""
    item = _object(item, f"inputs[{index}]")
    name = item.get("name")
    if not isinstance(name, str):
        raise InvalidArgument(f"inputs[{index}]: 'name' must be a string, got {_kind(name)}")
    what = f"input {name!r}"
    datatype = item.get("datatype")
    if not isinstance(datatype, str):
        raise InvalidArgument(f"{what}: 'datatype' must be a string, got {_kind(datatype)}")
    shape = item.get("shape")
    if not isinstance(shape, list) or not all(type(d) is int and _INT64[0] <= d <= _INT64[1] for d in shape):
        raise InvalidArgument(f"{what}: 'shape' must be a list of integers, got {shape!r}")
    dims = b"".join([_varint(d) for d in shape])
    tensor = _text(b"\x0a", name) + _text(b"\x12", datatype) + (_length(b"\x1a", dims) if dims else b"")
    wire.append(_length(b"\x2a", tensor))  # 5: inputs, with 1: name, 2: datatype, 3: shape (packed)
    size = None
    if "parameters" in item:
        params = _object(item["parameters"], f"{what} parameters")
        size = params.pop("binary_data_size", None)
        if params:
            later.append(("input", index, params, f"{what} parameter"))
    data = item.get("data")
    if size is not None:
        if data is not None:
            raise InvalidArgument(f"{what}: give 'data' or the binary_data_size parameter, not both")
        if type(size) is not int or size < 0:
            raise InvalidArgument(f"{what}: binary_data_size must be a non-negative integer, got {size!r}")
        if offset + size > len(body):
            raise InvalidArgument(
                f"{what}: binary_data_size {size} runs past the end of the body ({len(body) - offset} bytes left)"
            )
        raws.append(body[offset : offset + size])
        return offset + size
    if data is None:
        raise InvalidArgument(f"{what}: no data (neither 'data' nor the binary_data_size parameter)")
    raws.append(pack(data, datatype, shape, what))
    return offset


_BYTES = [bytes((n,)) for n in range(128)]


def _varint(n: int) -> bytes:
    """``n`` as a protobuf varint (negative: its 64-bit two's complement, as int64 fields have it)."""
    if 0 <= n < 128:
        return _BYTES[n]
    n &= 0xFFFFFFFFFFFFFFFF
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _length(tag: bytes, data: bytes) -> bytes:
    """A length-delimited field: ``tag`` (its number and wire type 2, one byte), the length, the data."""
    return tag + _varint(len(data)) + data


def _text(tag: bytes, text: str) -> bytes:
    return _length(tag, text.encode())


def pack(data: Any, datatype: str, shape: Sequence[int], what: str) -> bytes:
    """JSON ``data`` (flat or nested) as raw contents of ``datatype``, checked against the element count of
    ``shape``."""
    spec = DATATYPES.get(datatype)
    if spec is None:
        raise InvalidArgument(f"{what}: unknown datatype {datatype!r}; datatypes are {sorted(DATATYPES)}")
    if not isinstance(data, list):
        data = [data]
    expected = -1 if any(d < 0 for d in shape) else int(np.prod(shape, dtype=object))  # -1: the codec says why
    if spec.name == "BYTES":
        items = _flat_strings(data, what)
        if expected >= 0 and len(items) != expected:
            raise _count_error(len(items), expected, shape, what)
        return b"".join(_LENGTH.pack(len(b)) + b for b in items)
    try:
        array = np.asarray(data)
    except ValueError as err:  # ragged nesting
        raise InvalidArgument(f"{what}: data is not a regular array of numbers: {err}") from None
    if expected >= 0 and array.size != expected:
        raise _count_error(array.size, expected, shape, what)
    target = spec.dtype
    if array.size and array.dtype.kind not in _KINDS[target.kind]:
        wanted = "true/false" if target.kind == "b" else "integers" if target.kind in "iu" else "numbers"
        raise InvalidArgument(f"{what}: {datatype} data must be {wanted}, got {array.dtype.kind!r} values")
    if array.size and target.kind in "iu":
        info = np.iinfo(target)
        low, high = int(array.min()), int(array.max())
        if low < info.min or high > info.max:
            raise InvalidArgument(f"{what}: values {low}..{high} do not fit {datatype} ({info.min}..{info.max})")
    return array.astype(target, copy=False).tobytes()


def _count_error(count: int, expected: int, shape: Sequence[int], what: str) -> InvalidArgument:
    return InvalidArgument(f"{what}: data holds {count} values, expected {expected} for shape {list(shape)}")


def _flat_strings(data: list[Any], what: str) -> list[bytes]:
    out: list[bytes] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            if not isinstance(item, str):
                raise InvalidArgument(f"{what}: BYTES data must be strings, got {_kind(item)}")
            out.append(item.encode())
        else:
            stack.pop()
    return out


def infer_response(response: pb.ModelInferResponse, outputs: Outputs) -> tuple[bytes, list[bytes]]:
    """The JSON of a ModelInferResponse and its binary parts, in output order."""
    parts: list[bytes] = []
    items = []
    raw = response.raw_output_contents
    for i, tensor in enumerate(response.outputs):
        item: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        params = get_parameters(tensor.parameters)
        data = raw[i] if i < len(raw) else None
        if outputs.is_binary(tensor.name):
            if data is None:
                data = _to_raw(tensor)
            params["binary_data_size"] = len(data)
            parts.append(data)
        else:
            item["data"] = _json_data(tensor, data)
        if params:
            item["parameters"] = params
        items.append(item)
    doc: dict[str, Any] = {"model_name": response.model_name, "model_version": response.model_version}
    if response.id:
        doc["id"] = response.id
    if response.parameters:
        doc["parameters"] = get_parameters(response.parameters)
    doc["outputs"] = items
    return orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY), parts


def _array(tensor: pb.ModelInferResponse.InferOutputTensor, data: bytes | None) -> np.ndarray:
    spec = DATATYPES.get(tensor.datatype)
    if spec is None:
        raise InvalidArgument(f"output {tensor.name!r}: datatype {tensor.datatype!r} has no JSON form")
    what = f"output {tensor.name!r}"
    shape = list(tensor.shape)
    if data is None:
        return from_contents(tensor.contents, spec, shape, what)
    return from_raw(data, spec, shape, what)


def _json_data(tensor: pb.ModelInferResponse.InferOutputTensor, data: bytes | None) -> Any:
    array = _array(tensor, data).reshape(-1)
    if tensor.datatype == "BYTES":
        return [item.decode("utf-8", "replace") if isinstance(item, bytes) else str(item) for item in array]
    if tensor.datatype == "FP16":
        return array.astype(np.float32)  # orjson writes float32 arrays, not float16
    return np.ascontiguousarray(array)


def _to_raw(tensor: pb.ModelInferResponse.InferOutputTensor) -> bytes:
    array = _array(tensor, None)
    if tensor.datatype == "BYTES":
        items = [v if isinstance(v, bytes) else str(v).encode() for v in array.reshape(-1)]
        return b"".join(_LENGTH.pack(len(b)) + b for b in items)
    return array.tobytes()


def set_parameters(target: Any, values: dict[str, Any], what: str) -> None:
    """JSON parameters into an ``InferParameter`` map: bool, int (int64, or uint64 above it), float or string."""
    for key, value in values.items():
        param = target[key]
        if isinstance(value, bool):
            param.bool_param = value
        elif isinstance(value, int):
            if _INT64[0] <= value <= _INT64[1]:
                param.int64_param = value
            elif 0 <= value <= _UINT64_MAX:
                param.uint64_param = value
            else:
                raise InvalidArgument(f"{what} {key!r}: {value} does not fit 64 bits")
        elif isinstance(value, float):
            param.double_param = value
        elif isinstance(value, str):
            param.string_param = value
        else:
            raise InvalidArgument(f"{what} {key!r} must be a bool, number or string, got {_kind(value)}")


def get_parameters(params: Any) -> dict[str, Any]:
    """An ``InferParameter`` map as JSON values."""
    out = {}
    for key, param in params.items():
        kind = param.WhichOneof("parameter_choice")
        out[key] = getattr(param, kind) if kind else None
    return out


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidArgument(f"{what} must be a JSON object, got {_kind(value)}")
    return dict(value)


def _list(value: Any, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise InvalidArgument(f"{what} must be a list, got {_kind(value)}")
    return value


def _bool(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgument(f"{what} must be true or false, got {value!r}")
    return value


def _kind(value: Any) -> str:
    """A JSON value's type, as JSON names it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object"


__all__ = ["Outputs", "get_parameters", "infer_request", "infer_response", "pack", "parse_json", "set_parameters"]

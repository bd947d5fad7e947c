"""Tensors on the wire: the Open Inference Protocol datatypes and their numpy form.

Pure functions shared by the server's codec and the client SDK. Raw contents are flattened, row-major and
little-endian; a BYTES element is a 4-byte little-endian length followed by that many bytes. Reading raw numeric
contents never copies (``np.frombuffer`` over the protobuf bytes), so the arrays it returns are read-only.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ferry.client.errors import InvalidArgument

__all__ = [
    "DATATYPES",
    "Datatype",
    "datatype_of",
    "element_count",
    "from_contents",
    "from_raw",
    "to_raw",
]


@dataclass(frozen=True, slots=True)
class Datatype:
    """One protocol datatype: its name on the wire, numpy dtype, typed-contents field and config enum."""

    name: str
    dtype: np.dtype[Any]
    contents_field: str | None  # field of InferTensorContents; None = raw only (FP16)
    config_type: str  # model_config.proto DataType enum name

    @property
    def itemsize(self) -> int:
        """Bytes per element in raw contents; 0 for BYTES (variable)."""
        return 0 if self.name == "BYTES" else self.dtype.itemsize


def _dt(name: str, dtype: str, field: str | None, config: str) -> Datatype:
    return Datatype(name, np.dtype(dtype), field, config)


DATATYPES: dict[str, Datatype] = {
    d.name: d
    for d in (
        _dt("BOOL", "?", "bool_contents", "TYPE_BOOL"),
        _dt("UINT8", "u1", "uint_contents", "TYPE_UINT8"),
        _dt("UINT16", "<u2", "uint_contents", "TYPE_UINT16"),
        _dt("UINT32", "<u4", "uint_contents", "TYPE_UINT32"),
        _dt("UINT64", "<u8", "uint64_contents", "TYPE_UINT64"),
        _dt("INT8", "i1", "int_contents", "TYPE_INT8"),
        _dt("INT16", "<i2", "int_contents", "TYPE_INT16"),
        _dt("INT32", "<i4", "int_contents", "TYPE_INT32"),
        _dt("INT64", "<i8", "int64_contents", "TYPE_INT64"),
        _dt("FP16", "<f2", None, "TYPE_FP16"),
        _dt("FP32", "<f4", "fp32_contents", "TYPE_FP32"),
        _dt("FP64", "<f8", "fp64_contents", "TYPE_FP64"),
        _dt("BYTES", "O", "bytes_contents", "TYPE_STRING"),
    )
}
"""Every datatype Ferry carries, by wire name (BF16 is left out: onnxruntime's Python API has no numpy form)."""

_BY_KIND: dict[tuple[str, int], Datatype] = {
    (d.dtype.kind, d.dtype.itemsize): d for d in DATATYPES.values() if d.name != "BYTES"
}

# Cap on elements per tensor, so a hostile shape cannot make us allocate or multiply without bound.
MAX_ELEMENTS = 1 << 40
_LENGTH = struct.Struct("<I")


def datatype_of(array: np.ndarray) -> Datatype:
    """The wire datatype of a numpy array (str/bytes/object arrays are BYTES)."""
    kind = array.dtype.kind
    if kind in "OSU":
        return DATATYPES["BYTES"]
    found = _BY_KIND.get((kind, array.dtype.itemsize))
    if found is None:
        raise InvalidArgument(f"numpy dtype {array.dtype} has no Open Inference Protocol datatype")
    return found


def element_count(shape: Sequence[int], what: str) -> int:
    """Elements in a tensor of this shape, rejecting negative dimensions and absurd sizes."""
    count = 1
    for dim in shape:
        if dim < 0:
            raise InvalidArgument(f"{what}: shape {list(shape)} has a negative dimension")
        count *= dim
        if count > MAX_ELEMENTS:
            raise InvalidArgument(f"{what}: shape {list(shape)} has more than {MAX_ELEMENTS} elements")
    return count


def from_raw(data: bytes, datatype: Datatype, shape: Sequence[int], what: str) -> np.ndarray:
    """Decode raw contents into an array of ``shape`` (zero copy for numeric types)."""
    count = element_count(shape, what)
    if datatype.name == "BYTES":
        return _split_bytes(data, count, what).reshape(shape)
    expected = count * datatype.itemsize
    if len(data) != expected:
        raise InvalidArgument(
            f"{what}: raw contents hold {len(data)} bytes, expected {expected} "
            f"({count} {datatype.name} elements for shape {list(shape)})"
        )
    return np.frombuffer(data, dtype=datatype.dtype).reshape(shape)


def _split_bytes(data: bytes, count: int, what: str) -> np.ndarray:
    out = np.empty(count, dtype=object)
    view = memoryview(data)
    offset = 0
    for i in range(count):
        if offset + 4 > len(data):
            raise InvalidArgument(f"{what}: BYTES contents end inside the length of element {i} of {count}")
        (length,) = _LENGTH.unpack_from(data, offset)
        offset += 4
        if offset + length > len(data):
            raise InvalidArgument(
                f"{what}: BYTES element {i} declares {length} bytes but only {len(data) - offset} remain"
            )
        out[i] = bytes(view[offset : offset + length])
        offset += length
    if offset != len(data):
        raise InvalidArgument(
            f"{what}: BYTES contents have {len(data) - offset} bytes after the {count} elements of the shape"
        )
    return out


def from_contents(contents: Any, datatype: Datatype, shape: Sequence[int], what: str) -> np.ndarray:
    """Decode typed ``InferTensorContents`` (the slow path: values are copied out of protobuf)."""
    count = element_count(shape, what)
    if datatype.contents_field is None:
        raise InvalidArgument(f"{what}: {datatype.name} has no typed contents; send it as raw contents")
    values = getattr(contents, datatype.contents_field)
    if len(values) != count:
        raise InvalidArgument(
            f"{what}: {datatype.contents_field} holds {len(values)} values, expected {count} for shape {list(shape)}"
        )
    if datatype.name == "BYTES":
        array = np.empty(count, dtype=object)
        array[:] = list(values)
        return array.reshape(shape)
    info = np.iinfo(datatype.dtype) if datatype.dtype.kind in "iu" else None
    raw = np.asarray(values)
    if info is not None and raw.size and (raw.min() < info.min or raw.max() > info.max):
        raise InvalidArgument(f"{what}: a value of {datatype.contents_field} does not fit {datatype.name}")
    return raw.astype(datatype.dtype, copy=False).reshape(shape)


def to_raw(array: np.ndarray, datatype: Datatype | None = None) -> bytes:
    """Encode an array as raw contents (BYTES elements may be bytes or str; str is UTF-8 encoded)."""
    datatype = datatype or datatype_of(array)
    if datatype.name == "BYTES":
        parts = []
        for item in array.ravel():
            blob = item.encode() if isinstance(item, str) else bytes(item)
            parts.append(_LENGTH.pack(len(blob)))
            parts.append(blob)
        return b"".join(parts)
    return np.ascontiguousarray(array, dtype=datatype.dtype).tobytes()

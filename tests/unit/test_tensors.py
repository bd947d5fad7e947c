"""ferry.client.tensors: the datatype table and raw/typed contents, both directions."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ferry.client._proto import grpc_service_pb2 as pb
from ferry.client.errors import InvalidArgument
from ferry.client.tensors import DATATYPES, datatype_of, element_count, from_contents, from_raw, to_raw

NUMERIC = [name for name in DATATYPES if name != "BYTES"]


@pytest.mark.parametrize("name", NUMERIC)
def test_raw_round_trip_every_numeric_datatype(name: str) -> None:
    datatype = DATATYPES[name]
    array = (np.arange(12) % 2 == 1) if name == "BOOL" else np.arange(12).astype(datatype.dtype)
    array = array.reshape(3, 4)
    assert datatype_of(array) is datatype
    raw = to_raw(array)
    assert len(raw) == 12 * datatype.itemsize
    back = from_raw(raw, datatype, [3, 4], "t")
    np.testing.assert_array_equal(back, array)
    assert back.dtype == datatype.dtype


def test_raw_decode_is_zero_copy() -> None:
    raw = np.arange(4, dtype="<f4").tobytes()
    array = from_raw(raw, DATATYPES["FP32"], [2, 2], "t")
    assert not array.flags.owndata and not array.flags.writeable


def test_raw_is_little_endian() -> None:
    assert to_raw(np.array([1], dtype=">i4")) == b"\x01\x00\x00\x00"
    assert from_raw(b"\x01\x00", DATATYPES["UINT16"], [1], "t")[0] == 1


def test_bytes_framing_is_4_byte_little_endian_length_prefix() -> None:
    array = np.array([b"ab", b"", "\u00e9"], dtype=object)
    raw = to_raw(array)
    assert raw == struct.pack("<I", 2) + b"ab" + struct.pack("<I", 0) + struct.pack("<I", 2) + "\u00e9".encode()
    back = from_raw(raw, DATATYPES["BYTES"], [3], "t")
    assert list(back) == [b"ab", b"", "\u00e9".encode()]


@given(st.lists(st.binary(max_size=40), min_size=1, max_size=20))
def test_bytes_round_trip_property(items: list[bytes]) -> None:
    array = np.empty(len(items), dtype=object)
    array[:] = items
    assert list(from_raw(to_raw(array), DATATYPES["BYTES"], [len(items)], "t")) == items


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"\x05\x00\x00\x00ab", "declares 5 bytes"),
        (b"\x01\x00", "end inside the length"),
        (b"\x01\x00\x00\x00a\x00\x00\x00\x00", "after the 1 elements"),
    ],
)
def test_malformed_bytes_are_invalid_argument(raw: bytes, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        from_raw(raw, DATATYPES["BYTES"], [1], "input 'x'")


def test_raw_length_mismatch_names_tensor_and_sizes() -> None:
    with pytest.raises(InvalidArgument, match=r"input 'x'.*12 bytes, expected 16 .*FP32.*\[2, 2\]"):
        from_raw(b"\x00" * 12, DATATYPES["FP32"], [2, 2], "input 'x'")


def test_negative_and_overflowing_shapes_are_rejected() -> None:
    with pytest.raises(InvalidArgument, match="negative"):
        element_count([2, -1], "t")
    with pytest.raises(InvalidArgument, match="more than"):
        element_count([2**31, 2**31, 2**31], "t")


@pytest.mark.parametrize("name", [n for n in NUMERIC if n != "FP16"])
def test_typed_contents_every_datatype(name: str) -> None:
    datatype = DATATYPES[name]
    values = [True, False, True, False] if name == "BOOL" else [0, 1, 2, 3]
    contents = pb.InferTensorContents(**{datatype.contents_field: values})  # type: ignore[arg-type]
    array = from_contents(contents, datatype, [2, 2], "t")
    assert array.dtype == datatype.dtype
    np.testing.assert_array_equal(array.ravel(), np.array(values, dtype=datatype.dtype))


def test_typed_bytes_contents() -> None:
    contents = pb.InferTensorContents(bytes_contents=[b"a", b"bc"])
    assert list(from_contents(contents, DATATYPES["BYTES"], [2], "t")) == [b"a", b"bc"]


def test_typed_contents_errors() -> None:
    with pytest.raises(InvalidArgument, match="holds 3 values, expected 4"):
        from_contents(pb.InferTensorContents(fp32_contents=[1, 2, 3]), DATATYPES["FP32"], [2, 2], "t")
    with pytest.raises(InvalidArgument, match="FP16 has no typed contents"):
        from_contents(pb.InferTensorContents(), DATATYPES["FP16"], [1], "t")
    with pytest.raises(InvalidArgument, match="does not fit INT8"):
        from_contents(pb.InferTensorContents(int_contents=[300]), DATATYPES["INT8"], [1], "t")


def test_datatype_of_strings_and_unsupported() -> None:
    assert datatype_of(np.array(["a"])).name == "BYTES"
    assert datatype_of(np.array([b"a"])).name == "BYTES"
    with pytest.raises(InvalidArgument, match="complex"):
        datatype_of(np.array([1j]))

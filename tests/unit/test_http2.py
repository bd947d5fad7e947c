"""``ferry.server.transport.http2``: the HTTP/2 and gRPC-over-HTTP/2 pieces both Ferry's transport and the load
generator's client use: grpc-timeout both ways, grpc-message's percent-encoding, frames split from a byte stream,
header blocks."""

from __future__ import annotations

import hpack
import pytest

from ferry.server.transport import http2
from ferry.server.transport.http2 import (
    CONTINUATION,
    END_HEADERS,
    HEADERS,
    HeaderBlocks,
    ProtocolError,
    frame,
    frames,
    grpc_timeout,
    literal,
    parse_grpc_timeout,
    percent_decoded,
    percent_encoded,
)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(b"1S", 1.0), (b"250m", 0.25), (b"7u", 7e-6), (b"3n", 3e-9), (b"2M", 120.0), (b"1H", 3600.0),
     (b"99999999S", 99999999.0)],
)  # fmt: skip
def test_grpc_timeout_is_read_in_its_units(value: bytes, seconds: float) -> None:
    assert parse_grpc_timeout(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", [b"", b"S", b"1", b"1s", b"123456789S", b"-1S", b"1.5S", b" 1S", b"1x"])
def test_a_malformed_grpc_timeout_is_no_deadline(value: bytes) -> None:
    assert parse_grpc_timeout(value) is None


@pytest.mark.parametrize("seconds", [1e-6, 0.001, 0.5, 1.0, 30.0, 86400.0])
def test_grpc_timeout_written_is_read_back_no_shorter(seconds: float) -> None:
    back = parse_grpc_timeout(grpc_timeout(seconds))
    assert back is not None and seconds <= back <= seconds * 1.01 + 1e-6


def test_grpc_message_percent_encoding_round_trips_and_keeps_printable_ascii() -> None:
    assert percent_encoded("model 'x' not found") == b"model 'x' not found"
    assert percent_encoded("50% naïve\n") == b"50%25 na%C3%AFve%0A"
    for text in ("", "plain", "100%", "ünïcødé ✓", "tab\tand\r\nnewlines"):
        encoded = percent_encoded(text)
        assert all(0x20 <= b < 0x7F for b in encoded)
        assert percent_decoded(encoded) == text


def test_frames_are_split_whole_and_a_partial_one_waits() -> None:
    one, two = frame(HEADERS, END_HEADERS, 1, b"abc"), frame(0, 1, 3, b"x" * 70_000)
    buf = bytearray(one + two[:100])
    assert frames(buf) == [(HEADERS, END_HEADERS, 1, b"abc")]
    assert bytes(buf) == two[:100]
    buf += two[100:]
    assert frames(buf) == [(0, 1, 3, b"x" * 70_000)]
    assert not buf


def test_header_blocks_join_continuations_and_repeat_without_a_table() -> None:
    block = b"\x83\x86" + literal(4, b"/inference.GRPCInferenceService/ModelInfer") + literal(b"te", b"trailers")
    blocks = HeaderBlocks()
    assert blocks.feed(HEADERS, 0, 1, block[:5]) is None
    assert blocks.open_block == 1
    stream_id, _, fields = blocks.feed(CONTINUATION, END_HEADERS, 1, block[5:]) or (0, 0, [])
    assert stream_id == 1 and (b":path", b"/inference.GRPCInferenceService/ModelInfer") in fields
    assert blocks.open_block is None
    again = blocks.feed(HEADERS, END_HEADERS, 3, block)
    assert again is not None and again[2] == fields


def test_header_blocks_decode_a_client_that_uses_the_dynamic_table() -> None:
    """A client that has not seen our SETTINGS (or ignores the cache's premise) indexes headers: still decoded."""
    encoder = hpack.Encoder()
    headers = [(":method", "POST"), (":path", "/a/b"), ("x-user", "me")]
    blocks = HeaderBlocks()
    first = blocks.feed(HEADERS, END_HEADERS, 1, encoder.encode(headers))
    second = blocks.feed(HEADERS, END_HEADERS, 3, encoder.encode(headers))  # now indexed references only
    assert first is not None and second is not None
    assert second[2] == first[2] == [(k.encode(), v.encode()) for k, v in headers]


def test_header_blocks_refuse_what_would_break_the_connection() -> None:
    with pytest.raises(ProtocolError) as err:
        HeaderBlocks().feed(CONTINUATION, END_HEADERS, 1, b"\x83")
    assert err.value.code == http2.PROTOCOL_ERROR
    blocks = HeaderBlocks(max_block=1000)
    blocks.feed(HEADERS, 0, 1, b"\x83")
    with pytest.raises(ProtocolError) as err:
        blocks.feed(CONTINUATION, 0, 1, b"\x00" * 1001)
    assert err.value.code == http2.ENHANCE_YOUR_CALM
    with pytest.raises(ProtocolError) as err:
        HeaderBlocks(max_list=100).feed(HEADERS, END_HEADERS, 1, literal(b"x-big", b"v" * 200))
    assert err.value.code == http2.ENHANCE_YOUR_CALM
    with pytest.raises(ProtocolError) as err:
        HeaderBlocks().feed(HEADERS, END_HEADERS, 1, b"\xff\xff\xff\xff")  # an index far past both tables
    assert err.value.code == http2.COMPRESSION_ERROR

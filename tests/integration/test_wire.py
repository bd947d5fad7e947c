"""``ferry.loadtest.wire``, the load generator's HTTP/2 gRPC client, against a real grpcio server on loopback: statuses
and messages, deadlines, messages split over frames and windows both ways, the server's stream limit, a server that
goes away."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest

from ferry.loadtest import wire

SERVICE = "wire.test.T"
MiB = 1 << 20


async def _echo(request: bytes, context: Any) -> bytes:
    return request


async def _fail(request: bytes, context: Any) -> bytes:
    await context.abort(grpc.StatusCode.NOT_FOUND, "no model 'x' % here, naïvely")
    raise AssertionError("abort returns only by raising")


async def _slow(request: bytes, context: Any) -> bytes:
    await asyncio.sleep(float(request.decode() or "5"))
    return b"late"


async def _chat(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
    async for message in requests:
        yield message


def _handlers() -> grpc.GenericRpcHandler:
    unary = grpc.unary_unary_rpc_method_handler
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Echo": unary(_echo),
            "Fail": unary(_fail),
            "Slow": unary(_slow),
            "Chat": grpc.stream_stream_rpc_method_handler(_chat),
        },
    )


def method(name: str) -> str:
    return f"/{SERVICE}/{name}"


def serve(test: Callable[[str], Awaitable[None]], **options: Any) -> None:
    """Run ``test(address)`` against a fresh grpc.aio server on 127.0.0.1 (its options as ``grpc.<key>``)."""

    async def main() -> None:
        server = grpc.aio.server(options=[(f"grpc.{k}", v) for k, v in options.items()])
        server.add_generic_rpc_handlers((_handlers(),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            await asyncio.wait_for(test(f"127.0.0.1:{port}"), 60)
        finally:
            await server.stop(None)

    asyncio.run(main())


def test_unary_statuses_messages_and_an_unknown_method() -> None:
    async def test(address: str) -> None:
        conn = await wire.open_connection(address)
        assert await conn.unary(method("Echo"), b"hello", 5) == "OK"
        assert await conn.unary(method("Echo"), b"", None) == "OK"  # an empty message, no deadline
        stream = await conn._start(method("Fail"), 5, None)  # the same path unary takes, to read the message
        conn._send(stream, b"\x00\x00\x00\x00\x00", end=True)
        assert await stream.done == "NOT_FOUND"
        assert stream.message == "no model 'x' % here, naïvely"  # percent-decoded UTF-8
        assert await conn.unary("/wire.test.T/Nope", b"x", 5) == "UNIMPLEMENTED"
        results = await asyncio.gather(*(conn.unary(method("Echo"), bytes([i]) * i, 5) for i in range(200)))
        assert results == ["OK"] * 200 and not conn.streams
        conn.close()

    serve(test)


def test_a_deadline_ends_the_call_and_the_connection_stays_usable() -> None:
    async def test(address: str) -> None:
        conn = await wire.open_connection(address)
        assert await conn.unary(method("Slow"), b"5", 0.2) == "DEADLINE_EXCEEDED"
        assert conn.usable and await conn.unary(method("Slow"), b"0", 5) == "OK"
        conn.close()

    serve(test)


def test_large_messages_cross_the_windows_both_ways() -> None:
    """Messages larger than the server's frame size and windows, and a receive window of 128 KiB, so both sides
    must send WINDOW_UPDATEs for the stream to finish."""

    async def test(address: str) -> None:
        conn = await wire.open_connection(address, receive_window=128 * 1024)
        assert await conn.unary(method("Echo"), b"u" * (3 * MiB), 10) == "OK"
        received: list[bytes] = []
        call = await conn.stream(method("Chat"), received.append, 30)
        sent = [bytes([65 + i % 26]) * size for i, size in enumerate((1, 70_000, 0, 2 * MiB, 17, 300_000, 5))]
        for message in sent:
            call.write(message)
        call.done_writing()
        assert await call.result() == "OK"
        assert received == sent  # every message whole and in order, whatever the frames
        assert conn.usable and not conn.blocked
        conn.close()

    serve(test)


def test_calls_beyond_the_servers_stream_limit_wait_for_a_free_stream() -> None:
    async def test(address: str) -> None:
        conn = await wire.open_connection(address)
        assert await conn.unary(method("Echo"), b"x", 5) == "OK"  # the server's SETTINGS are in by now
        assert conn.max_streams == 2
        results = await asyncio.gather(*(conn.unary(method("Slow"), b"0.05", 10) for _ in range(8)))
        assert results == ["OK"] * 8
        conn.close()

    serve(test, max_concurrent_streams=2)


def test_a_server_that_goes_away_fails_its_calls_unavailable() -> None:
    async def main() -> None:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((_handlers(),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        conn = await wire.open_connection(f"127.0.0.1:{port}")
        slow = asyncio.ensure_future(conn.unary(method("Slow"), b"30", 60))
        await asyncio.sleep(0.2)
        await server.stop(None)
        assert await asyncio.wait_for(slow, 10) in ("UNAVAILABLE", "CANCELLED")
        await asyncio.sleep(0.1)
        assert not conn.usable
        with pytest.raises(wire.CallError) as err:
            await conn.unary(method("Echo"), b"x", 5)
        assert err.value.code == "UNAVAILABLE"

    asyncio.run(main())


def test_a_refused_connection_and_a_malformed_target() -> None:
    async def main() -> None:
        with pytest.raises(OSError):
            await wire.open_connection("127.0.0.1:1")
        with pytest.raises(ValueError, match="HOST:PORT"):
            await wire.open_connection("localhost")

    asyncio.run(main())


@pytest.mark.parametrize(
    ("seconds", "value"), [(10.0, b"10000000u"), (100.0, b"100000m"), (0.0000001, b"1u"), (1e9, b"16666667M")]
)
def test_grpc_timeout_values(seconds: float, value: bytes) -> None:
    assert wire.grpc_timeout(seconds) == value


def test_the_client_signals_the_servers_smaller_hpack_table() -> None:
    """Ferry's transport advertises an HPACK table of 0 bytes; RFC 7541 §4.2 has the client's next block start
    with a size update. Then its blocks mean the same bytes for bytes, and the server decodes each one once."""
    from ferry.server.transport import Services, Transport

    async def test() -> None:
        services = Services()
        services.add_generic_rpc_handlers((_handlers(),))
        transport = Transport(services)
        port = await transport.start("127.0.0.1", 0)
        try:
            conn = await wire.open_connection(f"127.0.0.1:{port}")
            for _ in range(3):
                assert await conn.unary(method("Echo"), b"hello", 5) == "OK"
            [server_side] = transport.connections
            assert server_side.headers._table.maxsize == 0
            assert len(server_side.headers._decoded) == 2  # the first (with the update), then one for the other two
            conn.close()
        finally:
            await transport.stop(0.5)

    asyncio.run(test())

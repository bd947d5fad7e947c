"""Ferry's own gRPC transport: gRPC over HTTP/2 (RFC 9113, gRPC's PROTOCOL-HTTP2) on asyncio, serving the same
servicers grpc.aio does.

Why: grpcio's server machinery costs ~400-700 µs of CPU per call on this machine (its C core, the Cython layer, the
thread that wakes the event loop), where Ferry's whole work on a `tiny` request is ~80-100 µs. Ferry's request
path over a few hundred lines of HTTP/2 on uvloop served 2.2-3.4x what it serves on grpc.aio (BENCHMARKS.md, "The
transport"). ``ferry serve --transport grpcio`` keeps grpc.aio.

What it serves: any servicer registered through the generated ``add_*Servicer_to_server`` functions
(:class:`Services` offers the two methods they call), with grpc.aio's calling conventions: ``async`` methods taking
``(request, context)``, request streams as async iterators, response streams written with ``context.write`` or
yielded by an async generator, ``context.abort`` for a status. Ferry's inference, health, reflection and outcome
services all run on it unchanged.

How a call runs: the request's header block is decoded (advertising an HPACK table of 0 bytes, so the blocks a
client repeats are decoded once each); a unary request runs when its message is complete, in the turn that read it:
the handler coroutine is stepped once in place, and only one that has to wait (a queued batch) becomes a task. So
a request the model answers at once costs no task, future or thread hop. Replies and the frames of one read go out
in one write.

The modules: :mod:`~ferry.server.transport.server` (the listener, shutdown),
:mod:`~ferry.server.transport.connection` (the read side: frames, streams, limits, running handlers),
:mod:`~ferry.server.transport.output` (the write side: flow
control, replies, trailers), :mod:`~ferry.server.transport.headers` (RFC 9113's request rules, metadata, our HPACK
encoder), :mod:`~ferry.server.transport.calls` (what a servicer sees: context, request stream, the handler's task),
:mod:`~ferry.server.transport.limits` (every bound, named, with why); HTTP/2 framing shared with the load generator's
client is :mod:`ferry.server.transport.http2`.

HTTP/2 as a server must speak it, and the limits that keep one client from hurting the others (:class:`Limits`):

- SETTINGS (ours: no HPACK table, ``max_concurrent_streams`` streams, 1 MiB stream and 16 MiB connection receive
  windows, 1 MiB frames, a 16 KiB header list); the client's are applied in O(1) (at most 32 entries a frame) and
  acknowledged; PING answered;
- flow control both ways: DATA never exceeds the client's windows (what does not fit waits for WINDOW_UPDATE); the
  connection window is given back as bytes arrive, a unary stream's as its message arrives (the message size limit
  bounds it) and a request stream's as the handler reads its messages (a slow handler holds the client back);
  a client that sends past our windows loses the connection (FLOW_CONTROL_ERROR), and a window it grows past
  2^31-1 ends the stream or connection; a client that does not read what we send is not read either (write
  high-water mark);
- bounded work: header blocks of at most 16 KiB encoded and decoded, at most two HPACK table size updates a block,
  no dynamic-table insertions once our 0-byte table is acknowledged; frames that carry no request (PING without
  traffic, SETTINGS, PRIORITY, empty DATA and CONTINUATION, unknown types) and resets (every RST_STREAM, open
  stream or not: rapid reset) each spend a token bucket, and passing it ends the connection with GOAWAY
  ENHANCE_YOUR_CALM; one connection's frames get ``turn_budget_s`` of each event-loop turn; a connection that
  has not sent the HTTP/2 preface within ``preface_timeout_s`` is closed;
- requests as RFC 9113 §8.2-8.3 has them (lowercase names, no connection-specific fields, ``te: trailers`` only,
  the request pseudo-headers once each and first, ``:method``, ``:scheme`` and ``:path`` present), or the stream
  is reset PROTOCOL_ERROR; PRIORITY that names its own stream or has the wrong size likewise (FRAME_SIZE_ERROR);
- gRPC: ``grpc-timeout`` is the call's deadline (``context.time_remaining()``; a handler still running at the
  deadline is cancelled and the call ends DEADLINE_EXCEEDED); RST_STREAM or a lost connection cancels the handler,
  and a handler cancelled before it first ran still unwinds (:class:`~ferry.server.transport.calls.Handler`); request
  metadata (``-bin`` values base64-decoded) is ``context.invocation_metadata()``; messages compressed with gzip or
  deflate are accepted (others: UNIMPLEMENTED; a flag byte other than 0 or 1: INTERNAL), replies are not
  compressed; an unknown method is UNIMPLEMENTED; a body that does not parse is INTERNAL; a handler's unexpected
  exception is UNKNOWN (logged);
- reply headers: ``content-type`` and ``grpc-status: 0`` indexed in the client's HPACK table (a reply's headers and
  trailers take 2 bytes where they took ~34);
- shutdown (:meth:`Transport.stop`): no new connections, GOAWAY on each (streams the client opens later are
  refused), in-flight calls get the grace period, then are cancelled and the connections closed; the port can be
  bound before it listens (:meth:`Transport.bind`, :meth:`Transport.listen`: refused, not hanging, meanwhile);
- connection age, keepalive and idle (gRFC A9, grpc-core's enforcement): an aged or idle connection gets
  grpc-core's two-step GOAWAY (last stream id 2^31-1 and a PING, the final one at its ACK) and closes once its
  calls are done; PINGs sooner than ``keepalive_min_time_s`` while we sent nothing are strikes, the third ends
  the connection (ENHANCE_YOUR_CALM ``too_many_pings``).

- TLS (``Transport.start(..., tls=context)``, the context from :mod:`ferry.server.security.tls`, which also reloads
  it): asyncio's TLS, TLS 1.2 at least; a handshake not completed within ``tls_handshake_timeout_s`` is closed, and so
  is a connection that did not choose ``h2`` by ALPN (RFC 9113 §3.2); ``context.auth_context()`` gives grpc.aio's
  properties of the connection (``transport_security_type`` and the client certificate's ``x509_*``), empty in
  plaintext. A plaintext connection pays nothing for it (one flag read when it opens).

Not spoken: server push, HTTP/1.1.
"""

from ferry.server.transport.calls import Context, Services
from ferry.server.transport.limits import Limits
from ferry.server.transport.server import Transport

__all__ = ["Context", "Limits", "Services", "Transport"]

"""What one client connection may make the server hold or do, as named settings (:class:`Limits`), and the token
bucket (:class:`Budget`) that meters the frames which cost the server work but carry no request.

Why each default (grpc-core's and grpc-go's defences against the HTTP/2 attack classes are the anchors):

- ``max_header_list_bytes`` / ``max_header_block_bytes``, 16 KiB: grpc-core's hard metadata limit (its soft one is
  8 KiB), so no gRPC client sends more; it bounds HPACK work to a few milliseconds a block on this machine (a
  16 KiB Huffman string ~10 ms in pure Python, 512 indexed fields ~6 ms), where 1 MiB blocks cost seconds.
- ``max_settings_entries``, 32: nghttp2's default; there are 6 settings, so more is repetition.
- ``control_frames_per_s`` / ``control_frame_burst``, 100/s and 1,000: SETTINGS, PRIORITY, empty DATA and
  CONTINUATION frames, unknown frame types, GOAWAY, and PINGs that arrive while we sent nothing since the last PING
  (gRPC's rule: pings beside traffic are free, for BDP probes). A gRPC client sends a handful per connection;
  1,000 of them cost the loop a few milliseconds.
- ``resets_per_s`` / ``reset_burst``, 200/s and 1,000: every RST_STREAM a client sends, for a stream open or already
  answered (rapid reset, CVE-2023-44487).
- ``write_high_water_bytes``, 4 MiB: output a client has not read; past it the connection is not read further.
- ``preface_timeout_s`` / ``tls_handshake_timeout_s``, 10 s: a connection that says nothing useful is closed.
- ``keepalive_min_time_s`` / ``max_ping_strikes``, 300 s and 2: grpc-core's and grpc-go's keepalive enforcement
  (``grpc.http2.min_ping_interval_without_data_ms``, ``grpc.http2.max_ping_strikes``): a PING within 300 s of the
  client's last one, while we sent it nothing in between, is a strike, with or without calls open (grpc-core's
  ``keepalive_permit_without_calls`` on); the third ends the connection with GOAWAY ENHANCE_YOUR_CALM and the
  debug data ``too_many_pings``, which gRPC clients read to double their keepalive interval. The control-frame
  bucket still meters every such PING.
- ``max_connection_age_s`` / ``max_connection_age_grace_s``, off and 30 s; ``idle_timeout_s``, off: gRFC A9's
  ``MAX_CONNECTION_AGE`` (±10% jitter, so connections made together do not all leave together),
  ``MAX_CONNECTION_AGE_GRACE`` and ``MAX_CONNECTION_IDLE``; off by default as in gRPC.
- ``turn_budget_s``, 2 ms: frames one connection may have processed in one event-loop turn before the others get
  theirs (a read of 256 KiB of tiny frames would otherwise hold the loop for tens of milliseconds).
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-connection bounds of Ferry's transport; passing one ends the connection (GOAWAY ENHANCE_YOUR_CALM) or
    refuses the call. See the module docstring for why each default."""

    max_concurrent_streams: int = 4096
    """Streams open at once; past it a new stream is refused (RST_STREAM REFUSED_STREAM, which clients retry)."""
    max_message_bytes: int = 64 << 20
    """Largest gRPC message either way (RESOURCE_EXHAUSTED, decided from the length prefix)."""
    max_header_list_bytes: int = 16 << 10
    """Largest decoded header list (RFC 9113's size: name + value + 32 per field); advertised in SETTINGS."""
    max_header_block_bytes: int = 16 << 10
    """Largest encoded header block, HEADERS and its CONTINUATION frames together."""
    max_frame_bytes: int = 1 << 20
    """Largest frame payload we accept (SETTINGS_MAX_FRAME_SIZE)."""
    max_settings_entries: int = 32
    """Entries in one SETTINGS frame."""
    stream_window_bytes: int = 1 << 20
    """Receive window we open per stream (given back as the handler consumes)."""
    connection_window_bytes: int = 1 << 24
    """Receive window we open for the connection (given back as bytes arrive)."""
    control_frames_per_s: float = 100.0
    control_frame_burst: int = 1000
    resets_per_s: float = 200.0
    reset_burst: int = 1000
    write_high_water_bytes: int = 4 << 20
    """Unsent output past which the connection is not read until the client reads."""
    stream_write_high_water_bytes: int = 1 << 20
    """Bytes a response stream may have waiting for the client's window before ``context.write`` waits."""
    turn_budget_s: float = 0.002
    """Frame processing one connection gets per event-loop turn."""
    preface_timeout_s: float = 10.0
    """A connection that has not sent the HTTP/2 preface by then is closed."""
    tls_handshake_timeout_s: float = 10.0
    """Under TLS, a connection whose handshake has not completed by then is closed (a client that stalls mid-
    handshake holds a socket and an ``SSLObject`` but reaches nothing else; the same bound as the preface)."""
    keepalive_min_time_s: float = 300.0
    """Least interval between PINGs while we send nothing; a shorter one is a strike (0 = no strikes)."""
    max_ping_strikes: int = 2
    """Strikes allowed; the next ends the connection (GOAWAY ENHANCE_YOUR_CALM ``too_many_pings``)."""
    max_connection_age_s: float = 0.0
    """After this long (±10%) the connection is asked to go away: GOAWAY, its calls finish (0 = never)."""
    max_connection_age_grace_s: float = 30.0
    """Calls still running this long after the age GOAWAY are cancelled (UNAVAILABLE) and the connection closed."""
    idle_timeout_s: float = 0.0
    """A connection with no stream open for this long goes away (GOAWAY, then close; 0 = never)."""
    goaway_ping_timeout_s: float = 1.0
    """The first GOAWAY of a graceful one is followed by a PING; without its ACK by then, the final one goes."""

    def __post_init__(self) -> None:
        for name in self.__slots__:
            if name in _ZERO_IS_OFF:
                if not getattr(self, name) >= 0:
                    raise ValueError(f"transport limit {name} must be >= 0, got {getattr(self, name)}")
            elif not getattr(self, name) > 0:
                raise ValueError(f"transport limit {name} must be > 0, got {getattr(self, name)}")
        if not 16_384 <= self.max_frame_bytes <= (1 << 24) - 1:
            raise ValueError(f"max_frame_bytes must be within 16384..2^24-1, got {self.max_frame_bytes}")
        if self.stream_window_bytes > self.connection_window_bytes or self.connection_window_bytes > (1 << 31) - 1:
            raise ValueError("windows: stream <= connection <= 2^31-1")


_ZERO_IS_OFF = frozenset(
    {"keepalive_min_time_s", "max_connection_age_s", "max_connection_age_grace_s", "idle_timeout_s"}
)


class Budget:
    """A token bucket: ``rate`` tokens a second up to ``burst``; :meth:`spend` says whether one was left."""

    __slots__ = ("_at", "_burst", "_rate", "_tokens")

    def __init__(self, rate: float, burst: float) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._tokens = float(burst)
        self._at = time.monotonic()

    def spend(self, cost: float = 1.0) -> bool:
        now = time.monotonic()
        self._tokens = min(self._burst, self._tokens + (now - self._at) * self._rate) - cost
        self._at = now
        return self._tokens >= 0


__all__ = ["Budget", "Limits"]

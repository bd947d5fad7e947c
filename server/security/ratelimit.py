"""Per-identity rate limits: one token bucket per identity name, refilled continuously."""

from __future__ import annotations

import time


class TokenBucket:
    """``per_second`` tokens a second up to ``burst``; a call takes one. Not thread-safe: the event loop owns it."""

    __slots__ = ("burst", "per_second", "stamp", "tokens")

    def __init__(self, per_second: float, burst: float) -> None:
        self.per_second = per_second
        self.burst = burst
        self.tokens = burst
        self.stamp = time.monotonic()

    def take(self, now: float | None = None) -> float:
        """0.0 when a token was taken, else the seconds until one will be there (nothing is taken)."""
        now = time.monotonic() if now is None else now
        tokens = min(self.burst, self.tokens + (now - self.stamp) * self.per_second)
        self.stamp = now
        if tokens >= 1.0:
            self.tokens = tokens - 1.0
            return 0.0
        self.tokens = tokens
        return (1.0 - tokens) / self.per_second


__all__ = ["TokenBucket"]

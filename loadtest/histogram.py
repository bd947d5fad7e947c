"""An HDR-style latency histogram: fixed relative error, constant-time recording, mergeable across processes.

Values are non-negative integers (nanoseconds here). With ``precision_bits = p`` and ``S = 2**p``, values below
``2S`` get one bucket each (exact); above, a value ``v`` with ``e = v.bit_length() - p - 1`` lands in bucket
``e*S + (v >> e)``, ``2**e`` values wide, so every bucket is at most ``1/S`` of its lower bound wide. A bucket is
reported by its midpoint, so a reported percentile is within ``1/(2S)`` of the exact one (p=7: 0.39 %): the
layout of Gil Tene's HdrHistogram with a power-of-two sub-bucket count. Counts sit in a flat Python list (a list
index is the cheapest thing the hot path can do); histograms of the same precision merge by adding counts, and
travel between processes as ``{bucket: count}`` dicts (:meth:`to_dict`, :meth:`from_dict`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

DEFAULT_PRECISION_BITS = 7
MAX_VALUE = (1 << 44) - 1
"""Largest value kept apart (about 4.9 hours in ns); larger values are counted as this one (``max`` stays exact)."""


class Histogram:
    """Counts of non-negative integer values in log-linear buckets. Not thread-safe; one per recording loop."""

    __slots__ = ("_half", "_mask", "_p", "count", "counts", "max", "min", "total")

    def __init__(self, precision_bits: int = DEFAULT_PRECISION_BITS) -> None:
        if not 1 <= precision_bits <= 14:
            raise ValueError(f"precision_bits must be in 1..14, got {precision_bits}")
        self._p = precision_bits
        self._half = 1 << precision_bits
        self._mask = 2 * self._half
        self.counts: list[int] = [0] * (bucket_of(MAX_VALUE, precision_bits) + 1)
        self.count = 0
        self.total = 0
        self.min = 0
        self.max = 0

    @property
    def precision_bits(self) -> int:
        return self._p

    @property
    def relative_error(self) -> float:
        """Bound on |reported - exact| / exact for any percentile."""
        return 1 / (2 * self._half)

    def record(self, value: int) -> None:
        """Count one value (negative values count as 0)."""
        v = value if value > 0 else 0
        if v > MAX_VALUE:
            v = MAX_VALUE
        if v < self._mask:
            self.counts[v] += 1
        else:
            e = v.bit_length() - self._p - 1
            self.counts[e * self._half + (v >> e)] += 1
        if self.count == 0 or value < self.min:
            self.min = max(value, 0)
        if value > self.max:
            self.max = value
        self.count += 1
        self.total += v

    def record_many(self, values: Iterable[int]) -> None:
        for v in values:
            self.record(int(v))

    def merge(self, other: Histogram) -> Histogram:
        """Add ``other``'s counts into this histogram (same precision) and return self."""
        if other._p != self._p:
            raise ValueError(f"cannot merge precision {other._p} into {self._p}")
        if other.count == 0:
            return self
        counts = self.counts
        for i, c in enumerate(other.counts):
            if c:
                counts[i] += c
        self.min = other.min if self.count == 0 else min(self.min, other.min)
        self.max = max(self.max, other.max)
        self.count += other.count
        self.total += other.total
        return self

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0

    def percentile(self, q: float) -> float:
        """The value at percentile ``q`` (0..100) by nearest rank, within :attr:`relative_error`; 0 when empty."""
        if not 0 <= q <= 100:
            raise ValueError(f"percentile must be in 0..100, got {q}")
        if self.count == 0:
            return 0.0
        if q >= 100:
            return float(self.max)
        rank = max(1, _ceil(q / 100 * self.count))
        seen = 0
        for i, c in enumerate(self.counts):
            seen += c
            if seen >= rank:
                low, width = bucket_range(i, self._p)
                mid = low + (width - 1) / 2
                return float(min(max(mid, self.min), self.max))
        return float(self.max)  # unreachable: counts sum to count

    def percentiles(self, qs: Iterable[float]) -> dict[float, float]:
        return {q: self.percentile(q) for q in qs}

    def to_dict(self) -> dict[str, Any]:
        """A compact, JSON- and pickle-friendly form: non-zero buckets only."""
        return {
            "precision_bits": self._p,
            "count": self.count,
            "total": self.total,
            "min": self.min,
            "max": self.max,
            "buckets": {str(i): c for i, c in enumerate(self.counts) if c},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Histogram:
        h = cls(int(data["precision_bits"]))
        for i, c in data["buckets"].items():
            h.counts[int(i)] = int(c)
        h.count, h.total = int(data["count"]), int(data["total"])
        h.min, h.max = int(data["min"]), int(data["max"])
        return h

    @classmethod
    def merged(cls, parts: Iterable[Histogram], precision_bits: int = DEFAULT_PRECISION_BITS) -> Histogram:
        out = cls(precision_bits)
        for part in parts:
            out.merge(part)
        return out


def bucket_of(value: int, precision_bits: int) -> int:
    """The bucket index of ``value`` (the same arithmetic as :meth:`Histogram.record`)."""
    if value < (2 << precision_bits):
        return value
    e = value.bit_length() - precision_bits - 1
    return (e << precision_bits) + (value >> e)


def bucket_range(index: int, precision_bits: int) -> tuple[int, int]:
    """(lowest value, width) of bucket ``index``."""
    half = 1 << precision_bits
    if index < 2 * half:
        return index, 1
    e = index // half - 1
    mantissa = index - e * half
    return mantissa << e, 1 << e


def _ceil(x: float) -> int:
    n = int(x)
    return n if n == x else n + 1

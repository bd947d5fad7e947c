"""The HDR-style histogram: percentiles within its relative error of the exact ones, exact merges across processes."""

from __future__ import annotations

import json
import multiprocessing as mp
import pickle
from typing import Any

import numpy as np
import pytest

from ferry.loadtest.histogram import MAX_VALUE, Histogram, bucket_of, bucket_range

QS = (0.0, 1.0, 10.0, 50.0, 90.0, 95.0, 99.0, 99.9, 99.99, 100.0)


def samples(kind: str, n: int = 50_000, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "lognormal":  # latency-like: ~1 ms median, long tail (ns)
        values = rng.lognormal(np.log(1e6), 1.0, n)
    elif kind == "uniform":
        values = rng.uniform(1e3, 1e9, n)
    elif kind == "bimodal":  # cache hits at ~50 µs, misses at ~20 ms
        values = np.where(rng.random(n) < 0.3, rng.normal(5e4, 5e3, n), rng.normal(2e7, 2e6, n))
    elif kind == "small":  # exact region: below 2 * 2**precision_bits
        values = rng.integers(0, 256, n)
    else:
        raise ValueError(kind)
    return np.maximum(values, 0).astype(np.int64)


def exact(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q, method="inverted_cdf"))  # nearest rank, as the histogram reports


@pytest.mark.parametrize("kind", ["lognormal", "uniform", "bimodal", "small"])
@pytest.mark.parametrize("bits", [5, 7, 10])
def test_percentiles_within_relative_error_of_exact(kind: str, bits: int) -> None:
    values = samples(kind)
    h = Histogram(bits)
    h.record_many(values.tolist())
    assert h.count == len(values)
    assert h.min == values.min() and h.max == values.max()
    assert h.mean == pytest.approx(values.mean(), rel=1e-12)
    for q in QS:
        want = exact(values, q)
        got = h.percentile(q)
        assert abs(got - want) <= h.relative_error * want + 0.5, (kind, bits, q, got, want)


def test_values_below_the_linear_range_are_exact() -> None:
    h = Histogram(7)
    values = list(range(256)) * 3
    h.record_many(values)
    for q in (1, 25, 50, 75, 99):
        assert h.percentile(q) == exact(np.array(values), q)


def test_relative_error_bound_per_bucket() -> None:
    for bits in (3, 7):
        for v in [0, 1, 255, 256, 257, 1000, 12345, 10**6, 10**9 + 7, MAX_VALUE]:
            low, width = bucket_range(bucket_of(v, bits), bits)
            assert low <= v < low + width
            assert width == 1 or (width - 1) / 2 / low <= 1 / 2 ** (bits + 1)


def test_buckets_are_monotonic_and_contiguous() -> None:
    bits = 4
    previous_end = 0
    for index in range(bucket_of(10**6, bits)):
        low, width = bucket_range(index, bits)
        assert low == previous_end
        assert bucket_of(low, bits) == index and bucket_of(low + width - 1, bits) == index
        previous_end = low + width


def test_empty_and_edge_cases() -> None:
    h = Histogram()
    assert h.percentile(99) == 0.0 and h.mean == 0.0
    h.record(-5)  # a clock step backwards counts as zero
    h.record(MAX_VALUE * 4)  # beyond the range: counted at the top, max stays exact
    assert h.count == 2 and h.min == 0 and h.max == MAX_VALUE * 4
    assert h.percentile(100) == MAX_VALUE * 4
    with pytest.raises(ValueError):
        h.percentile(101)
    with pytest.raises(ValueError):
        Histogram(0)


def _record_part(args: tuple[list[int], int]) -> dict[str, Any]:
    values, bits = args
    h = Histogram(bits)
    h.record_many(values)
    return h.to_dict()


def test_merge_across_processes_equals_one_histogram_of_everything() -> None:
    values = samples("lognormal", 40_000, seed=7)
    parts = np.array_split(values, 4)
    with mp.get_context("spawn").Pool(2) as pool:
        dicts = pool.map(_record_part, [(p.tolist(), 7) for p in parts])
    merged = Histogram.merged(Histogram.from_dict(json.loads(json.dumps(d))) for d in dicts)
    whole = Histogram(7)
    whole.record_many(values.tolist())
    assert merged.counts == whole.counts
    assert (merged.count, merged.total, merged.min, merged.max) == (whole.count, whole.total, whole.min, whole.max)
    for q in QS:
        assert merged.percentile(q) == whole.percentile(q)
        assert abs(merged.percentile(q) - exact(values, q)) <= merged.relative_error * exact(values, q) + 0.5


def test_merge_is_order_independent_and_survives_pickle() -> None:
    a, b = Histogram(), Histogram()
    a.record_many([5, 500, 50_000])
    b.record_many([7, 7_000_000])
    ab = Histogram.merged([a, b])
    ba = Histogram.merged([pickle.loads(pickle.dumps(b)), a])
    assert ab.counts == ba.counts and ab.min == 5 and ab.max == 7_000_000 and ab.count == 5
    assert Histogram().merge(Histogram()).count == 0


def test_merge_refuses_a_different_precision() -> None:
    with pytest.raises(ValueError, match="precision"):
        Histogram(7).merge(Histogram(8))

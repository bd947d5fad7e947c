"""The result cache: key sensitivity, LRU order, byte bound, version invalidation, single flight."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from ferry.server.inference.cache import ENTRY_OVERHEAD_BYTES, ResultCache, cache_key

X = np.arange(8, dtype=np.float32).reshape(2, 4)


def key(model: str = "m", version: int = 1, feeds: dict[str, np.ndarray] | None = None, outputs: Any = ("y",)) -> Any:
    return cache_key(model, version, {"x": X} if feeds is None else feeds, outputs)


def result(value: float, size: int = 4) -> list[np.ndarray]:
    return [np.full(size, value, dtype=np.float32)]


def fill(cache: ResultCache, k: Any, value: float, size: int = 4) -> tuple[list[np.ndarray], bool]:
    async def run() -> list[np.ndarray]:
        return result(value, size)

    return asyncio.run(cache.get_or_run(k[0], k[1], run))


def test_a_change_in_anything_that_matters_misses() -> None:
    base = key()[0]
    variants = {
        "model": key(model="other"),
        "version": key(version=2),
        "dtype": key(feeds={"x": X.astype(np.float64)}),
        "shape": key(feeds={"x": X.reshape(4, 2)}),
        "one byte": key(feeds={"x": np.where(np.arange(8).reshape(2, 4) == 5, 99, X).astype(np.float32)}),
        "input name": key(feeds={"z": X}),
        "outputs": key(outputs=("y", "z")),
        "output order": key(outputs=("z",)),
    }
    for what, (variant, _) in variants.items():
        assert variant != base, what
    assert key()[0] == base  # equal material, equal key (request ids are never part of it)
    strings = np.array(["a", "b"], dtype=object)
    assert key(feeds={"s": strings})[0] != key(feeds={"s": np.array(["a", "c"], dtype=object)})[0]


def test_hit_returns_stored_outputs_and_counts() -> None:
    cache = ResultCache(1 << 20)
    outputs, hit = fill(cache, key(), 1.0)
    assert not hit and outputs[0][0] == 1.0
    outputs, hit = fill(cache, key(), 2.0)  # a hit: run() is not called, the first answer comes back
    assert hit and outputs[0][0] == 1.0 and not outputs[0].flags.writeable
    stats = cache.stats("m", 1)
    assert (stats.hits, stats.misses, stats.entries) == (1, 1, 1)


def test_lru_order_and_byte_bound() -> None:
    k1, k2, k3 = key(version=1), key(version=2), key(version=3)
    entry = k1[1] + 16 + ENTRY_OVERHEAD_BYTES  # key material + 4 float32 outputs + overhead
    cache = ResultCache(2 * entry)
    fill(cache, k1, 1.0)
    fill(cache, k2, 2.0)
    assert cache.bytes == 2 * entry
    fill(cache, k1, 0.0)  # a hit refreshes k1: k2 is now the least recent
    fill(cache, k3, 3.0)  # over the bound: evicts k2
    assert len(cache) == 2 and cache.bytes <= cache.max_bytes
    assert fill(cache, k1, 0.0)[1] and fill(cache, k3, 0.0)[1]
    assert not fill(cache, k2, 2.0)[1]
    assert cache.stats("m", 2).evictions == 1


def test_an_entry_larger_than_the_bound_is_not_stored() -> None:
    cache = ResultCache(1024)
    outputs, hit = fill(cache, key(), 1.0, size=1000)
    assert not hit and outputs[0].size == 1000 and len(cache) == 0 and cache.bytes == 0


def test_dropping_a_version_forgets_its_entries_only() -> None:
    cache = ResultCache(1 << 20)
    fill(cache, key(version=1), 1.0)
    fill(cache, key(version=2), 2.0)
    cache.drop_version("m", 1)
    assert len(cache) == 1 and not fill(cache, key(version=1), 1.0)[1] and fill(cache, key(version=2), 0.0)[1]


def test_identical_requests_in_flight_run_once() -> None:
    async def test() -> None:
        cache = ResultCache(1 << 20)
        release = asyncio.Event()
        calls = 0

        async def run() -> list[np.ndarray]:
            nonlocal calls
            calls += 1
            await release.wait()
            return result(7.0)

        k, size = key()
        first = asyncio.ensure_future(cache.get_or_run(k, size, run))
        await asyncio.sleep(0)
        second = asyncio.ensure_future(cache.get_or_run(k, size, run))
        await asyncio.sleep(0)
        release.set()
        (a, a_hit), (b, b_hit) = await asyncio.wait_for(asyncio.gather(first, second), 5)
        assert calls == 1 and not a_hit and b_hit and a[0][0] == b[0][0] == 7.0

    asyncio.run(test())


def test_a_failed_leader_fails_its_followers_and_is_not_cached() -> None:
    async def test() -> None:
        cache = ResultCache(1 << 20)
        release = asyncio.Event()

        async def boom() -> list[np.ndarray]:
            await release.wait()
            raise RuntimeError("model failed")

        k, size = key()
        tasks = [asyncio.ensure_future(cache.get_or_run(k, size, boom)) for _ in range(2)]
        await asyncio.sleep(0)
        release.set()
        for task in tasks:
            with pytest.raises(RuntimeError, match="model failed"):
                await asyncio.wait_for(task, 5)
        assert len(cache) == 0

    asyncio.run(test())


def test_a_cancelled_leader_hands_over_to_a_follower() -> None:
    async def test() -> None:
        cache = ResultCache(1 << 20)
        release = asyncio.Event()
        calls = 0

        async def run() -> list[np.ndarray]:
            nonlocal calls
            calls += 1
            await release.wait()
            return result(5.0)

        k, size = key()
        leader = asyncio.ensure_future(cache.get_or_run(k, size, run))
        await asyncio.sleep(0)
        follower = asyncio.ensure_future(cache.get_or_run(k, size, run))
        await asyncio.sleep(0)
        leader.cancel()
        await asyncio.sleep(0)
        release.set()
        outputs, hit = await asyncio.wait_for(follower, 5)
        assert outputs[0][0] == 5.0 and not hit and calls == 2

    asyncio.run(test())

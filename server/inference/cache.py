"""The result cache: one server-wide LRU of inference outputs, bounded in bytes, with single-flight misses.

A key is the model name, the *resolved* version, and for each input its name, datatype, shape and bytes, plus the
requested outputs. The input bytes are part of the key itself: the dict hashes them (the digest) and, on a hash
match, compares them in full, so two different inputs can never share an answer. Keys never hold request ids or
trace headers. Entries are counted in bytes (key material + outputs) and a hit refreshes recency.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ferry.client.tensors import DATATYPES, to_raw

ENTRY_OVERHEAD_BYTES = 256
"""Bytes charged per entry on top of its arrays, for the dict slot, tuples and array headers."""

Key = tuple[Any, ...]


@dataclass(slots=True)
class VersionCacheStats:
    """What the cache holds and did for one model version (kept for the metrics issue)."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    entries: int = 0
    bytes: int = 0


def cache_key(model: str, version: int, feeds: dict[str, np.ndarray], outputs: Sequence[str]) -> tuple[Key, int]:
    """The key of a request and the bytes of its key material."""
    parts = []
    size = 0
    for name in sorted(feeds):
        array = feeds[name]
        material = to_raw(array, DATATYPES["BYTES"]) if array.dtype == object else array.tobytes()
        parts.append((name, array.dtype.str, array.shape, material))
        size += len(material) + len(name)
    return (model, version, tuple(parts), tuple(outputs)), size


class ResultCache:
    """Server-wide LRU bounded in bytes. Lives on the event loop thread (no locks)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: collections.OrderedDict[Key, tuple[list[np.ndarray], int]] = collections.OrderedDict()
        self._inflight: dict[Key, asyncio.Future[list[np.ndarray]]] = {}
        self._stats: dict[tuple[str, int], VersionCacheStats] = collections.defaultdict(VersionCacheStats)

    def __len__(self) -> int:
        return len(self._entries)

    def stats(self, model: str, version: int) -> VersionCacheStats:
        return self._stats.get((model, version)) or VersionCacheStats()

    async def get_or_run(
        self, key: Key, key_bytes: int, run: Callable[[], Awaitable[list[np.ndarray]]]
    ) -> tuple[list[np.ndarray], bool]:
        """The cached outputs for ``key`` (a hit), or the outputs of ``run()``, stored (a miss). Identical requests
        that arrive while one runs wait for its result instead of running again (single flight)."""
        stats = self._stats[(key[0], key[1])]
        while True:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
                stats.hits += 1
                return found[0], True
            leader = self._inflight.get(key)
            if leader is None:
                break
            try:
                outputs = await asyncio.shield(leader)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # our own caller left
                continue  # the leader's caller left before it finished: try again, perhaps as the leader
            stats.hits += 1
            return outputs, True
        stats.misses += 1
        future: asyncio.Future[list[np.ndarray]] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            outputs = await run()
        except Exception as err:
            future.set_exception(err)
            future.exception()  # retrieved: there may be no follower to read it
            raise
        except BaseException:
            future.cancel()
            raise
        finally:
            del self._inflight[key]
        stored = self._store(key, key_bytes, outputs, stats)
        future.set_result(stored)
        return stored, False

    def _store(self, key: Key, key_bytes: int, outputs: list[np.ndarray], stats: VersionCacheStats) -> list[np.ndarray]:
        # Own copies: views into a batch's outputs would keep the whole batch alive and defeat the byte bound.
        owned = [np.array(out, copy=True) for out in outputs]
        for array in owned:
            array.flags.writeable = False
        size = key_bytes + sum(a.nbytes for a in owned) + ENTRY_OVERHEAD_BYTES
        if size > self.max_bytes:
            return owned
        self._entries[key] = (owned, size)
        self.bytes += size
        stats.entries += 1
        stats.bytes += size
        while self.bytes > self.max_bytes:
            old_key, (_, old_size) = self._entries.popitem(last=False)
            self._forget(old_key, old_size).evictions += 1
        return owned

    def _forget(self, key: Key, size: int) -> VersionCacheStats:
        self.bytes -= size
        stats = self._stats[(key[0], key[1])]
        stats.entries -= 1
        stats.bytes -= size
        return stats

    def drop_version(self, model: str, version: int) -> None:
        """Forget every entry of a version (it unloaded, so its answers may no longer hold)."""
        for key in [k for k in self._entries if k[0] == model and k[1] == version]:
            _, size = self._entries.pop(key)
            self._forget(key, size)
        self._stats.pop((model, version), None)

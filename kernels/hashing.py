"""Categorical strings to bucket ids by a stable hash (feature hashing).

The hash is MurmurHash3 x86 32-bit of the UTF-8 bytes with a seed, as unsigned: the same function as scikit-learn's
``sklearn.utils.murmurhash3_32(s, seed, positive=True)`` (which ``FeatureHasher`` and ``HashingVectorizer`` build
on), so a model trained with hashed categories in Python gets the same buckets here. The bucket is ``hash %
buckets``. Python's ``hash()`` is no use: it is salted per process.

Strings travel as one flat uint8 buffer plus int64 offsets (element ``i`` is ``data[offsets[i]:offsets[i + 1]]``),
the form the Numba kernel can read; :func:`pack_strings` builds it from str / bytes elements.
"""

from __future__ import annotations

from collections.abc import Iterable

import numba
import numpy as np

from ferry.kernels import frozen

_C1, _C2 = 0xCC9E2D51, 0x1B873593
_M32 = 0xFFFFFFFF


def pack_strings(items: Iterable[str | bytes]) -> tuple[np.ndarray, np.ndarray]:
    """(data uint8 [total bytes], offsets int64 [n + 1]) of the UTF-8 encodings of ``items``."""
    encoded = [s.encode("utf-8") if isinstance(s, str) else bytes(s) for s in items]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    return np.frombuffer(b"".join(encoded), dtype=np.uint8), offsets


def hash_buckets_ref(data: np.ndarray, offsets: np.ndarray, buckets: int, seed: int = 0) -> np.ndarray:
    """The numpy reference: int64 [n] bucket ids, vectorized over elements (one numpy pass per 4-byte block)."""
    n = len(offsets) - 1
    lengths = np.diff(offsets)
    width = int(lengths.max(initial=0))
    padded = np.zeros((n, width + 4), dtype=np.uint64)  # zero-padded bytes, room for a tail read past the end
    if width:
        cols = np.arange(width)
        mask = cols[None, :] < lengths[:, None]
        padded[:, :width][mask] = data[(offsets[:-1, None] + cols[None, :])[mask]]
    h = np.full(n, seed & _M32, dtype=np.uint64)
    blocks = lengths // 4
    for b in range(width // 4):
        word = padded[:, 4 * b] | padded[:, 4 * b + 1] << 8 | padded[:, 4 * b + 2] << 16 | padded[:, 4 * b + 3] << 24
        h = np.where(b < blocks, (_rotl_ref(h ^ _mix1_ref(word), 13) * 5 + 0xE6546B64) & _M32, h)
    rest = lengths & 3
    start = blocks * 4
    rows = np.arange(n)
    tail = np.zeros(n, dtype=np.uint64)
    for i in (2, 1, 0):  # the tail bytes, most significant first, as MurmurHash3's switch falls through
        byte = padded[rows, start + i]
        tail = np.where(rest > i, tail ^ (byte << (8 * i)), tail)
    h = np.where(rest > 0, h ^ _mix1_ref(tail), h)
    h ^= lengths.astype(np.uint64)
    h = _fmix_ref(h)
    return (h % np.uint64(buckets)).astype(np.int64)


def _mix1_ref(k: np.ndarray) -> np.ndarray:
    k = (k * _C1) & _M32
    k = _rotl_ref(k, 15)
    return (k * _C2) & _M32


def _rotl_ref(x: np.ndarray, r: int) -> np.ndarray:
    return ((x << r) | (x >> (32 - r))) & _M32


def _fmix_ref(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _M32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def hash_buckets(data: np.ndarray, offsets: np.ndarray, buckets: int, seed: int = 0) -> np.ndarray:
    """The Numba kernel (same contract as :func:`hash_buckets_ref`); releases the GIL while it runs."""
    out = np.empty(len(offsets) - 1, dtype=np.int64)
    _hash_buckets(frozen(data), frozen(offsets), np.uint64(buckets), np.uint64(seed & _M32), out)
    return out


# All arithmetic is on uint64 masked to 32 bits: Numba's integer typing would widen mixed uint32 expressions anyway.
@numba.njit(cache=True, nogil=True, error_model="numpy")
def _hash_buckets(data, offsets, buckets, seed, out):
    m32 = np.uint64(_M32)
    c1 = np.uint64(_C1)
    c2 = np.uint64(_C2)
    for i in range(out.shape[0]):
        start = offsets[i]
        length = offsets[i + 1] - start
        h = seed
        end = start + (length // 4) * 4
        for p in range(start, end, 4):
            k = (
                np.uint64(data[p])
                | (np.uint64(data[p + 1]) << np.uint64(8))
                | (np.uint64(data[p + 2]) << np.uint64(16))
                | (np.uint64(data[p + 3]) << np.uint64(24))
            )
            k = (k * c1) & m32
            k = ((k << np.uint64(15)) | (k >> np.uint64(17))) & m32
            k = (k * c2) & m32
            h ^= k
            h = ((h << np.uint64(13)) | (h >> np.uint64(19))) & m32
            h = (h * np.uint64(5) + np.uint64(0xE6546B64)) & m32
        rest = length & 3
        if rest > 0:
            k = np.uint64(0)
            if rest >= 3:
                k ^= np.uint64(data[end + 2]) << np.uint64(16)
            if rest >= 2:
                k ^= np.uint64(data[end + 1]) << np.uint64(8)
            k ^= np.uint64(data[end])
            k = (k * c1) & m32
            k = ((k << np.uint64(15)) | (k >> np.uint64(17))) & m32
            k = (k * c2) & m32
            h ^= k
        h ^= np.uint64(length)
        h ^= h >> np.uint64(16)
        h = (h * np.uint64(0x85EBCA6B)) & m32
        h ^= h >> np.uint64(13)
        h = (h * np.uint64(0xC2B2AE35)) & m32
        h ^= h >> np.uint64(16)
        out[i] = np.int64(h % buckets)

"""Compile every Numba kernel of ``ferry.kernels`` into ``NUMBA_CACHE_DIR``, for the argument types Ferry passes.

The image build runs this (as the user the server runs as, so the cache stays writable for it), so a container's
first ``ferry serve`` loads compiled kernels instead of compiling them while its models load. Numba compiles one
specialization per argument type: the types here are the ones ``ferry.server.models.preprocess`` and
``ferry.server.observability.drift`` hand the kernels (uint8 images, float32 features, int64 codes, packed UTF-8
strings; drift over float32 and float64 rows), every data input read-only through ``ferry.kernels.frozen``.
tests/integration/test_container.py serves the example repository on a cache warmed by this script and checks that
serving compiled nothing new.

Numba keys its cache by CPU name and features: ``NUMBA_CPU_NAME=generic`` with ``NUMBA_CPU_FEATURES`` empty (the
image's default) makes entries that every x86-64 node loads; left unset, only nodes with the build machine's CPU would
start warm.
"""

from __future__ import annotations

import os
import sys

import numpy as np

from ferry.kernels import hashing, image, stats, tabular


def warm() -> list[str]:
    """Run each kernel once on small inputs; returns the names of the kernels run."""
    pixels = np.zeros((1, 8, 8, 3), dtype=np.uint8)
    direct = image.ImageSpec.build(8, 8, 3, crop=(4, 4), scale=1 / 255)  # the copy path (crop only)
    resized = image.ImageSpec.build(8, 8, 3, resize=(6, 6), crop=(4, 4), scale=1 / 255)  # the bilinear path
    image.image_to_nchw(pixels, direct)
    image.image_to_nchw(pixels, resized)

    width = 3
    ones = np.ones(width, dtype=np.float32)
    steps = tabular.FeatureSteps.build(
        [("impute", [ones]), ("clip", [-ones, ones]), ("standardize", [0 * ones, ones]), ("minmax", [-ones, ones])],
        width,
    )
    tabular.feature_map(np.zeros((2, width), dtype=np.float32), steps)
    tabular.one_hot(np.zeros((2, 2), dtype=np.int64), np.array([2, 3], dtype=np.int64))

    data, offsets = hashing.pack_strings(["warm", "up"])
    hashing.hash_buckets(data, offsets, 16, 0)

    for dtype in (np.float32, np.float64):
        rows = np.zeros((2, width), dtype=dtype)
        stats.histogram(rows, np.tile(np.linspace(0.0, 1.0, 4), (width, 1)))
        stats.merge_moments(stats.empty_moments(width), rows)
    return ["image_to_nchw", "feature_map", "one_hot", "hash_buckets", "histogram", "merge_moments"]


def main() -> int:
    cache = os.environ.get("NUMBA_CACHE_DIR")
    if not cache:
        print("warm_numba: set NUMBA_CACHE_DIR to the folder the server will read", file=sys.stderr)
        return 2
    names = warm()
    files = sum(len(found) for _, _, found in os.walk(cache))
    cpu = os.environ.get("NUMBA_CPU_NAME", "host")
    print(f"warm_numba: {', '.join(names)} compiled for CPU {cpu!r}: {files} files in {cache}")
    return 0 if files else 1


if __name__ == "__main__":
    sys.exit(main())

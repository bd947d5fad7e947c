"""``prange`` variants of the two preprocessing pipelines, for :mod:`benchmarks.kernel_bench`'s experiment: does
parallelism over batch rows pay on this machine? The served kernels (``kernels/``) are serial because it did not.
Not cached: compile time does not matter here.
"""

from __future__ import annotations

from collections.abc import Callable

import numba
import numpy as np

from ferry.kernels.image import ImageSpec, image_to_nchw
from ferry.kernels.tabular import FeatureSteps, feature_map

Call = Callable[[], object]


def prange_cases(
    rows: int, rng: np.random.Generator, spec: ImageSpec, steps: FeatureSteps
) -> dict[str, tuple[Call, Call]]:
    """(serial, prange) callables of the two pipelines: the parallel variants parallelize over batch rows."""
    images = rng.integers(0, 256, (rows, 64, 64, 3), dtype=np.uint8)
    out = np.empty((rows, 3, 56, 56), dtype=np.float32)
    x = rng.standard_normal((rows, 64)).astype(np.float32)
    features = np.empty_like(x)
    args = (images, spec.rows[0], spec.cols[0], spec.src_channel, spec.scale, spec.mean, spec.std, out)
    return {
        "image: crop 56, normalize (imgcls)": (
            lambda: image_to_nchw(images, spec),
            lambda: _image_prange(*args),
        ),
        "tabular: impute → standardize → clip, 64 features": (
            lambda: feature_map(x, steps),
            lambda: _features_prange(x, steps.codes, steps.params, features),
        ),
    }


@numba.njit(nogil=True, parallel=True)
def _image_prange(images, ys, xs, src, scale, mean, std, out):  # the served kernel's loop, prange over images
    n_images, channels, out_h, out_w = out.shape
    table = np.empty((channels, 256), dtype=np.float32)
    for c in range(channels):
        for p in range(256):
            table[c, p] = (np.float32(p) * scale - mean[c]) / std[c]
    left = xs[0]
    for n in numba.prange(n_images):
        for c in range(channels):
            for y in range(out_h):
                row = images[n, ys[y], left : left + out_w, src[c]]
                for x in range(out_w):
                    out[n, c, y, x] = table[c, row[x]]


@numba.njit(nogil=True, parallel=True)
def _features_prange(x, codes, params, out):  # the served kernel's passes, row by row, prange over rows
    rows, width = out.shape
    for n in numba.prange(rows):
        row = out[n]
        row[:] = x[n]
        for s in range(codes.shape[0]):
            p0 = params[s, 0]
            p1 = params[s, 1]
            if codes[s] == 0:
                for j in range(width):
                    row[j] = p0[j] if np.isnan(row[j]) else row[j]
            elif codes[s] == 1:
                for j in range(width):
                    v = p0[j] if row[j] < p0[j] else row[j]
                    row[j] = p1[j] if v > p1[j] else v
            else:
                for j in range(width):
                    row[j] = (row[j] - p0[j]) / p1[j]

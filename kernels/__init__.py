"""Numeric kernels (numpy reference + Numba fast path) for preprocessing and statistics; no asyncio, no gRPC.

- :mod:`kernels.image`: uint8 NHWC images to normalized float32 NCHW (crop, bilinear resize, channel order);
- :mod:`kernels.tabular`: per-feature impute / clip / standardize / min-max in one call, integer one-hot;
- :mod:`kernels.hashing`: strings to bucket ids by MurmurHash3 (stable across processes);
- :mod:`kernels.stats`: per-feature histograms and running moments for drift detection.

Every Numba kernel is ``@njit(cache=True, nogil=True)``: compiled code is cached on disk (``__pycache__`` beside the
source, or ``NUMBA_CACHE_DIR``) and the GIL is released while it runs.
"""

from __future__ import annotations

import numpy as np


def frozen(array: np.ndarray) -> np.ndarray:
    """A read-only, C-contiguous view of ``array`` (a copy only if it is not contiguous).

    Kernels take their data inputs through it: Numba compiles one specialization per argument type, and a writable
    array (a concatenated batch) and a read-only one (a request's bytes) are different types. Read-only for all
    means one compilation per kernel at warmup instead of two.
    """
    array = np.ascontiguousarray(array)
    if array.flags.writeable:
        array = array.view()
        array.flags.writeable = False
    return array

"""Numeric kernels (numpy reference + Numba fast path) for preprocessing and statistics; no asyncio, no gRPC.

- :mod:`ferry.kernels.image`: uint8 NHWC images to normalized float32 NCHW (crop, bilinear resize, channel order);
- :mod:`ferry.kernels.tabular`: per-feature impute / clip / standardize / min-max in one call, integer one-hot;
- :mod:`ferry.kernels.hashing`: strings to bucket ids by MurmurHash3 (stable across processes);
- :mod:`ferry.kernels.stats`: per-feature histograms and running moments for drift detection.

Every Numba kernel is ``@njit(cache=True, nogil=True, error_model="numpy")``: compiled code is cached on disk
(``__pycache__`` beside the source, or ``NUMBA_CACHE_DIR``), the GIL is released while it runs, and a division by
zero gives inf / NaN as in numpy instead of raising, which is what the references do and what lets LLVM vectorize
divisions (Python's error model checks every divisor: the standardize pass ran scalar). No ``fastmath``: it assumes no
NaN, and NaN is data here; and ``prange`` lost to one thread on 2 shared cores (BENCHMARKS.md).
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

"""Tabular features: per-feature maps with stored statistics, fused into one kernel call, and integer one-hot.

A chain of per-feature steps runs as one call of :func:`feature_map`, each step one vectorizable pass over the batch
in the output buffer (a batch of tabular rows is small enough to stay in cache between passes), so numpy's
temporaries and per-operation call overhead disappear. The steps, each with per-feature float32 parameters:

- ``impute``: ``x = fill[j]`` where ``x`` is NaN (the declared NaN policy; other steps let NaN through);
- ``clip``: ``x = min(max(x, lo[j]), hi[j])``, NaN stays NaN (as ``np.clip``);
- ``standardize``: ``x = (x - mean[j]) / std[j]``;
- ``minmax``: ``x = (x - min[j]) / (max[j] - min[j])`` (the range is precomputed in float32).

Float operations are exactly those of the numpy reference, in the same order and precision, and no fastmath:
fastmath assumes no NaN, and NaN is data here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numba
import numpy as np

from ferry.kernels import frozen

IMPUTE, CLIP, STANDARDIZE, MINMAX = 0, 1, 2, 3
STEP_CODES = {"impute": IMPUTE, "clip": CLIP, "standardize": STANDARDIZE, "minmax": MINMAX}


@dataclass(frozen=True, slots=True, eq=False)
class FeatureSteps:
    """A validated chain of per-feature steps over ``width`` features.

    ``codes[s]`` is a step code; ``params[s, 0]`` and ``params[s, 1]`` its two per-feature parameter vectors
    (impute: fill, unused; clip: lo, hi; standardize: mean, std; minmax: min, max - min)."""

    width: int
    codes: np.ndarray  # int64 [steps]
    params: np.ndarray  # float32 [steps, 2, width]

    @classmethod
    def build(cls, steps: Sequence[tuple[str, Sequence[np.ndarray]]], width: int) -> FeatureSteps:
        """``steps``: (name, parameter vectors) pairs, vectors of ``width`` float32 values each (impute: fill;
        clip: lo, hi; standardize: mean, std; minmax: min, max). Raises ``ValueError`` naming the bad value."""
        codes = np.empty(len(steps), dtype=np.int64)
        params = np.zeros((len(steps), 2, width), dtype=np.float32)
        for s, (name, vectors) in enumerate(steps):
            if name not in STEP_CODES:
                raise ValueError(f"unknown step {name!r}; steps are {sorted(STEP_CODES)}")
            arrays = [np.asarray(v, dtype=np.float32) for v in vectors]
            wanted = 1 if name == "impute" else 2
            if len(arrays) != wanted or any(a.shape != (width,) for a in arrays):
                raise ValueError(f"{name} takes {wanted} vector(s) of {width} values")
            codes[s] = STEP_CODES[name]
            for i, a in enumerate(arrays):
                params[s, i] = a
            if name == "clip" and (np.isnan(arrays[0]).any() or np.isnan(arrays[1]).any()):
                raise ValueError("clip bounds must not be NaN (use -inf or inf for no bound)")
            if name == "clip" and (arrays[0] > arrays[1]).any():
                j = int(np.argmax(arrays[0] > arrays[1]))
                raise ValueError(f"clip lower bound {arrays[0][j]} exceeds upper bound {arrays[1][j]} at feature {j}")
            if name == "impute" and not np.isfinite(arrays[0]).all():
                raise ValueError(f"impute fill values must be finite (feature {_first_bad(arrays[0])})")
            if name == "standardize":
                _check_divisor(arrays[0], arrays[1], "std")
            if name == "minmax":
                params[s, 1] = arrays[1] - arrays[0]
                _check_divisor(arrays[0], params[s, 1], "max - min")
        return cls(width, codes, params)


def _first_bad(values: np.ndarray) -> int:
    return int(np.argmin(np.isfinite(values)))


def _check_divisor(offset: np.ndarray, divisor: np.ndarray, name: str) -> None:
    if not np.isfinite(offset).all():
        raise ValueError(f"statistics must be finite (feature {_first_bad(offset)})")
    bad = ~(np.isfinite(divisor) & (divisor > 0))
    if bad.any():
        j = int(np.argmax(bad))
        raise ValueError(f"{name} must be finite and > 0, got {divisor[j]} at feature {j} (a constant feature?)")


def feature_map_ref(x: np.ndarray, steps: FeatureSteps) -> np.ndarray:
    """The numpy reference: float32 [N, width] -> float32 [N, width], one numpy expression per step."""
    out = np.asarray(x, dtype=np.float32)
    for code, (p0, p1) in zip(steps.codes, steps.params, strict=True):
        if code == IMPUTE:
            out = np.where(np.isnan(out), p0, out)
        elif code == CLIP:
            out = np.clip(out, p0, p1)
        else:  # standardize and minmax: both (x - offset) / divisor
            out = (out - p0) / p1
    return out


def feature_map(x: np.ndarray, steps: FeatureSteps) -> np.ndarray:
    """The Numba kernel (same contract as :func:`feature_map_ref`); releases the GIL while it runs."""
    out = np.empty(x.shape, dtype=np.float32)
    _feature_map(frozen(x), steps.codes, steps.params, out)
    return out


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _feature_map(x, codes, params, out):
    rows, width = out.shape
    for n in range(rows):  # a loop, not out[:] = x: the slice assignment alone took seconds to compile
        for j in range(width):
            out[n, j] = x[n, j]
    # Selects rather than branches, so that LLVM vectorizes every pass. Comparisons, not min/max, for clip: a NaN
    # compares false and stays NaN, as in np.clip.
    for s in range(codes.shape[0]):
        code = codes[s]
        p0 = params[s, 0]
        p1 = params[s, 1]
        if code == IMPUTE:
            for n in range(rows):
                for j in range(width):
                    v = out[n, j]
                    out[n, j] = p0[j] if np.isnan(v) else v
        elif code == CLIP:
            for n in range(rows):
                for j in range(width):
                    v = out[n, j]
                    v = p0[j] if v < p0[j] else v
                    out[n, j] = p1[j] if v > p1[j] else v
        else:
            for n in range(rows):
                for j in range(width):
                    out[n, j] = (out[n, j] - p0[j]) / p1[j]


def one_hot_ref(codes: np.ndarray, cardinalities: np.ndarray) -> np.ndarray:
    """The numpy reference: int64 [N, K] category codes -> float32 [N, sum(cardinalities)], column k's code ``v``
    setting position ``offset[k] + v``. A code outside ``0..cardinalities[k] - 1`` (unknown category) sets nothing:
    that column's block stays all zeros."""
    rows = codes.shape[0]
    offsets = np.concatenate([[0], np.cumsum(cardinalities)])
    out = np.zeros((rows, int(offsets[-1])), dtype=np.float32)
    for k in range(codes.shape[1]):
        v = codes[:, k]
        known = (v >= 0) & (v < cardinalities[k])
        out[np.nonzero(known)[0], offsets[k] + v[known]] = 1.0
    return out


def one_hot(codes: np.ndarray, cardinalities: np.ndarray) -> np.ndarray:
    """The Numba kernel (same contract as :func:`one_hot_ref`); ``cardinalities`` is int64 [K]."""
    out = np.zeros((codes.shape[0], int(cardinalities.sum())), dtype=np.float32)
    _one_hot(frozen(codes), cardinalities, out)
    return out


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _one_hot(codes, cardinalities, out):
    rows, columns = codes.shape
    for n in range(rows):
        offset = 0
        for k in range(columns):
            v = codes[n, k]
            if 0 <= v < cardinalities[k]:
                out[n, offset + v] = 1.0
            offset += cardinalities[k]

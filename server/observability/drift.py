"""Drift detection: live input statistics of a model version compared with reference statistics of its training data.

The reference (:class:`DriftReference`, ``drift_reference.npz`` beside the model: in the version directory, else in
the model directory) holds per-feature bin edges, the training split's histogram over them, means and variances.
A :class:`DriftMonitor` is fed every executed batch from the worker thread (:meth:`DriftMonitor.observe`: one
histogram and one moments kernel call from ``ferry.kernels.stats``, both releasing the GIL, and one array add).
Rows accumulate in chunks of ``window_rows / CHUNKS``; each time a chunk completes, the oldest chunks leave the
window and, once the window holds ``window_rows``, per-feature population stability index and KS statistic are
computed (a handful of array operations on [F, B + 2] counts) and published as an immutable
:class:`DriftSnapshot` (read it from any thread, no lock; its mean and variance are combined when asked for).

An alert fires once when the window crosses a threshold (either statistic of any feature above it): a warning log
event, ``alerts`` + 1, and ``on_alert(DriftAlert)`` (e.g. a
:class:`ferry.server.observability.webhook.AlertWebhook`). It re-arms when the window is back under every threshold.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ferry.kernels.stats import empty_moments, histogram, merge_moments

log = logging.getLogger(__name__)

REFERENCE_FILE = "drift_reference.npz"
FORMAT = 1
"""``format`` stored in a reference file; bumped when its layout changes."""
PSI_EPSILON = 1e-4
"""Floor on bin proportions in the PSI, so that an empty bin on either side gives a large but finite term."""
CHUNKS = 10
"""Chunks per window: the window slides by ``window_rows / CHUNKS`` rows at a time."""

Moments = tuple[np.ndarray, np.ndarray, np.ndarray]  # count int64 [F], mean float64 [F], M2 float64 [F]


def feature_histogram(x: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts int64 [F, B + 2] of rows ``x`` [N, F] against ``edges`` [F, B + 1] (column 0 below the first edge,
    column B + 1 above the last). The one place drift calls a histogram kernel: swap implementations here."""
    return histogram(x, edges)


def batch_moments(x: np.ndarray, state: Moments | None = None) -> Moments:
    """(count, mean, M2) per feature of rows ``x`` [N, F] merged into ``state`` (a new state; NaN skipped)."""
    return merge_moments(empty_moments(x.shape[1]) if state is None else state, x)


def combine_moments(parts: list[Moments]) -> Moments:
    """Chan's parallel formula over several (count, mean, M2) states at once."""
    count = np.stack([p[0] for p in parts]).astype(np.float64)
    mean = np.stack([p[1] for p in parts])
    m2 = np.stack([p[2] for p in parts])
    total = count.sum(axis=0)
    safe = np.maximum(total, 1.0)
    combined = (count * mean).sum(axis=0) / safe
    spread = m2.sum(axis=0) + (count * (mean - combined) ** 2).sum(axis=0)
    return total.astype(np.int64), combined, spread


def population_stability_index(reference: np.ndarray, live: np.ndarray, epsilon: float = PSI_EPSILON) -> np.ndarray:
    """PSI per row of two count arrays [F, K]: ``sum((a - e) * ln(a / e))`` over the bins, with ``e`` and ``a`` the
    reference and live proportions, each floored at ``epsilon``. 0 for identical distributions, and for a row
    where either side has no counts (nothing to compare)."""
    return Baseline(reference, epsilon).compare(live)[0]


def ks_statistic(reference: np.ndarray, live: np.ndarray) -> np.ndarray:
    """Two-sample Kolmogorov-Smirnov statistic per row of two count arrays [F, K] over the same bins: the largest
    distance between the two cumulative distributions at a bin boundary, in [0, 1]; 0 where a side has no counts."""
    return Baseline(reference).compare(live)[1]


class Baseline:
    """The reference side of PSI and KS, computed once: each comparison then costs a handful of array operations."""

    def __init__(self, counts: np.ndarray, epsilon: float = PSI_EPSILON) -> None:
        proportions = _proportions(counts)
        self.epsilon = epsilon
        self._floored = np.maximum(proportions, epsilon)
        self._log = np.log(self._floored)
        self._cumulative = np.cumsum(proportions, axis=1)
        self._seen = counts.sum(axis=1) > 0

    def compare(self, live: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(PSI, KS) per row of live counts [F, K]."""
        proportions = _proportions(live)
        floored = np.maximum(proportions, self.epsilon)
        psi = ((floored - self._floored) * (np.log(floored) - self._log)).sum(axis=1)
        ks = np.abs(np.cumsum(proportions, axis=1) - self._cumulative).max(axis=1)
        seen = self._seen & (live.sum(axis=1) > 0)
        return np.where(seen, psi, 0.0), np.where(seen, ks, 0.0)


def _proportions(counts: np.ndarray) -> np.ndarray:
    totals = counts.sum(axis=1, keepdims=True).astype(np.float64)
    return np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)


@dataclass(frozen=True, slots=True, eq=False)
class DriftReference:
    """Reference statistics of one model's training data, over F features and B bins."""

    edges: np.ndarray
    """float64 [F, B + 1], strictly increasing per feature: B equal-width bins over the training range."""
    counts: np.ndarray
    """int64 [F, B + 2]: the training rows per bin, with the below/above-range columns (empty for training data)."""
    mean: np.ndarray
    """float64 [F]."""
    var: np.ndarray
    """float64 [F] (population variance)."""
    rows: int

    @property
    def features(self) -> int:
        return int(self.edges.shape[0])

    @classmethod
    def from_training(cls, x: np.ndarray, bins: int = 10) -> DriftReference:
        """Reference statistics of training rows ``x`` [N, F]: ``bins`` equal-width bins per feature between its
        minimum and maximum (a constant feature gets the range [value, value + 1])."""
        x = np.asarray(x)
        if x.ndim != 2 or len(x) == 0 or bins < 1:
            raise ValueError(f"need rows [N, F] with N >= 1 and bins >= 1, got shape {x.shape} and bins {bins}")
        lo = np.nanmin(x, axis=0).astype(np.float64)
        hi = np.nanmax(x, axis=0).astype(np.float64)
        hi = np.where(hi > lo, hi, lo + 1.0)
        edges = np.linspace(lo, hi, bins + 1, axis=1)  # start + i * step: exact ends, the extremes fall inside
        count, mean, m2 = batch_moments(x)
        return cls(edges, feature_histogram(x, edges), mean, m2 / np.maximum(count, 1), len(x))

    def to_bytes(self) -> bytes:
        """The ``.npz`` file: ``format``, ``edges``, ``counts``, ``mean``, ``var``, ``rows``."""
        buffer = io.BytesIO()
        np.savez(
            buffer,
            format=np.int64(FORMAT),
            edges=self.edges,
            counts=self.counts,
            mean=self.mean,
            var=self.var,
            rows=np.int64(self.rows),
        )
        return buffer.getvalue()

    @classmethod
    def load(cls, path: Path) -> DriftReference:
        """Read and check a reference file; raises ValueError naming the file and what is wrong."""
        with np.load(path, allow_pickle=False) as data:
            missing = {"format", "edges", "counts", "mean", "var", "rows"} - set(data.files)
            if missing:
                raise ValueError(f"{path}: not a drift reference, it lacks {sorted(missing)}")
            if int(data["format"]) != FORMAT:
                raise ValueError(f"{path}: drift reference format {int(data['format'])}, this server reads {FORMAT}")
            edges, counts = data["edges"].astype(np.float64), data["counts"].astype(np.int64)
            mean, var, rows = data["mean"].astype(np.float64), data["var"].astype(np.float64), int(data["rows"])
        if edges.ndim != 2 or edges.shape[0] < 1 or edges.shape[1] < 2 or not np.all(np.diff(edges, axis=1) > 0):
            raise ValueError(f"{path}: edges must be [F, B + 1] (F, B >= 1), strictly increasing per feature")
        f, b = edges.shape[0], edges.shape[1] - 1
        if counts.shape != (f, b + 2) or mean.shape != (f,) or var.shape != (f,) or np.any(counts < 0):
            raise ValueError(
                f"{path}: for edges {edges.shape}, counts must be [{f}, {b + 2}] (>= 0) and mean, var [{f}]; got "
                f"counts {counts.shape}, mean {mean.shape}, var {var.shape}"
            )
        return cls(edges, counts, mean, var, rows)


def reference_path(model_dir: Path, version: int) -> Path | None:
    """Where a version's reference file is: ``<model>/<version>/drift_reference.npz``, else
    ``<model>/drift_reference.npz``; None when there is neither."""
    for candidate in (model_dir / str(version) / REFERENCE_FILE, model_dir / REFERENCE_FILE):
        if candidate.is_file():
            return candidate
    return None


@dataclass(frozen=True, slots=True, eq=False)
class DriftSnapshot:
    """Statistics of the current window (arrays are read-only, one value per feature)."""

    rows: int
    psi: np.ndarray
    ks: np.ndarray
    drifted: bool
    """Whether any statistic is over its threshold."""
    parts: tuple[Moments, ...]
    """(count, mean, M2) of each chunk in the window: :meth:`moments` combines them."""

    def moments(self) -> tuple[np.ndarray, np.ndarray]:
        """The window's (mean, variance) per feature, combined on each call (tens of µs: call it when scraping)."""
        count, mean, m2 = combine_moments(list(self.parts))
        return mean, m2 / np.maximum(count, 1)


@dataclass(frozen=True, slots=True)
class DriftAlert:
    """What crossed: handed to ``on_alert`` once per crossing."""

    model: str
    version: int
    rows: int
    max_psi: float
    max_ks: float
    psi_features: tuple[int, ...]
    """Features whose PSI is over the threshold."""
    ks_features: tuple[int, ...]
    psi_threshold: float
    ks_threshold: float
    timestamp: float
    """``time.time()`` when the crossing was seen."""


@dataclass(slots=True)
class _Chunk:
    counts: np.ndarray
    moments: Moments
    rows: int = 0


class DriftMonitor:
    """Rolling-window drift statistics of one model version against its reference; see the module docstring.

    ``observe`` may be called from several threads at once. Read ``snapshot`` (None until the window first fills),
    ``alerts``, ``observed_rows`` from any thread. A threshold of 0 turns that statistic's check off.
    """

    def __init__(
        self,
        reference: DriftReference,
        window_rows: int,
        psi_threshold: float,
        ks_threshold: float,
        on_alert: Callable[[DriftAlert], None] | None = None,
        *,
        model: str = "",
        version: int = 0,
        input_name: str = "",
    ) -> None:
        if window_rows < 1:
            raise ValueError(f"window_rows must be >= 1, got {window_rows}")
        self.reference = reference
        self.window_rows = window_rows
        self.psi_threshold = psi_threshold
        self.ks_threshold = ks_threshold
        self.model = model
        self.version = version
        self.input_name = input_name
        """The input whose rows are the features (for the caller to pick from the batch feeds)."""
        self.alerts = 0
        self.observed_rows = 0
        self.skipped_batches = 0
        self.snapshot: DriftSnapshot | None = None
        self.on_alert = on_alert
        """Called (in the observing thread) once per crossing; e.g. an AlertWebhook, to be closed on unload."""
        self._chunk_rows = max(1, window_rows // CHUNKS)
        self._lock = threading.Lock()
        self._chunk = self._new_chunk()
        self._chunks: deque[_Chunk] = deque()
        self._window_counts = np.zeros_like(reference.counts)
        self._baseline = Baseline(reference.counts)
        self._window_rows = 0
        self._armed = True

    def describe(self) -> str:
        return f"model {self.model!r} version {self.version}"

    def observe(self, batch: np.ndarray) -> None:
        """Add one executed batch [rows, ...] (reshaped to [rows, F]). Never raises for a batch of the wrong
        width: it is skipped, counted in ``skipped_batches`` and logged once."""
        rows = len(batch) if batch.ndim else 0
        x = batch.reshape(rows, -1) if batch.ndim != 2 else batch
        if rows == 0 or x.shape[1] != self.reference.features:
            self.skipped_batches += 1
            if self.skipped_batches == 1:
                log.warning("%s: drift skips batches of shape %s (reference has %d features)", self.describe(),
                            batch.shape, self.reference.features)  # fmt: skip
            return
        counts = feature_histogram(x, self.reference.edges)  # the kernel releases the GIL: outside the lock
        alert = None
        with self._lock:
            chunk = self._chunk
            # A new state from the kernel (nogil, one pass over the batch): concurrent observers of this version
            # wait here, the model's other work does not.
            chunk.moments = batch_moments(x, chunk.moments)
            chunk.counts += counts
            chunk.rows += rows
            self.observed_rows += rows
            if chunk.rows >= self._chunk_rows:
                self._chunk = self._new_chunk()
                alert = self._slide(chunk)
        if alert is not None:
            log.warning(
                "drift alert: %s: max PSI %.4f (threshold %g, features %s), max KS %.4f (threshold %g, features %s) "
                "over a window of %d rows (drift_window_rows %d; it moves by whole batches, so it may hold more)",
                self.describe(), alert.max_psi, alert.psi_threshold, list(alert.psi_features), alert.max_ks,
                alert.ks_threshold, list(alert.ks_features), alert.rows, self.window_rows,
                extra={"event": "drift_alert", "model": self.model, "version": self.version},
            )  # fmt: skip
            if self.on_alert is not None:
                try:
                    self.on_alert(alert)
                except Exception:
                    log.exception("%s: drift alert callback failed", self.describe())

    def _new_chunk(self) -> _Chunk:
        return _Chunk(np.zeros_like(self.reference.counts), empty_moments(self.reference.features))

    def _slide(self, chunk: _Chunk) -> DriftAlert | None:
        """Under the lock: put a full chunk into the window, drop chunks the window no longer needs, and, once
        the window is full, publish a new snapshot and decide whether an alert fires."""
        self._chunks.append(chunk)
        self._window_counts += chunk.counts
        self._window_rows += chunk.rows
        while self._window_rows - self._chunks[0].rows >= self.window_rows:
            old = self._chunks.popleft()
            self._window_counts -= old.counts
            self._window_rows -= old.rows
        if self._window_rows < self.window_rows:
            return None
        psi, ks = self._baseline.compare(self._window_counts)
        psi_over = np.flatnonzero(psi > self.psi_threshold) if self.psi_threshold > 0 else np.empty(0, np.int64)
        ks_over = np.flatnonzero(ks > self.ks_threshold) if self.ks_threshold > 0 else np.empty(0, np.int64)
        drifted = bool(len(psi_over) or len(ks_over))
        psi.setflags(write=False)
        ks.setflags(write=False)
        parts = tuple(c.moments for c in self._chunks)  # states are replaced, never changed in place
        self.snapshot = DriftSnapshot(self._window_rows, psi, ks, drifted, parts)  # one atomic swap
        if not drifted:
            if not self._armed:
                log.info("%s: drift back under the thresholds; alert re-armed", self.describe())
            self._armed = True
            return None
        if not self._armed:
            return None
        self._armed = False
        self.alerts += 1
        return DriftAlert(
            self.model,
            self.version,
            self._window_rows,
            float(psi.max()),
            float(ks.max()),
            tuple(int(i) for i in psi_over),
            tuple(int(i) for i in ks_over),
            self.psi_threshold,
            self.ks_threshold,
            time.time(),
        )


__all__ = [
    "REFERENCE_FILE",
    "DriftAlert",
    "DriftMonitor",
    "DriftReference",
    "DriftSnapshot",
    "ks_statistic",
    "population_stability_index",
    "reference_path",
]
